"""How well exported pseudo masks agree with the true masks of a COCO file: the mask IoU of every
box, its mean overall and per category, and the fraction of boxes that got a pseudo mask.

Report (``pseudo_mask_report``), over the non-crowd annotations; IoU means are None where no box
has a true mask::

    {"boxes", "matched", "matched_fraction", "boxes_with_masks",
     "mean_iou":          mean over the boxes with a true mask of the IoU with the exported mask (0
                          where the export has no mask; a box-filled mask where it has one),
     "mean_iou_matched":  the same over the matched boxes only,
     "per_category": [{"category_id", "name", <the same fields>}, ...]}
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from tabulate import tabulate

from ..data.rle import segmentation_to_rle


def _mask_iou(a: dict | None, b: dict) -> float:
    return 0.0 if a is None else float(mask_util.iou([a], [b], [0])[0, 0])


def _summary(matched: np.ndarray, iou: np.ndarray) -> dict[str, Any]:
    """Fields of one report row; ``iou`` is NaN for boxes without a true mask."""
    has_mask = ~np.isnan(iou)
    matched_with_mask = has_mask & matched

    def mean(values: np.ndarray) -> float | None:
        return float(values.mean()) if values.size else None

    return {
        "boxes": int(matched.size),
        "matched": int(matched.sum()),
        "matched_fraction": mean(matched.astype(np.float64)),
        "boxes_with_masks": int(has_mask.sum()),
        "mean_iou": mean(iou[has_mask]),
        "mean_iou_matched": mean(iou[matched_with_mask]),
    }


def pseudo_mask_report(original: dict[str, Any], exported: dict[str, Any]) -> dict[str, Any]:
    """Compare the exported COCO dict with the one it was made from (annotations in the same
    order; ``pseudo_mask_matched`` says which boxes got a mask). See the module docstring."""
    sizes = {
        image["id"]: (int(image["height"]), int(image["width"])) for image in original["images"]
    }
    pairs = [
        (a, b)
        for a, b in zip(original["annotations"], exported["annotations"])
        if not a.get("iscrowd", 0)
    ]
    categories = np.array([a["category_id"] for a, _ in pairs], dtype=np.int64)
    matched = np.array([bool(b.get("pseudo_mask_matched", False)) for _, b in pairs], dtype=bool)
    iou = np.full(len(pairs), np.nan)
    for i, (a, b) in enumerate(pairs):
        size = sizes[a["image_id"]]
        truth = segmentation_to_rle(a.get("segmentation"), *size)
        if truth is not None:
            iou[i] = _mask_iou(segmentation_to_rle(b.get("segmentation"), *size), truth)
    per_category = []
    for category in sorted(original["categories"], key=lambda c: c["id"]):
        selected = categories == category["id"]
        if selected.any():
            row = _summary(matched[selected], iou[selected])
            per_category.append({"category_id": category["id"], "name": category["name"], **row})
    return {**_summary(matched, iou), "per_category": per_category}


def report_table(report: dict[str, Any]) -> str:
    """A markdown table: one row per category and one for all boxes."""

    def cells(row: dict[str, Any]) -> list:
        return [
            row[k]
            for k in (
                "boxes",
                "matched_fraction",
                "boxes_with_masks",
                "mean_iou",
                "mean_iou_matched",
            )
        ]

    rows = [[c["name"], *cells(c)] for c in report["per_category"]] + [["all", *cells(report)]]
    headers = [
        "category",
        "boxes",
        "matched (fraction)",
        "with true mask",
        "mean IoU",
        "mean IoU (matched)",
    ]
    return tabulate(rows, headers=headers, tablefmt="github", floatfmt=".3f", missingval="-")
