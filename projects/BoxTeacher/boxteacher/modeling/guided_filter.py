"""Edge-aware refinement of masks with the colour guided filter (He, Sun and Tang, "Guided Image
Filtering", ECCV 2010 / TPAMI 2013).

A teacher's masks come from a stride-4 map: their boundaries are blurred over a few pixels. In
every window of the image the filter fits the mask as a linear function of the colour, so a
refined mask changes where the colour changes and nowhere else.

``MaskRefinement`` filters all the masks of a batch at once, without host synchronisation: the
guides' statistics (window means, inverse regularised colour covariances) are computed once for
the zero-padded batch, every window mean counting only the pixels of its own image, and every
mask is filtered on a window of one common size around its box.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import batch_images, group_indices


def window_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over the (2r+1) x (2r+1) window of every pixel, zero outside the map: sums along
    rows, then along columns (depthwise convolutions; ten times faster on a CPU than
    ``avg_pool2d``). x: (N, C, H, W) -> (N, C, H, W)."""
    channels = x.shape[1]
    ones = x.new_ones((channels, 1, 1, 2 * radius + 1))
    rows = F.conv2d(x, ones, padding=(0, radius), groups=channels)
    return F.conv2d(rows, ones.transpose(2, 3), padding=(radius, 0), groups=channels)


def inverse_regularised_covariance(covariance: torch.Tensor, eps: float) -> torch.Tensor:
    """(Sigma + eps I)^-1 of symmetric C x C matrices in closed form (C = 1 or 3; the adjugate
    over the determinant for 3 x 3), elementwise over the leading and trailing dimensions.
    covariance: (..., C, C, H, W) -> (..., C, C, H, W)."""
    channels = covariance.shape[-3]
    if channels == 1:
        return 1.0 / (covariance + eps)
    if channels != 3:
        raise ValueError(f"The guided filter takes a guide of 1 or 3 channels, got {channels}")

    def entry(i: int, j: int) -> torch.Tensor:
        return covariance[..., i, j, :, :] + (eps if i == j else 0.0)

    a, b, c, d, e, f = entry(0, 0), entry(0, 1), entry(0, 2), entry(1, 1), entry(1, 2), entry(2, 2)
    cof_a, cof_b, cof_c = d * f - e * e, c * e - b * f, b * e - c * d
    cof_d, cof_e, cof_f = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * cof_a + b * cof_b + c * cof_c
    rows = ((cof_a, cof_b, cof_c), (cof_b, cof_d, cof_e), (cof_c, cof_e, cof_f))
    return torch.stack([torch.stack(row, dim=-3) for row in rows], dim=-4) / det[..., None, None, :, :]


