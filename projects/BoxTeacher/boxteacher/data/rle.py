"""COCO run-length encodings (RLE) of masks and of COCO segmentations, through pycocotools.

The one place where masks become RLEs (evaluation results, pseudo-mask export, demo results,
the synthetic dataset) and where COCO segmentations (polygons or RLEs) become RLEs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch

__all__ = ["encode_rle", "segmentation_to_rle"]


def encode_rle(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """COCO RLEs of bool (N, H, W) masks (a NumPy array or a tensor on any device), one dict
    ``{"size": [H, W], "counts": str}`` per mask, JSON-serialisable.

    The masks are encoded one at a time, so only one (H, W) mask is copied into the Fortran
    order pycocotools wants: 1 GB for ten 12000x9000 masks if they were copied together."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if masks.ndim != 3:
        raise ValueError(f"encode_rle takes masks of shape (N, H, W), got {masks.shape}.")
    rles = []
    for mask in masks:
        pixels = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).astype(np.uint8)
        rle = mask_util.encode(np.asfortranarray(pixels[:, :, None]))[0]
        rles.append(
            {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        )
    return rles


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict | None:
    """The compressed RLE of a COCO segmentation of an image of ``height`` x ``width``:
    polygons (a list of flat [x, y, ...] lists, merged; those with fewer than 3 points or an odd
    length are left out) or an RLE dict with compressed or uncompressed (list) ``counts``.
    None when there is no segmentation or no usable polygon."""
    if isinstance(segmentation, dict):
        if isinstance(segmentation.get("counts"), list):
            return mask_util.frPyObjects(segmentation, height, width)
        return segmentation
    if isinstance(segmentation, (list, tuple)):
        polygons = [list(p) for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if polygons:
            return mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    return None
