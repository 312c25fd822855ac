"""Edge-aware refinement of masks with the colour guided filter (He, Sun and Tang, "Guided Image
Filtering", ECCV 2010 / TPAMI 2013).

A teacher's masks come from a stride-4 map: their boundaries are blurred over a few pixels. In
every window of the image the filter fits the mask as a linear function of the colour, so a
refined mask changes where the colour changes and nowhere else.

The guide's statistics (window means, inverse regularised colour covariances) are computed once
per image; all the masks of an image are then filtered together on crops of one common size
around their boxes (``MaskRefinement``), without host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def window_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1) x (2r+1) window of every pixel, the part inside the map only.
    x: (N, C, H, W) -> (N, C, H, W).

    Computed as sums along rows, then along columns (depthwise convolutions with zero padding),
    divided by the number of pixels of each window inside the map: ten times faster than
    ``avg_pool2d`` on a CPU, and exact up to float rounding."""
    channels, height, width = x.shape[1:]
    size = 2 * radius + 1
    ones = x.new_ones((channels, 1, 1, size))
    sums = F.conv2d(x, ones, padding=(0, radius), groups=channels)
    sums = F.conv2d(sums, ones.transpose(2, 3), padding=(radius, 0), groups=channels)
    return sums / (_window_counts(height, radius, x)[:, None] * _window_counts(width, radius, x)[None])


def _window_counts(length: int, radius: int, like: torch.Tensor) -> torch.Tensor:
    """(length,) number of positions of a 1-D window of this radius inside the range."""
    position = torch.arange(length, device=like.device)
    return ((position + radius).clamp(max=length - 1) - (position - radius).clamp(min=0) + 1).to(like.dtype)


def inverse_regularised_covariance(covariance: torch.Tensor, eps: float) -> torch.Tensor:
    """(Sigma + eps I)^-1 of symmetric C x C matrices in closed form (C = 1 or 3; the adjugate
    over the determinant for 3 x 3), elementwise over the trailing dimensions.
    covariance: (C, C, ...) -> (C, C, ...)."""
    channels = covariance.shape[0]
    if channels == 1:
        return 1.0 / (covariance + eps)
    if channels != 3:
        raise ValueError(f"The guided filter takes a guide of 1 or 3 channels, got {channels}")
    a, b, c = covariance[0, 0] + eps, covariance[0, 1], covariance[0, 2]
    d, e, f = covariance[1, 1] + eps, covariance[1, 2], covariance[2, 2] + eps
    cof_a, cof_b, cof_c = d * f - e * e, c * e - b * f, b * e - c * d
    cof_d, cof_e, cof_f = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * cof_a + b * cof_b + c * cof_c
    rows = ((cof_a, cof_b, cof_c), (cof_b, cof_d, cof_e), (cof_c, cof_e, cof_f))
    return torch.stack([torch.stack(row) for row in rows]) / det


