"""COCO-format annotation files -> dataset records (format in ``catalog.py``) and the validated
ground truth that evaluation hands to pycocotools (``load_coco_ground_truth``): both go through
``_validate``, so training and evaluation accept, refuse and skip exactly the same entries.

Validation policy: a file that cannot be a COCO instances file, an annotation that points to an
unknown image or category, or a malformed entry (a bbox that is not [x, y, w, h], a segmentation
that is neither polygons nor an RLE dict, see ``coco_segmentation.py``) is an error naming the
file, the annotation and the field. Boxes with non-finite values or no area are skipped, boxes
partly outside the image are clipped and boxes entirely outside are skipped; polygons with fewer
than 3 points and RLE masks of the wrong size or whose counts do not add up to height x width
are dropped (the annotation stays as a box); each of these is reported by one summary warning
per file. A UTF-8 byte order mark is accepted.
"""

from __future__ import annotations

import json
import logging
import math
import os
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pycocotools.mask as mask_util

from .catalog import get_metadata, is_registered, register_dataset
from .coco_segmentation import clean_segmentation
from .rle import segmentation_to_rle

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


def load_coco_ground_truth(json_file: str) -> dict[str, Any]:
    """The ground truth for pycocotools' ``COCOeval``: the json after the validation of
    ``load_coco_json`` (same errors, skips and clipping), as a COCO dict with json ids.

    Annotations: ``id``, ``image_id``, ``category_id``, ``bbox`` (XYWH, clipped to the image),
    ``area`` (the json's when it is a non-negative number, else the mask's or box's), ``iscrowd``
    and the usable ``segmentation`` if any. pycocotools matches annotations by id and takes id 0
    for "unmatched", so missing, non-positive and repeated ids are re-numbered (after the largest
    id) with a warning rather than refused: training does not use them.
    """
    data = _read_json(json_file)
    valid = _validate(data, json_file, image_root="")
    to_json_id = {k: cid for cid, k in valid.metadata["thing_dataset_id_to_contiguous_id"].items()}
    anns = data["annotations"]
    ann_ids = _unique_ann_ids([anns[i].get("id") for i in valid.kept], json_file)
    annotations = []
    for k, i in enumerate(valid.kept):
        image = valid.images[valid.image_index[i]]
        x0, y0, x1, y1 = valid.boxes[i]
        ann = {
            "id": ann_ids[k],
            "image_id": image["image_id"],
            "category_id": to_json_id[valid.category[i]],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "iscrowd": valid.iscrowd[k],
        }
        if valid.segmentation[k] is not None:
            ann["segmentation"] = valid.segmentation[k]
        ann["area"] = _area(anns[i].get("area"), ann, image["height"], image["width"])
        annotations.append(ann)
    images = [
        {
            "id": r["image_id"],
            "file_name": str(image["file_name"]),
            "height": r["height"],
            "width": r["width"],
        }
        for r, image in zip(valid.images, data["images"])
    ]
    categories = [
        {"id": cid, "name": name}
        for cid, name in zip(sorted(to_json_id.values()), valid.metadata["thing_classes"])
    ]
    return {
        "info": {},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _unique_ann_ids(ann_ids: list, json_file: str) -> list[int]:
    """``ann_ids`` with missing, non-positive and repeated ids replaced by new ones."""
    valid = [i for i in ann_ids if type(i) is int and i > 0]
    next_id = max(valid, default=0) + 1
    seen: set[int] = set()
    out, renumbered = [], []
    for ann_id in ann_ids:
        if type(ann_id) is int and ann_id > 0 and ann_id not in seen:
            out.append(ann_id)
            seen.add(ann_id)
        else:
            out.append(next_id)
            renumbered.append(ann_id)
            next_id += 1
    _summary(
        json_file,
        renumbered,
        "annotation(s) with a missing, non-positive or repeated id were re-numbered for evaluation",
    )
    return out


def _area(area: Any, ann: dict, height: int, width: int) -> float:
    """The json's ``area`` if it is a non-negative number, else the mask's or the box's."""
    if type(area) in (int, float) and math.isfinite(area) and area >= 0:
        return area
    if "segmentation" in ann:
        return float(mask_util.area(segmentation_to_rle(ann["segmentation"], height, width)))
    return float(ann["bbox"][2] * ann["bbox"][3])


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


class _Validated(NamedTuple):
    """A COCO json after validation: what both training records and evaluation are built from."""

    metadata: dict[str, Any]
    images: list[dict]  # records without annotations: file_name, image_id, height, width
    kept: list[int]  # indices of the annotations kept
    image_index: list[int]  # per annotation: index in ``images``
    category: list[int]  # per annotation: contiguous category
    boxes: list[list[float]]  # per annotation: XYXY clipped to the image
    iscrowd: list[int]  # per kept annotation
    segmentation: list[list | dict | None]  # per kept annotation, None: no (usable) mask


def _parse_coco(data: dict, json_file: str, image_root: str) -> tuple[list[dict], dict[str, Any]]:
    valid = _validate(data, json_file, image_root)
    records = valid.images
    for k, i in enumerate(valid.kept):
        out = {
            "bbox": valid.boxes[i],
            "category_id": valid.category[i],
            "iscrowd": valid.iscrowd[k],
        }
        if valid.segmentation[k] is not None:
            out["segmentation"] = valid.segmentation[k]
        records[valid.image_index[i]]["annotations"].append(out)
    return records, valid.metadata


def _validate(data: dict, json_file: str, image_root: str) -> _Validated:
    """Check every entry of ``data``; errors name the file, the entry and the field, skipped and
    changed entries are reported by one warning per kind."""
    metadata = _parse_categories(data["categories"], json_file)
    records, sizes, index_of_image = parse_image_entries(data["images"], json_file, image_root)
    anns = data["annotations"]
    image_index, category, boxes = _annotation_arrays(anns, index_of_image, metadata, json_file)
    boxes, keep = _validate_boxes(boxes, sizes[image_index], anns, json_file)
    kept = np.flatnonzero(keep).tolist()
    image_list = image_index.tolist()
    iscrowd, segmentations = [], []
    dropped: dict[str, list] = {}
    for i in kept:
        try:
            iscrowd.append(_iscrowd(anns[i]))
            record = records[image_list[i]]
            segmentation, reason = _segmentation(anns[i], record["height"], record["width"])
        except ValueError as e:
            ann_id = anns[i].get("id", f"#{i}")
            raise ValueError(f"'{json_file}': annotation {ann_id} {e}.") from None
        segmentations.append(segmentation)
        if reason is not None:
            dropped.setdefault(reason, []).append(anns[i].get("id", f"#{i}"))
    for reason, ann_ids in dropped.items():
        _summary(json_file, ann_ids, reason)
    return _Validated(
        metadata,
        records,
        kept,
        image_list,
        category.tolist(),
        boxes.tolist(),
        iscrowd,
        segmentations,
    )


def _iscrowd(ann: dict) -> int:
    """``iscrowd`` (default 0); a ValueError describing the field if it is not 0 or 1."""
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1) or type(iscrowd) not in (int, bool):
        raise ValueError(f"has iscrowd {iscrowd!r}; expected 0 or 1")
    return int(iscrowd)


