"""COCO-format annotation files -> dataset records (format in ``catalog.py``).

Validation policy: a file that cannot be a COCO instances file, an annotation that points to an
unknown image or category, or a malformed entry is an error naming the file and the entry.
Boxes with no area are skipped, boxes partly outside the image are clipped and boxes entirely
outside are skipped, polygons with fewer than 3 points are dropped; each of these is reported
by one summary warning per file.
"""
from __future__ import annotations

import json
import logging
import os
from functools import partial
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from .catalog import get_metadata, is_registered, register_dataset

logger = logging.getLogger(__name__)

# How many annotation ids a summary warning lists.
_LISTED_IDS = 5

# Metadata of each json file read so far, keyed by (path, mtime, size).
_METADATA_CACHE: dict[tuple, dict[str, Any]] = {}
# The records of the last file parsed only for its metadata, handed to the next load of that
# file (at most one file's records are held, so that unused ones do not pin memory).
_PENDING_RECORDS: dict[tuple, list[dict]] = {}


def load_coco_json(json_file: str, image_root: str, dataset_name: str | None = None) -> list[dict]:
    """Read a COCO instances json into records (one per image, images without objects included).

    ``file_name`` of a record is ``os.path.join(image_root, image["file_name"])``; category ids
    are mapped to 0..K-1 in sorted id order. If ``dataset_name`` is registered, its metadata
    gets ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``.
    """
    key = _file_key(json_file)
    records = _PENDING_RECORDS.pop((key, image_root), None)
    if records is None:
        records, metadata = _parse_coco(_read_json(json_file), json_file, image_root)
        _METADATA_CACHE[key] = metadata
    if dataset_name is not None and is_registered(dataset_name):
        _set_metadata(dataset_name, _METADATA_CACHE[key], json_file)
    return records


def coco_json_metadata(json_file: str, image_root: str) -> dict[str, Any]:
    """``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` of a COCO json file."""
    key = _file_key(json_file)
    if key not in _METADATA_CACHE:
        # The whole file has to be parsed anyway: keep the records for the load that follows.
        records = load_coco_json(json_file, image_root)
        _PENDING_RECORDS.clear()
        _PENDING_RECORDS[(key, image_root)] = records
    return dict(_METADATA_CACHE[key])


def register_coco_instances(
    name: str, json_file: str, image_root: str, **extra_metadata: Any
) -> None:
    """Register a COCO-format dataset under ``name``; nothing is read until it is used.

    Metadata: ``json_file``, ``image_root``, ``evaluator_type="coco"``, ``extra_metadata``, and,
    read from the json on first access, ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``.
    """
    if is_registered(name):
        old = get_metadata(name)
        if (vars(old).get("json_file"), vars(old).get("image_root")) != (json_file, image_root):
            logger.info("Dataset '%s' re-registered for %s, %s.", name, json_file, image_root)
    metadata = {"json_file": json_file, "image_root": image_root, "evaluator_type": "coco"}
    register_dataset(
        name,
        partial(load_coco_json, json_file, image_root, name),
        lazy_metadata=partial(coco_json_metadata, json_file, image_root),
        **{**metadata, **extra_metadata},
    )


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (list of flat [x, y, ...] lists, merged) or an RLE dict
    (compressed or uncompressed ``counts``) to a bool mask [height, width]."""
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle["counts"], list):
            rle = mask_util.frPyObjects(rle, height, width)
    else:
        rle = mask_util.merge(mask_util.frPyObjects(list(segmentation), height, width))
    return mask_util.decode(rle).astype(bool)


def _file_key(json_file: str) -> tuple:
    try:
        stat = os.stat(json_file)
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO annotation file '{json_file}' does not exist.") from None
    return (os.path.realpath(json_file), stat.st_mtime_ns, stat.st_size)


def _read_json(json_file: str) -> dict:
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"'{json_file}' is not a JSON file ({e}); expected a COCO instances json."
        ) from e
    keys = ("images", "annotations", "categories")
    missing = [k for k in keys if not (isinstance(data, dict) and isinstance(data.get(k), list))]
    if missing:
        raise ValueError(
            f"'{json_file}' is not a COCO instances file: expected a JSON object with the lists "
            f"'images', 'annotations' and 'categories'; missing or not a list: {missing}."
        )
    return data


def _parse_coco(
    data: dict, json_file: str, image_root: str
) -> tuple[list[dict], dict[str, Any]]:
    metadata = _parse_categories(data["categories"], json_file)
    records, sizes, index_of_image = _parse_images(data["images"], json_file, image_root)
    anns = data["annotations"]
    image_index, category, boxes = _annotation_arrays(anns, index_of_image, metadata, json_file)
    boxes, keep = _validate_boxes(boxes, sizes[image_index], anns, json_file)
    boxes_list = boxes.tolist()
    category_list = category.tolist()
    image_list = image_index.tolist()
    dropped_polygons: list = []
    for i in np.flatnonzero(keep).tolist():
        ann = anns[i]
        out = {
            "bbox": boxes_list[i],
            "category_id": category_list[i],
            "iscrowd": int(ann.get("iscrowd", 0)),
        }
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
            if len(polygons) < len(segmentation):
                dropped_polygons.append(ann.get("id", f"#{i}"))
            if polygons:
                out["segmentation"] = polygons
        elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
            out["segmentation"] = segmentation
        elif segmentation is not None:
            raise ValueError(
                f"'{json_file}': annotation {ann.get('id', f'#{i}')} has a segmentation that is "
                "neither a list of polygons nor an RLE dict with 'counts' and 'size'."
            )
        records[image_list[i]]["annotations"].append(out)
    _summary(json_file, dropped_polygons, "polygon(s) with fewer than 3 points were dropped")
    return records, metadata


def _parse_categories(categories: list, json_file: str) -> dict[str, Any]:
    try:
        names = {int(c["id"]): str(c["name"]) for c in categories}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"'{json_file}': every category needs an integer 'id' and a 'name' ({e!r})."
        ) from e
    if len(names) != len(categories):
        raise ValueError(f"'{json_file}': category ids are not unique.")
    ids = sorted(names)
    return {
        "thing_classes": [names[i] for i in ids],
        "thing_dataset_id_to_contiguous_id": {cid: k for k, cid in enumerate(ids)},
    }


def _parse_images(
    images: list, json_file: str, image_root: str
) -> tuple[list[dict], np.ndarray, dict]:
    """Records without annotations, sizes [N, 2] as (height, width), image id -> record index."""
    records = []
    for i, image in enumerate(images):
        try:
            records.append({
                "file_name": os.path.join(image_root, image["file_name"]),
                "image_id": int(image["id"]),
                "height": int(image["height"]),
                "width": int(image["width"]),
                "annotations": [],
            })
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"'{json_file}': image entry #{i} needs 'id', 'file_name', 'height' and 'width' "
                f"({e!r})."
            ) from e
    index_of_image = {r["image_id"]: i for i, r in enumerate(records)}
    if len(index_of_image) != len(records):
        raise ValueError(f"'{json_file}': image ids are not unique.")
    sizes = np.array([(r["height"], r["width"]) for r in records], np.float64).reshape(-1, 2)
    return records, sizes, index_of_image


def _annotation_arrays(
    anns: list, index_of_image: dict, metadata: dict, json_file: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per annotation: record index, contiguous category, COCO box [x, y, w, h]."""
    id_map = metadata["thing_dataset_id_to_contiguous_id"]
    try:
        count = len(anns)
        image_index = np.fromiter((index_of_image[a["image_id"]] for a in anns), np.int64, count)
        category = np.fromiter((id_map[a["category_id"]] for a in anns), np.int64, count)
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), 4)
    except (KeyError, TypeError, ValueError):
        _raise_first_bad_annotation(anns, index_of_image, id_map, json_file)
        raise
    return image_index, category, boxes


