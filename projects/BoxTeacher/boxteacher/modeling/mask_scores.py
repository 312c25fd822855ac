"""BoxTeacher's mask-aware score of a detection: its FCOS score combined with the mean foreground
probability of its mask (used to rank detections at inference and to weigh pseudo masks)."""
from __future__ import annotations

import torch

from .layers import boxes_to_masks


def mean_foreground_probability(
    mask_probs: torch.Tensor, threshold: float = 0.5, boxes: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean probability over the pixels predicted as foreground: sum(P * [P > t]) / (sum([P > t])
    + 1e-6). With ``boxes`` (M, 4) XYXY, only pixels inside each box count (the paper's
    variant). mask_probs: (M, h, w). Returns (M,)."""
    foreground = mask_probs > threshold
    if boxes is not None:
        foreground &= boxes_to_masks(boxes, mask_probs.shape[-2:])
    count = foreground.sum(dim=(1, 2)).to(mask_probs.dtype)
    return foreground_mean(torch.where(foreground, mask_probs, 0.0), count)


def foreground_mean(foreground_probs: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """sum(P) / (count + 1e-6) of probabilities P (M, h, w) that are zero outside the ``count``
    (M,) foreground pixels of each map. Returns (M,)."""
    return foreground_probs.sum(dim=(1, 2)) / (count + 1e-6)


def mask_aware_scores(
    fcos_scores: torch.Tensor, mean_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's mask-aware scores of detections with FCOS scores c and mean
    foreground probabilities m: the ranking score sqrt(c * m) and the pseudo-mask loss weight
    sqrt(sqrt(c) * m) = c^(1/4) m^(1/2). Both (M,)."""
    return torch.sqrt(fcos_scores * mean_probs), torch.sqrt(torch.sqrt(fcos_scores) * mean_probs)
