"""COCO segmentations: validation (shared by training and evaluation) and rasterisation.

A segmentation is a list of polygons, each a flat list of numbers ``[x1, y1, x2, y2, ...]``, or
an RLE dict ``{"size": [height, width], "counts": ...}`` whose counts are a list of non-negative
integers (uncompressed) or a string (compressed). Rules:

- anything else (a flat or nested polygon, a string polygon, non-finite coordinates, an RLE
  without ``size`` or ``counts``, counts of the wrong type) is malformed: ``clean_segmentation``
  raises a ``ValueError`` saying what is wrong with the field, the caller adds file and annotation;
- a polygon with fewer than 3 points (or an odd number of coordinates) cannot be rasterised and is
  dropped, as is an RLE whose size is not its image's size or whose counts do not add up to
  height x width (pycocotools would decode garbage or spin in ``COCOeval.computeIoU``);
  an annotation left without a mask stays as a box.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from .rle import segmentation_to_rle

# Why a mask was dropped, as written in the loader's summary warnings.
DROPPED_POLYGON = "polygon(s) with fewer than 3 points were dropped"
DROPPED_RLE_SIZE = "RLE mask(s) whose size is not their image's (height, width) were dropped"
DROPPED_RLE_COUNTS = "RLE mask(s) whose counts do not add up to height x width were dropped"

_NUMBER_TYPES = frozenset((int, float))  # not bool: True is no coordinate
_POLYGON_FORMAT = "a list of polygons, each a flat list of numbers [x1, y1, x2, y2, ...]"


def clean_segmentation(
    segmentation: Any, height: int, width: int
) -> tuple[list | dict | None, str | None]:
    """The usable part of ``segmentation`` (None if nothing) and why a part was dropped (None if
    nothing was), for an image of ``height`` x ``width``; ``[]`` means no mask.

    Raises:
        ValueError: the segmentation is malformed; the message describes the field.
    """
    if isinstance(segmentation, list):
        return _clean_polygons(segmentation)
    if isinstance(segmentation, dict):
        return _clean_rle(segmentation, height, width)
    raise ValueError(
        f"has segmentation {_short(segmentation)}; expected {_POLYGON_FORMAT} or an RLE dict "
        "with 'size' and 'counts'"
    )


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (list of flat [x, y, ...] lists, merged) or an RLE dict
    (compressed or uncompressed ``counts``) to a bool mask [height, width]; all False when
    there is no usable polygon."""
    rle = segmentation_to_rle(segmentation, height, width)
    if rle is None:
        return np.zeros((height, width), dtype=bool)
    return mask_util.decode(rle).astype(bool)


def _clean_polygons(polygons: list) -> tuple[list | None, str | None]:
    for k, polygon in enumerate(polygons):
        if not (isinstance(polygon, list) and _NUMBER_TYPES.issuperset(map(type, polygon))):
            raise ValueError(
                f"has segmentation polygon #{k} {_short(polygon)}; expected {_POLYGON_FORMAT}"
            )
        if not math.isfinite(sum(polygon)):
            raise ValueError(f"has non-finite coordinates in segmentation polygon #{k}")
    kept = [p for p in polygons if len(p) >= 6 and len(p) % 2 == 0]
    return (kept or None), (DROPPED_POLYGON if len(kept) < len(polygons) else None)


def _clean_rle(rle: dict, height: int, width: int) -> tuple[dict | None, str | None]:
    size, counts = rle.get("size"), rle.get("counts")
    if not (
        isinstance(size, list) and len(size) == 2 and all(type(v) is int and v >= 0 for v in size)
    ):
        raise ValueError(
            f"has an RLE segmentation with size {_short(size)}; expected [height, width]"
        )
    if isinstance(counts, str):
        runs = _compressed_counts(counts)
    elif isinstance(counts, list) and all(type(v) is int for v in counts):
        runs = counts
    else:
        raise ValueError(
            f"has an RLE segmentation with counts {_short(counts)}; expected a list of "
            "integers or a compressed string"
        )
    if size != [height, width]:
        return None, DROPPED_RLE_SIZE
    if any(v < 0 for v in runs) or sum(runs) != height * width:
        return None, DROPPED_RLE_COUNTS
    return {"size": size, "counts": counts}, None


def _compressed_counts(text: str) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' ``rleFrString``)."""
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("has a compressed RLE string that ends in the middle of a count")
            char = ord(text[position]) - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."
