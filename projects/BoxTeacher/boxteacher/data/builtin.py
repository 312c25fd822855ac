"""Datasets known by name, and datasets that a config registers by path.

The datasets root is the environment variable ``DETECTRON2_DATASETS`` (read when
``boxteacher.data`` is imported), else ``datasets`` relative to the working directory; the expected
layout is in ``datasets/README.md``. Registration reads no file: a missing file is reported when
the dataset is first used.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from .catalog import get_dataset_records, get_metadata, register_dataset
from .coco import coco_json_metadata, load_coco_json, register_coco_instances
from .shapes import SHAPES_CATEGORIES, ensure_shapes_dataset, shapes_paths
from .split import labeled_image_flags
from .unlabeled import register_unlabeled_images

# name -> (annotation json, image folder), relative to the datasets root.
BUILTIN_COCO = {
    "coco_2017_train": ("coco/annotations/instances_train2017.json", "coco/train2017"),
    "coco_2017_val": ("coco/annotations/instances_val2017.json", "coco/val2017"),
    "coco_2017_val_100": ("coco/annotations/instances_val2017_100.json", "coco/val2017"),
}


# Semi-supervised splits of built-in training sets, drawn with SPLIT_SEED as
# tools/split_dataset.py draws them: "<name>_<p>pct" (the labelled images) and
# "<name>_<p>pct_unlabeled" (the rest, without annotations).
SPLIT_PERCENTS = {"shapes_train": (10, 30), "coco_2017_train": (1, 2, 5, 10)}
SPLIT_SEED = 1


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` or ``datasets``."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def register_builtin_datasets(root: str | None = None) -> None:
    """Register the COCO 2017 splits, the synthetic ``shapes_train`` / ``shapes_val`` and the
    semi-supervised splits of ``SPLIT_PERCENTS``."""
    root = datasets_root() if root is None else root
    for name, (json_rel, image_rel) in BUILTIN_COCO.items():
        json_file, image_root = os.path.join(root, json_rel), os.path.join(root, image_rel)
        register_dataset(
            name,
            partial(_load_builtin_coco, name, json_file, image_root),
            lazy_metadata=partial(_builtin_coco_metadata, name, json_file, image_root),
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
        )
    ids = sorted(SHAPES_CATEGORIES)
    for split in ("train", "val"):
        name = f"shapes_{split}"
        register_dataset(
            name,
            partial(_load_shapes, root, split, name),
            lazy_metadata=partial(_shapes_files, root, split),
            thing_classes=[SHAPES_CATEGORIES[i] for i in ids],
            thing_dataset_id_to_contiguous_id={cid: k for k, cid in enumerate(ids)},
            evaluator_type="coco",
        )
    _register_builtin_splits()


def _register_builtin_splits() -> None:
    """Register the labelled and unlabelled parts of ``SPLIT_PERCENTS`` (nothing is read until
    they are used; their classes are those of the whole set)."""
    for base, percents in SPLIT_PERCENTS.items():
        for percent in percents:
            name = f"{base}_{percent}pct"
            register_dataset(
                name,
                partial(_split_records, base, percent / 100, True),
                lazy_metadata=partial(_base_classes, base),
                evaluator_type="coco",
            )
            register_dataset(
                f"{name}_unlabeled",
                partial(_split_records, base, percent / 100, False),
                unlabeled=True,
            )


def register_datasets_from_config(cfg) -> None:
    """Register every ``[name, annotation_json, image_folder]`` of ``cfg.DATASETS.REGISTER`` and
    every ``[name, source]`` or ``[name, json, image_folder]`` of
    ``cfg.DATASETS.REGISTER_UNLABELED`` (``register_unlabeled_images``)."""
    for entry in cfg.DATASETS.REGISTER:
        if not _strings(entry, (3,)):
            raise ValueError(
                f"DATASETS.REGISTER entry {entry!r} must be [name, annotation_json, image_folder] "
                "(three non-empty strings)."
            )
        register_coco_instances(*entry)
    for entry in cfg.DATASETS.REGISTER_UNLABELED:
        if not _strings(entry, (2, 3)):
            raise ValueError(
                f"DATASETS.REGISTER_UNLABELED entry {entry!r} must be [name, json_or_folder] or "
                "[name, json, image_folder] (non-empty strings)."
            )
        register_unlabeled_images(*entry)


def _strings(entry, lengths: tuple[int, ...]) -> bool:
    """Whether ``entry`` is a list of ``lengths`` non-empty strings."""
    return (
        isinstance(entry, (list, tuple))
        and len(entry) in lengths
        and all(isinstance(v, str) and v for v in entry)
    )


def _require(name: str, *paths: str) -> None:
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Dataset '{name}' expects '{path}', which does not exist. Set "
                "DETECTRON2_DATASETS to the folder that holds 'coco/' (default: ./datasets); the "
                "layout is described in datasets/README.md."
            )


def _load_builtin_coco(name: str, json_file: str, image_root: str) -> list[dict]:
    _require(name, json_file, image_root)
    return load_coco_json(json_file, image_root, name)


def _builtin_coco_metadata(name: str, json_file: str, image_root: str) -> dict[str, Any]:
    _require(name, json_file, image_root)
    return coco_json_metadata(json_file, image_root)


def _load_shapes(root: str, split: str, name: str) -> list[dict]:
    ensure_shapes_dataset(root)
    json_file, image_root = shapes_paths(root, split)
    return load_coco_json(json_file, image_root, name)


def _shapes_files(root: str, split: str) -> dict[str, str]:
    ensure_shapes_dataset(root)
    json_file, image_root = shapes_paths(root, split)
    return {"json_file": json_file, "image_root": image_root}


def _split_records(base: str, fraction: float, labeled: bool) -> list[dict]:
    """The records of ``base`` in the labelled (or, without their annotations, the unlabelled)
    part of its split of ``fraction``."""
    records = get_dataset_records(base)
    flags = labeled_image_flags(len(records), fraction, SPLIT_SEED)
    if labeled:
        return [r for r, keep in zip(records, flags) if keep]
    return [{**r, "annotations": []} for r, keep in zip(records, flags) if not keep]


def _base_classes(base: str) -> dict[str, Any]:
    metadata = get_metadata(base)
    return {
        "thing_classes": metadata.thing_classes,
        "thing_dataset_id_to_contiguous_id": metadata.thing_dataset_id_to_contiguous_id,
    }