def _raise_first_bad_annotation(
    anns: list, index_of_image: dict, id_map: dict, json_file: str
) -> None:
    for i, ann in enumerate(anns):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        where = f"'{json_file}': annotation {ann_id}"
        required = ("image_id", "category_id", "bbox")
        if not (isinstance(ann, dict) and all(k in ann for k in required)):
            raise ValueError(f"{where} needs 'image_id', 'category_id' and 'bbox'.")
        if ann["image_id"] not in index_of_image:
            raise ValueError(f"{where} refers to unknown image id {ann['image_id']!r}.")
        if ann["category_id"] not in id_map:
            raise ValueError(
                f"{where} has category id {ann['category_id']!r}, which is not among the "
                f"categories {sorted(id_map)}."
            )
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{where} has bbox {bbox!r}; expected [x, y, w, h].")
        try:
            [float(v) for v in bbox]
        except (TypeError, ValueError):
            raise ValueError(f"{where} has non-numeric bbox {bbox!r}.") from None


def _validate_boxes(
    boxes: np.ndarray, image_sizes: np.ndarray, anns: list, json_file: str
) -> tuple[np.ndarray, np.ndarray]:
    """COCO [x, y, w, h] -> XYXY clipped to the image, and which boxes to keep."""
    finite = np.isfinite(boxes).all(axis=1)
    degenerate = ~finite | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    limits = np.stack([image_sizes[:, 1], image_sizes[:, 0]] * 2, axis=1)
    clipped = np.clip(xyxy, 0.0, limits)
    outside = ~degenerate & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    changed = ~degenerate & ~outside & (clipped != xyxy).any(axis=1)

    def ids(flags: np.ndarray) -> list:
        return [anns[i].get("id", f"#{i}") for i in np.flatnonzero(flags)]

    _summary(json_file, ids(degenerate), "box(es) without area (width or height <= 0) were skipped")
    _summary(json_file, ids(outside), "box(es) entirely outside their image were skipped")
    _summary(json_file, ids(changed), "box(es) partly outside their image were clipped to it")
    return clipped, ~degenerate & ~outside


def _summary(json_file: str, ann_ids: list, what: str) -> None:
    if ann_ids:
        listed = ", ".join(str(i) for i in ann_ids[:_LISTED_IDS])
        more = ", ..." if len(ann_ids) > _LISTED_IDS else ""
        logger.warning("%s: %d %s (annotation ids %s%s).", json_file, len(ann_ids), what, listed,
                       more)


def _set_metadata(dataset_name: str, metadata: dict[str, Any], json_file: str) -> None:
    current = vars(get_metadata(dataset_name))
    for key, value in metadata.items():
        if key in current and current[key] != value:
            raise ValueError(
                f"Dataset '{dataset_name}' was registered with {key}={current[key]!r}, but its "
                f"annotation file '{json_file}' gives {value!r}."
            )
        current[key] = value