def guide_statistics(guide: torch.Tensor, radius: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means (C, H, W) of a (C, H, W) float guide and the inverse regularised colour
    covariance of every window (C, C, H, W)."""
    channels = guide.shape[0]
    products = (guide[:, None] * guide[None, :]).reshape(channels * channels, *guide.shape[1:])
    means = window_mean(torch.cat([guide, products])[None], radius)[0]
    mean, second = means[:channels], means[channels:].view(channels, channels, *guide.shape[1:])
    covariance = second - mean[:, None] * mean[None, :]
    return mean, inverse_regularised_covariance(covariance, eps)


def filter_with_statistics(
    guide: torch.Tensor, mean: torch.Tensor, inverse: torch.Tensor, src: torch.Tensor, radius: int
) -> torch.Tensor:
    """The guided filter of N maps, each with its own guide and guide statistics.

    guide, mean: (N, C, H, W); inverse: (N, C, C, H, W) (see ``guide_statistics``);
    src: (N, H, W). Returns (N, H, W).
    """
    channels = guide.shape[1]
    source = src[:, None].to(guide.dtype)
    source_means = window_mean(torch.cat([source, guide * source], dim=1), radius)
    mean_p = source_means[:, :1]
    cross = source_means[:, 1:] - mean * mean_p  # (N, C, H, W)
    a = (inverse * cross[:, None]).sum(dim=2)  # (N, C, H, W)
    b = mean_p - (a * mean).sum(dim=1, keepdim=True)
    fits = window_mean(torch.cat([a, b], dim=1), radius)
    return (fits[:, :channels] * guide).sum(dim=1) + fits[:, channels]


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Filter every map of ``src`` with the colour image ``guide``.

    In each window w the output is a_w . I + b_w, the least-squares fit of the source with
    regularisation ``eps`` on a_w; every pixel averages the fits of the windows covering it.

    Args:
        guide: (C, H, W) float image, values in [0, 1] for the usual ``eps`` (C = 3, or 1).
        src: (N, H, W) float maps (masks or probabilities).
        radius: window radius in pixels; eps: regularisation (larger: smoother).
    Returns:
        (N, H, W) filtered maps (not clamped: values may leave [0, 1] slightly).
    """
    if src.shape[0] == 0:
        return src.clone()
    guide = guide.to(src.dtype)
    mean, inverse = guide_statistics(guide, radius, eps)
    n = src.shape[0]
    return filter_with_statistics(
        guide.expand(n, *guide.shape), mean.expand(n, *mean.shape), inverse.expand(n, *inverse.shape), src, radius
    )


def crop_windows(
    boxes: torch.Tensor, margin: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Windows of one common size, inside an (height, width) image, each covering its box's
    pixel rows int(y0) .. int(y1) and columns int(x0) .. int(x1) grown by ``margin``.

    boxes: (N, 4) XYXY on the host. Returns the top rows and left columns (N,) int64 and the
    window height and width."""
    boxes = boxes.detach().to("cpu", torch.float64)
    start = boxes[:, :2].long() - margin
    stop = boxes[:, 2:].long() + 1 + margin
    limit = torch.tensor([width, height])
    size = (torch.minimum(stop, limit) - start.clamp(min=0)).amax(dim=0).clamp(min=1)
    size = torch.minimum(size, limit)
    corner = torch.minimum(start.clamp(min=0), limit - size)
    crop_w, crop_h = size.tolist()
    return corner[:, 1], corner[:, 0], crop_h, crop_w


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

        All masks are filtered at once, each on a window of one common size around its box
        grown by twice the radius (all a pixel's output depends on), so inside the box the
        result equals filtering the whole image. The windows are placed from the boxes' values
        on the host: pass host boxes to avoid a device-to-host copy.

        image: (C, H, W) uint8 (any channel order); masks: (N, H, W) bool or probabilities;
        boxes: (N, 4) XYXY in pixels of the same frame.
        Returns (N, H, W) float refined probabilities in [0, 1].
        """
        num, height, width = masks.shape
        out = torch.zeros(masks.shape, dtype=torch.float32, device=masks.device)
        if num == 0:
            return out
        tops, lefts, crop_h, crop_w = crop_windows(boxes, 2 * self.radius, height, width)
        # The guide's statistics, once for the rectangle that holds every window (exact where
        # the boxes need them: within twice the radius of a box, inside its window).
        top, left = tops.min().tolist(), lefts.min().tolist()  # host tensors
        bottom, right = tops.max().tolist() + crop_h, lefts.max().tolist() + crop_w
        guide = image[:, top:bottom, left:right].to(device=masks.device, dtype=torch.float32) / 255.0
        mean, inverse = guide_statistics(guide, self.radius, self.eps)
        statistics = torch.cat([guide, mean, inverse.flatten(0, 1)])
        rows = (tops[:, None] - top + torch.arange(crop_h))[:, :, None].to(masks.device)
        cols = (lefts[:, None] - left + torch.arange(crop_w))[:, None, :].to(masks.device)
        crops = statistics[:, rows, cols].transpose(0, 1)  # (N, S, crop_h, crop_w)
        channels = guide.shape[0]
        instance = torch.arange(num, device=masks.device)[:, None, None]
        rows, cols = rows + top, cols + left  # in the masks' frame
        refined = filter_with_statistics(
            crops[:, :channels], crops[:, channels : 2 * channels],
            crops[:, 2 * channels :].unflatten(1, (channels, channels)),
            masks[instance, rows, cols].float(), self.radius,
        )
        box = boxes.to(masks.device, torch.float32)[:, :, None, None]
        centre_y, centre_x = rows + 0.5, cols + 0.5
        inside = (centre_y >= box[:, 1]) & (centre_y <= box[:, 3]) & (centre_x >= box[:, 0]) & (centre_x <= box[:, 2])
        out[instance, rows, cols] = refined.clamp_(0.0, 1.0) * inside
        return out
