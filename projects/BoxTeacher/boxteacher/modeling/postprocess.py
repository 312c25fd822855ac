"""Turning detections and stride-4 mask probabilities into output-frame results."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .layers import aligned_bilinear
from .mask_scores import foreground_mean

# The most float probabilities at the output resolution that ``paste_masks`` holds at once (besides
# those of one detection, its floor): 2^24 values, 64 MiB in float32 (15 detections of 800x1333).
PASTE_CHUNK_PIXELS = 1 << 24


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


def linear_taps(positions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The linear interpolation of a sequence of ``length`` values at the float32 ``positions``
    (P,), as PyTorch's bilinear kernels compute it: the lower and upper indices (P,) and the
    weight of the upper one (P,)."""
    low = np.minimum(np.floor(positions).astype(np.int64), length - 1)
    return low, np.minimum(low + 1, length - 1), np.clip(positions - low.astype(np.float32), 0, 1)


def upsampling_matrix(
    map_length: int, stride: int, input_length: int, output_length: int
) -> np.ndarray:
    """``upsample_mask_probs`` along one axis as a (output_length, map_length) float64 matrix of
    weights of the map's rows (or columns); equal to it up to float rounding."""
    rows = min(math.ceil(input_length / stride) + 1, map_length)
    # Aligned-bilinear: pixel t reads the map, its last row repeated, at max(t - s//2, 0) / s.
    shifted = np.maximum(np.arange(input_length) - stride // 2, 0).astype(np.float32)
    low, high, weight = linear_taps(shifted * np.float32(1 / stride), rows + 1)
    matrix = np.zeros((input_length, map_length))
    np.add.at(matrix, (np.arange(input_length), np.minimum(low, rows - 1)), 1 - weight)
    np.add.at(matrix, (np.arange(input_length), np.minimum(high, rows - 1)), weight)
    if input_length == output_length:
        return matrix
    scale = np.float32(input_length) / np.float32(output_length)
    sources = scale * (np.arange(output_length, dtype=np.float32) + np.float32(0.5)) - np.float32(
        0.5
    )
    low, high, weight = linear_taps(np.maximum(sources, np.float32(0)), input_length)
    return (1 - weight[:, None]) * matrix[low] + weight[:, None] * matrix[high]


def upsampling_weights(
    map_size: tuple[int, int],
    stride: int,
    input_sizes: list[tuple[int, int]],
    output_sizes: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``upsample_mask_probs`` of the images of a batch as matrices (float32, on the host):
    row weights (sum of heights, map_h) and column weights (map_w, sum of widths), the images'
    one after the other; with image i's blocks R_i and C_i, R_i @ probs @ C_i upsamples
    probabilities (map_h, map_w) to its output size."""
    rows = np.concatenate(
        [
            upsampling_matrix(map_size[0], stride, h, out_h)
            for (h, _), (out_h, _) in zip(input_sizes, output_sizes)
        ]
    )
    cols = np.concatenate(
        [
            upsampling_matrix(map_size[1], stride, w, out_w)
            for (_, w), (_, out_w) in zip(input_sizes, output_sizes)
        ]
    )
    return torch.from_numpy(rows.astype(np.float32)), torch.from_numpy(cols.T.astype(np.float32))


def paste_masks(
    mask_probs: torch.Tensor,
    stride: int,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    threshold: float,
    chunk_pixels: int = PASTE_CHUNK_PIXELS,
    encode: Callable[[torch.Tensor], list[Any]] | None = None,
) -> tuple[torch.Tensor | list[Any], torch.Tensor]:
    """Binary masks at ``output_size`` and mean foreground probabilities of detections whose
    probabilities ``mask_probs`` (M, 1, H/stride, W/stride) cover the padded input (unpadded
    size ``input_size``): ``binarise_in_chunks`` of ``upsample_mask_probs``. Masks are not
    clipped to boxes (CondInst's masks may extend past their box)."""

    def probabilities(chunk: slice) -> torch.Tensor:
        probs = upsample_mask_probs(mask_probs[chunk], stride, input_size, output_size)
        # Without resampling, a view of mask_probs, which binarise_in_chunks zeroes in place.
        return probs.clone() if stride == 1 and tuple(input_size) == tuple(output_size) else probs

    return binarise_in_chunks(
        mask_probs.shape[0],
        probabilities,
        output_size,
        threshold,
        chunk_pixels,
        encode,
        mask_probs.device,
        mask_probs.dtype,
    )


def binarise_in_chunks(
    num: int,
    probabilities: Callable[[slice], torch.Tensor],
    output_size: tuple[int, int],
    threshold: float,
    chunk_pixels: int = PASTE_CHUNK_PIXELS,
    encode: Callable[[torch.Tensor], list[Any]] | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | list[Any], torch.Tensor]:
    """Binary masks at ``output_size`` and mean foreground probabilities of ``num`` detections,
    with the float probabilities at the output resolution bounded by ``chunk_pixels`` values (or
    one detection's, if more), not by detections x output pixels. With ``encode`` (a chunk's bool
    masks (c, out_h, out_w) -> c encoded masks, e.g. COCO RLEs), the masks are handed over a
    chunk at a time and returned encoded, so that nothing at the output resolution outlives its
    chunk.

    probabilities: the (c, out_h, out_w) probabilities of a slice of the detections (a fresh
    tensor: it is zeroed in place). Each chunk's probabilities give its masks (probability >
    ``threshold``) and, zeroed outside them, the masks' mean probabilities (as
    ``mean_foreground_probability`` with no box), then are freed. The results equal those of all
    the detections at once. Returns masks (num, out_h, out_w) bool (or num encoded masks) and
    mean probabilities (num,).
    """
    out_h, out_w = output_size
    masks = [] if encode else torch.empty((num, out_h, out_w), dtype=torch.bool, device=device)
    means = torch.empty((num,), dtype=dtype, device=device)
    step = max(1, chunk_pixels // max(1, out_h * out_w))
    for start in range(0, num, step):
        chunk = slice(start, start + step)
        probs = probabilities(chunk)
        foreground = (
            torch.gt(probs, threshold) if encode else torch.gt(probs, threshold, out=masks[chunk])
        )
        # One count per mask: summing the (c, h, w) bools at once first copies them as int64.
        count = torch.stack([torch.count_nonzero(m) for m in foreground]).to(probs.dtype)
        means[chunk] = foreground_mean(probs.masked_fill_(~foreground, 0.0), count)
        del probs
        if encode:
            masks.extend(encode(foreground))
    return masks, means


def rescale_boxes(
    boxes: torch.Tensor, input_size: tuple[int, int], output_size: tuple[int, int]
) -> torch.Tensor:
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
    chunk_pixels: int = PASTE_CHUNK_PIXELS,
    encode_masks: Callable[[torch.Tensor], list[Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Rescale one image's detections from the network input frame to ``output_size``.

    Args:
        detections: ``boxes`` (M, 4) in the input frame, ``scores``, ``labels`` (M,).
        mask_probs: (M, 1, H/stride, W/stride) probabilities over the padded input.
        input_size: unpadded (h, w) of the network input; output_size: (height, width).
    Returns:
        ``boxes`` (clipped to the output image; boxes that become empty are dropped),
        ``scores``, ``labels``, ``masks`` (M', height, width) bool (probability >
        ``mask_threshold``; with ``encode_masks``, a list of the masks it encoded, see
        ``paste_masks``) and ``mask_means`` (M',) the mean foreground probability of each mask
        (``mean_foreground_probability``); ``fpn_levels`` and ``locations`` (input frame) of the
        kept detections when ``detections`` has them. The float probabilities at the output
        resolution are never all held at once (see ``paste_masks``, ``chunk_pixels``).
    """
    boxes = rescale_boxes(detections["boxes"], input_size, output_size)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    masks, means = paste_masks(
        mask_probs[keep],
        mask_stride,
        input_size,
        output_size,
        mask_threshold,
        chunk_pixels,
        encode_masks,
    )
    origin = {k: detections[k][keep] for k in ("fpn_levels", "locations") if k in detections}
    return {
        "boxes": boxes[keep],
        "scores": detections["scores"][keep],
        "labels": detections["labels"][keep],
        "masks": masks,
        "mask_means": means,
        **origin,
    }