def _segmentation(ann: dict, height: int, width: int) -> tuple[list | dict | None, str | None]:
    """The usable segmentation of ``ann`` (None: none) and why part of it was dropped; a
    ValueError describing the field if it is malformed."""
    if ann.get("segmentation") is None:
        return None, None
    return clean_segmentation(ann["segmentation"], height, width)


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


def parse_image_entries(
    images: list, json_file: str, image_root: str
) -> tuple[list[dict], np.ndarray, dict]:
    """Records without annotations, sizes [N, 2] as (height, width), image id -> record index."""
    records = []
    for i, image in enumerate(images):
        try:
            records.append(
                {
                    "file_name": os.path.join(image_root, image["file_name"]),
                    "image_id": int(image["id"]),
                    "height": int(image["height"]),
                    "width": int(image["width"]),
                    "annotations": [],
                }
            )
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
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
        if count and boxes.shape != (count, 4):  # e.g. nested bboxes [[x, y, w, h]]
            raise ValueError("a bbox is not [x, y, w, h]")
        boxes = boxes.reshape(count, 4)
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
        if not all(v is None or type(v) in (int, float) for v in bbox):
            raise ValueError(f"{where} has non-numeric bbox {bbox!r}.")


def _validate_boxes(
    boxes: np.ndarray, image_sizes: np.ndarray, anns: list, json_file: str
) -> tuple[np.ndarray, np.ndarray]:
    """COCO [x, y, w, h] -> XYXY clipped to the image, and which boxes to keep."""
    non_finite = ~np.isfinite(boxes).all(axis=1)
    degenerate = non_finite | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    limits = np.stack([image_sizes[:, 1], image_sizes[:, 0]] * 2, axis=1)
    clipped = np.clip(xyxy, 0.0, limits)
    outside = ~degenerate & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    changed = ~degenerate & ~outside & (clipped != xyxy).any(axis=1)

    def ids(flags: np.ndarray) -> list:
        return [anns[i].get("id", f"#{i}") for i in np.flatnonzero(flags)]

    _summary(
        json_file, ids(non_finite), "box(es) with non-finite values (NaN or infinity) were skipped"
    )
    _summary(
        json_file,
        ids(degenerate & ~non_finite),
        "box(es) without area (width or height <= 0) were skipped",
    )
    _summary(json_file, ids(outside), "box(es) entirely outside their image were skipped")
    _summary(json_file, ids(changed), "box(es) partly outside their image were clipped to it")
    return clipped, ~degenerate & ~outside


def _summary(json_file: str, ann_ids: list, what: str) -> None:
    if ann_ids:
        listed = ", ".join(str(i) for i in ann_ids[:_LISTED_IDS])
        more = ", ..." if len(ann_ids) > _LISTED_IDS else ""
        logger.warning(
            "%s: %d %s (annotation ids %s%s).", json_file, len(ann_ids), what, listed, more
        )


def _set_metadata(dataset_name: str, metadata: dict[str, Any], json_file: str) -> None:
    current = vars(get_metadata(dataset_name))
    for key, value in metadata.items():
        if key in current and current[key] != value:
            raise ValueError(
                f"Dataset '{dataset_name}' was registered with {key}={current[key]!r}, but its "
                f"annotation file '{json_file}' gives {value!r}."
            )
        current[key] = value
