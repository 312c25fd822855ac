"""Edge-aware refinement of masks with the colour guided filter (He, Sun and Tang, "Guided Image
Filtering", ECCV 2010 / TPAMI 2013).

A teacher's masks come from a stride-4 map: their boundaries are blurred over a few pixels. In
every window of the image the filter fits the mask as a linear function of the colour, so a
refined mask changes where the colour changes and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import boxes_to_masks


def window_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1) x (2r+1) window of every pixel, the part inside the image only.
    x: (N, C, H, W) -> (N, C, H, W)."""
    return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Filter every map of ``src`` with the colour image ``guide``.

    In each window w the output is a_w . I + b_w, the least-squares fit of the source with
    regularisation ``eps`` on a_w; every pixel averages the fits of the windows covering it.
    The guide's statistics (its 3x3 colour covariance per window) are computed once for all maps.

    Args:
        guide: (C, H, W) float image, values in [0, 1] for the usual ``eps`` (C = 3, or 1).
        src: (N, H, W) float maps (masks or probabilities).
        radius: window radius in pixels; eps: regularisation (larger: smoother).
    Returns:
        (N, H, W) filtered maps (not clamped: values may leave [0, 1] slightly).
    """
    if src.shape[0] == 0:
        return src.clone()
    channels = guide.shape[0]
    image = guide[None].to(src.dtype)  # (1, C, H, W)
    mean_i = window_mean(image, radius)[0]  # (C, H, W)
    products = torch.stack([image[0, i] * image[0, j] for i in range(channels) for j in range(channels)])
    second = window_mean(products[None], radius)[0].view(channels, channels, *guide.shape[1:])
    covariance = second - mean_i[:, None] * mean_i[None, :]  # (C, C, H, W)
    regularised = covariance.permute(2, 3, 0, 1) + eps * torch.eye(channels, dtype=src.dtype, device=src.device)
    inverse = torch.linalg.inv(regularised)  # (H, W, C, C)

    source = src[:, None]  # (N, 1, H, W)
    mean_p = window_mean(source, radius)  # (N, 1, H, W)
    cross = window_mean(image * source, radius) - mean_i[None] * mean_p  # (N, C, H, W)
    a = torch.einsum("hwij,njhw->nihw", inverse, cross)
    b = mean_p - (a * mean_i[None]).sum(dim=1, keepdim=True)
    return ((window_mean(a, radius) * image).sum(dim=1, keepdim=True) + window_mean(b, radius))[:, 0]


@dataclass(frozen=True)
class MaskRefinement:
    """Guided-filter refinement of pseudo masks (``MODEL.BOX_TEACHER.REFINE_RADIUS``, ``REFINE_EPS``).

    radius: window radius in pixels of the masks' frame (about the mask stride);
    eps: regularisation, for colours scaled to [0, 1].
    """

    radius: int = 4
    eps: float = 0.01

    def __call__(self, image: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Refine each mask inside its box; zero outside it.

        The filter runs on each box grown by twice the radius (all a pixel's output depends
        on), so inside the box the result equals filtering the whole image, at the cost of the
        box's area.

        image: (C, H, W) uint8 (any channel order); masks: (N, H, W) bool or probabilities;
        boxes: (N, 4) XYXY in pixels of the same frame.
        Returns (N, H, W) float refined probabilities in [0, 1].
        """
        guide = image.to(device=masks.device, dtype=torch.float32) / 255.0
        inside = boxes_to_masks(boxes.to(masks.device, torch.float32), tuple(masks.shape[-2:]))
        out = torch.zeros(masks.shape, dtype=torch.float32, device=masks.device)
        margin = 2 * self.radius
        height, width = masks.shape[-2:]
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            top, left = max(int(y0) - margin, 0), max(int(x0) - margin, 0)
            bottom, right = min(int(y1) + 1 + margin, height), min(int(x1) + 1 + margin, width)
            if bottom <= top or right <= left:
                continue
            crop = masks[i : i + 1, top:bottom, left:right].float()
            refined = guided_filter(guide[:, top:bottom, left:right], crop, self.radius, self.eps)
            out[i, top:bottom, left:right] = refined[0]
        return out.clamp_(0.0, 1.0) * inside