def guide_statistics(
    guide: torch.Tensor, valid: torch.Tensor, radius: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means (B, C, H, W) of guides (B, C, H, W) over their valid pixels (B, 1, H, W)
    and the inverse regularised colour covariance of every window (B, C, C, H, W)."""
    channels = guide.shape[1]
    guide = guide * valid
    products = (guide[:, :, None] * guide[:, None]).flatten(1, 2)
    sums = window_sum(torch.cat([valid, guide, products], dim=1), radius)
    means = sums[:, 1:] / sums[:, :1].clamp(min=1.0)
    mean, second = means[:, :channels], means[:, channels:].unflatten(1, (channels, channels))
    covariance = second - mean[:, :, None] * mean[:, None]
    return mean, inverse_regularised_covariance(covariance, eps)


def filter_with_statistics(
    guide: torch.Tensor, valid: torch.Tensor, mean: torch.Tensor, inverse: torch.Tensor, src: torch.Tensor, radius: int
) -> torch.Tensor:
    """The guided filter of N maps, each with its own guide, valid pixels and guide statistics.

    guide, mean: (N, C, H, W); valid: (N, 1, H, W); inverse: (N, C, C, H, W) (see
    ``guide_statistics``); src: (N, H, W). Returns (N, H, W), meaningful on valid pixels.
    """
    channels = guide.shape[1]
    source = src[:, None].to(guide.dtype) * valid
    sums = window_sum(torch.cat([valid, source, guide * source], dim=1), radius)
    count = sums[:, :1].clamp(min=1.0)
    mean_p = sums[:, 1:2] / count
    cross = sums[:, 2:] / count - mean * mean_p  # (N, C, H, W)
    a = (inverse * cross[:, None]).sum(dim=2)  # (N, C, H, W)
    b = mean_p - (a * mean).sum(dim=1, keepdim=True)
    fits = window_sum(torch.cat([a, b], dim=1) * valid, radius) / count
    return (fits[:, :channels] * guide).sum(dim=1) + fits[:, channels]


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Filter every map of ``src`` with the colour image ``guide``.

    In each window w (its part inside the image) the output is a_w . I + b_w, the
    least-squares fit of the source with regularisation ``eps`` on a_w; every pixel averages
    the fits of the windows covering it.

    Args:
        guide: (C, H, W) float image, values in [0, 1] for the usual ``eps`` (C = 3, or 1).
        src: (N, H, W) float maps (masks or probabilities).
        radius: window radius in pixels; eps: regularisation (larger: smoother).
    Returns:
        (N, H, W) filtered maps (not clamped: values may leave [0, 1] slightly).
    """
    if src.shape[0] == 0:
        return src.clone()
    guide = guide[None].to(src.dtype)
    valid = guide.new_ones((1, 1, *guide.shape[-2:]))
    mean, inverse = guide_statistics(guide, valid, radius, eps)
    n = src.shape[0]
    return filter_with_statistics(
        guide.expand(n, -1, -1, -1), valid.expand(n, -1, -1, -1), mean.expand(n, -1, -1, -1),
        inverse.expand(n, -1, -1, -1, -1), src, radius,
    )


def crop_windows(
    boxes: torch.Tensor, margin: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Windows of one common size, inside an (height, width) frame, each covering its box's
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
        """Refine each mask of one image inside its box; zero outside it.

        image: (C, H, W) uint8 (any channel order); masks: (N, H, W) bool or probabilities;
        boxes: (N, 4) XYXY in pixels of the same frame. Returns (N, H, W) float refined
        probabilities in [0, 1]. See ``refine_batch``.
        """
        return self.refine_batch([image], [masks], [boxes])[0]

    def refine_batch(
        self, images: list[torch.Tensor], masks: list[torch.Tensor], boxes: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Refine the masks of several images, each inside its box, all at once.

        Every mask is filtered on a window of one common size around its box grown by twice the
        radius (all a pixel's output depends on), every window mean counting the pixels of its
        own image only: inside the box the result equals filtering the whole image. The windows
        are placed from the boxes' values on the host: host boxes spare a device-to-host copy.

        images: per image (C, h_i, w_i) uint8; masks: per image (N_i, h_i, w_i) bool or
        probabilities; boxes: per image (N_i, 4) XYXY. Returns per image (N_i, h_i, w_i) float
        refined probabilities in [0, 1], zero outside the box.
        """
        device = masks[0].device
        counts = [m.shape[0] for m in masks]
        sizes = [tuple(m.shape[-2:]) for m in masks]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        out = torch.zeros((sum(counts), height, width), dtype=torch.float32, device=device)
        if out.shape[0] > 0:
            self._refine_into(out, images, masks, boxes, counts, sizes)
        return [o[:, :h, :w] for o, (h, w) in zip(out.split(counts), sizes)]

    def _refine_into(self, out, images, masks, boxes, counts, sizes) -> None:
        device = out.device
        image_of_box = group_indices(counts)
        all_boxes = torch.cat([b.detach().to("cpu", torch.float64) for b in boxes])
        tops, lefts, crop_h, crop_w = crop_windows(all_boxes, 2 * self.radius, *out.shape[-2:])
        # The guides' statistics, once, on the rectangle of the padded frame that holds every
        # window (exact where a box needs them: within twice the radius, inside its window).
        top, left = tops.min().tolist(), lefts.min().tolist()  # host tensors
        bottom, right = tops.max().tolist() + crop_h, lefts.max().tolist() + crop_w
        guides, _ = batch_images([im.to(device) for im in images], 1)
        guides = guides[:, :, top:bottom, left:right].float() / 255.0
        frame_sizes = torch.tensor(sizes, device=device)
        rows_in = torch.arange(top, bottom, device=device) < frame_sizes[:, :1]
        cols_in = torch.arange(left, right, device=device) < frame_sizes[:, 1:]
        valid = (rows_in[:, :, None] & cols_in[:, None, :]).to(guides.dtype)[:, None]
        mean, inverse = guide_statistics(guides, valid, self.radius, self.eps)
        statistics = torch.cat([valid, guides, mean, inverse.flatten(1, 2)], dim=1)  # (B, S, h, w)

        rows = (tops[:, None] + torch.arange(crop_h))[:, :, None].to(device)  # in the padded frame
        cols = (lefts[:, None] + torch.arange(crop_w))[:, None, :].to(device)
        crops = statistics[image_of_box.to(device)[:, None, None], :, rows - top, cols - left].permute(0, 3, 1, 2)
        channels = guides.shape[1]
        crop_valid, crop_guide, crop_mean = crops[:, :1], crops[:, 1 : 1 + channels], crops[:, 1 + channels : 1 + 2 * channels]
        crop_inverse = crops[:, 1 + 2 * channels :].unflatten(1, (channels, channels))
        sources = torch.cat([
            m[torch.arange(n, device=device)[:, None, None], r.clamp(max=h - 1), c.clamp(max=w - 1)].float()
            for m, n, (h, w), r, c in zip(masks, counts, sizes, rows.split(counts), cols.split(counts))
        ])  # rows and columns past an image are read at its border and then count as invalid
        refined = filter_with_statistics(crop_guide, crop_valid, crop_mean, crop_inverse, sources, self.radius)
        box = all_boxes.to(device, torch.float32)[:, :, None, None]
        centre_y, centre_x = rows + 0.5, cols + 0.5
        inside = (centre_y >= box[:, 1]) & (centre_y <= box[:, 3]) & (centre_x >= box[:, 0]) & (centre_x <= box[:, 2])
        instance = torch.arange(out.shape[0], device=device)[:, None, None]
        out[instance, rows, cols] = refined.clamp_(0.0, 1.0) * inside * crop_valid[:, 0]
