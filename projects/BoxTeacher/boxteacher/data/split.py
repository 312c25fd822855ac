"""A COCO json split into a labelled fraction of its images and the unlabelled rest, for
semi-supervised training (``tools/split_dataset.py``).

The labelled images are ``round(fraction * N)`` of the N images, drawn with
``numpy.random.default_rng(seed)``: the same file, fraction and seed give the same split on any
machine (Guided Distillation's split script draws without a seed). Both parts keep the input's
other top-level fields and its categories, so that they map classes alike; the labelled part keeps
the annotations of its images, the unlabelled part has none.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CocoSplit:
    """The two COCO dicts of a split and the ids of the labelled images (sorted)."""

    labeled: dict[str, Any]
    unlabeled: dict[str, Any]
    labeled_image_ids: list[int]


def split_coco(data: dict[str, Any], fraction: float, seed: int) -> CocoSplit:
    """Split the images of a COCO instances dict into ``round(fraction * N)`` labelled ones
    (with their annotations) and the unlabelled rest (without annotations); images keep their
    order. ``data`` is not modified.

    Raises ``ValueError`` when ``fraction`` is not strictly between 0 and 1, or when it leaves one
    of the parts without images."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"The labelled fraction must be strictly between 0 and 1 (a part of the images), "
            f"got {fraction}."
        )
    images = data["images"]
    count = round(fraction * len(images))
    if not 0 < count < len(images):
        raise ValueError(
            f"A labelled fraction of {fraction} of {len(images)} images leaves "
            f"{'no labelled' if count == 0 else 'no unlabelled'} image; choose a fraction "
            f"between {1 / len(images) if images else 0:.3g} and "
            f"{1 - 1 / len(images) if images else 0:.3g}."
        )
    is_labeled = labeled_image_flags(len(images), fraction, seed)
    labeled_ids = {images[i]["id"] for i in np.flatnonzero(is_labeled).tolist()}
    rest = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    labeled = {
        **rest,
        "images": [image for image, kept in zip(images, is_labeled) if kept],
        "annotations": [a for a in data["annotations"] if a["image_id"] in labeled_ids],
    }
    unlabeled = {
        **rest,
        "images": [image for image, kept in zip(images, is_labeled) if not kept],
        "annotations": [],
    }
    return CocoSplit(labeled, unlabeled, sorted(labeled_ids))


def labeled_image_flags(num_images: int, fraction: float, seed: int) -> np.ndarray:
    """bool (num_images,): which of the images (in the json's order) a split of ``fraction``
    and ``seed`` labels (``round(fraction * num_images)`` of them)."""
    count = round(fraction * num_images)
    chosen = np.random.default_rng(seed).choice(num_images, size=count, replace=False)
    flags = np.zeros(num_images, dtype=bool)
    flags[chosen] = True
    return flags


def split_file_names(json_file: str, fraction: float, seed: int) -> tuple[str, str]:
    """``<stem>_<percent>pct_seed<seed>_labeled.json`` and ``..._unlabeled.json`` of a json file:
    e.g. ``instances_train2017_10pct_seed1_labeled.json`` for 0.1 and seed 1."""
    stem = os.path.splitext(os.path.basename(json_file))[0]
    tag = f"{stem}_{fraction * 100:g}pct_seed{seed}"
    return f"{tag}_labeled.json", f"{tag}_unlabeled.json"
