"""BoxTeacher's mask-aware score of a detection: its FCOS score combined with the mean foreground
probability of its mask (used to rank detections at inference and to weigh pseudo masks)."""

from __future__ import annotations

import torch

from .layers import inside_boxes


def mean_foreground_probability(
    mask_probs: torch.Tensor, threshold: float = 0.5, boxes: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean probability over the pixels predicted as foreground: sum(P * [P > t]) / (sum([P > t])
    + 1e-6). With ``boxes`` (M, 4) XYXY, only pixels inside each box count (the paper's
    variant). mask_probs: (M, h, w). Returns (M,)."""
    return mean_of_sums(*foreground_sums(mask_probs, threshold, boxes))


def foreground_sums(
    mask_probs: torch.Tensor, threshold: float, boxes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(P * [P > t]) and sum([P > t]) of maps P (M, h, w), inside ``boxes`` (M, 4) XYXY
    only if given (see ``mean_foreground_probability``). Returns both (M,).

    One (M, h, w) temporary, a float foreground map reused for the products: on a CPU, summing
    bools and fresh large tensors cost more than passes over floats."""
    foreground = torch.gt(mask_probs, threshold, out=torch.empty_like(mask_probs))
    if boxes is None:
        count = foreground.sum(dim=(1, 2))
        return foreground.mul_(mask_probs).sum(dim=(1, 2)), count
    rows, cols = (
        inside.to(mask_probs.dtype) for inside in inside_boxes(boxes, mask_probs.shape[-2:])
    )
    count = region_sum(foreground, rows, cols)
    return region_sum(foreground.mul_(mask_probs), rows, cols), count


def mean_of_sums(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The mean sum / (count + 1e-6) of foreground probabilities from their sum and count."""
    return total / (count + 1e-6)


def region_sum(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Sums of maps (M, H, W) over the pixels of rows (M, H) and columns (M, W) weighted 0 or 1:
    rows^T @ map @ cols of each map. Returns (M,)."""
    return torch.bmm(rows[:, None, :], torch.bmm(maps, cols[:, :, None]))[:, 0, 0]


def foreground_mean(foreground_probs: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """sum(P) / (count + 1e-6) of probabilities P (M, h, w) that are zero outside the ``count``
    (M,) foreground pixels of each map. Returns (M,)."""
    return mean_of_sums(foreground_probs.sum(dim=(1, 2)), count)


def mask_aware_scores(
    fcos_scores: torch.Tensor, mean_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's mask-aware scores of detections with FCOS scores c and mean
    foreground probabilities m: the ranking score sqrt(c * m) and the pseudo-mask loss weight
    sqrt(sqrt(c) * m) = c^(1/4) m^(1/2). Both (M,)."""
    return torch.sqrt(fcos_scores * mean_probs), torch.sqrt(torch.sqrt(fcos_scores) * mean_probs)
