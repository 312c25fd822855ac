"""Mixed supervision with a fraction of the masks (``MODEL.BOXINST.GT_MASKS "fraction"``): which
training images keep their annotation masks, chosen from the data seed so that a run can be
repeated, and the records with the other images' segmentations dropped."""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np

from ..utils import comm
from ..utils.io import atomic_open

logger = logging.getLogger(__name__)

MASK_IMAGE_IDS_FILE = "mask_image_ids.json"
# Image ids shown in the log line.
_LOGGED_IDS = 5


def has_annotation_mask(record: dict) -> bool:
    """Whether a non-crowd annotation of the record has a non-empty segmentation."""
    return any(a.get("segmentation") and not a.get("iscrowd", 0) for a in record["annotations"])


def select_mask_images(records: Sequence[dict], fraction: float, seed: int) -> list[int]:
    """The sorted image ids of ``round(fraction * M)`` images drawn with ``seed`` among the M
    records with an annotation mask; the same records, fraction and seed give the same ids."""
    candidates = sorted({r["image_id"] for r in records if has_annotation_mask(r)})
    count = round(fraction * len(candidates))
    chosen = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return sorted(candidates[i] for i in chosen.tolist())


def keep_masks_of(records: Sequence[dict], image_ids: Sequence[int]) -> list[dict]:
    """Copies of the records in which only the images of ``image_ids`` keep their segmentations."""
    kept = set(image_ids)
    return [
        record
        if record["image_id"] in kept
        else {
            **record,
            "annotations": [
                {k: v for k, v in a.items() if k != "segmentation"} for a in record["annotations"]
            ],
        }
        for record in records
    ]


def restrict_masks_to_fraction(
    records: Sequence[dict], fraction: float, seed: int, output_dir: str
) -> list[dict]:
    """``keep_masks_of(records, select_mask_images(records, fraction, seed))``; the chosen ids are
    logged and (main process) saved with the seed to ``output_dir/mask_image_ids.json``."""
    image_ids = select_mask_images(records, fraction, seed)
    num_candidates = sum(has_annotation_mask(r) for r in records)
    logger.info(
        "Mixed supervision: %d of the %d training images with masks keep them (fraction %g, seed "
        "%d); "
        "image ids %s%s",
        len(image_ids),
        num_candidates,
        fraction,
        seed,
        image_ids[:_LOGGED_IDS],
        " ..." if len(image_ids) > _LOGGED_IDS else "",
    )
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        with atomic_open(os.path.join(output_dir, MASK_IMAGE_IDS_FILE), "w") as f:
            json.dump(
                {
                    "fraction": fraction,
                    "seed": seed,
                    "num_images_with_masks": num_candidates,
                    "image_ids": image_ids,
                },
                f,
            )
    return keep_masks_of(records, image_ids)
