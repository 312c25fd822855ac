"""Turning one image's detections and stride-4 mask probabilities into output-frame results."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layers import aligned_bilinear


def upsample_mask_probs(
    mask_probs: torch.Tensor, stride: int, input_size: tuple[int, int], output_size: tuple[int, int]
) -> torch.Tensor:
    """Mask probabilities over the padded input at ``stride`` -> probabilities at ``output_size``.

    Aligned-bilinear upsampling by ``stride``, crop to the unpadded ``input_size`` (h, w), then
    bilinear resizing (align_corners=False) to ``output_size``. Only the rows and columns that
    reach the crop are upsampled; the result equals upsampling the whole padded map.

    mask_probs: (M, 1, H/stride, W/stride). Returns (M, out_h, out_w).
    """
    h, w = input_size
    rows = min(math.ceil(h / stride) + 1, mask_probs.shape[-2])
    cols = min(math.ceil(w / stride) + 1, mask_probs.shape[-1])
    probs = aligned_bilinear(mask_probs[:, :, :rows, :cols], stride)[:, :, :h, :w]
    if (h, w) != tuple(output_size):
        probs = F.interpolate(probs, size=tuple(output_size), mode="bilinear", align_corners=False)
    return probs[:, 0]


def rescale_boxes(boxes: torch.Tensor, input_size: tuple[int, int], output_size: tuple[int, int]) -> torch.Tensor:
    """(M, 4) XYXY boxes of an ``input_size`` (h, w) image -> the ``output_size`` frame,
    clipped to the output image."""
    h, w = input_size
    out_h, out_w = output_size
    boxes = boxes * boxes.new_tensor([out_w / w, out_h / h, out_w / w, out_h / h])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=out_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=out_h)
    return boxes


def detections_to_output_frame(
    detections: dict[str, torch.Tensor],
    mask_probs: torch.Tensor,
    mask_stride: int,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Rescale one image's detections from the network input frame to ``output_size``.

    Args:
        detections: ``boxes`` (M, 4) in the input frame, ``scores``, ``labels`` (M,).
        mask_probs: (M, 1, H/stride, W/stride) probabilities over the padded input.
        input_size: unpadded (h, w) of the network input; output_size: (height, width).
    Returns:
        ``boxes`` (clipped to the output image; boxes that become empty are dropped),
        ``scores``, ``labels``, ``mask_probs`` (M', height, width) and ``masks`` (bool,
        probability > ``mask_threshold``); ``fpn_levels`` and ``locations`` (input frame) of
        the kept detections when ``detections`` has them.
    """
    boxes = rescale_boxes(detections["boxes"], input_size, output_size)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    probs = upsample_mask_probs(mask_probs[keep], mask_stride, input_size, output_size)
    origin = {k: detections[k][keep] for k in ("fpn_levels", "locations") if k in detections}
    return {
        "boxes": boxes[keep],
        "scores": detections["scores"][keep],
        "labels": detections["labels"][keep],
        "mask_probs": probs,
        "masks": probs > mask_threshold,
        **origin,
    }
