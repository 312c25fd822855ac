"""Edge-aware refinement of masks with the colour guided filter (He, Sun and Tang, "Guided Image
Filtering", ECCV 2010 / TPAMI 2013).

A teacher's masks come from a stride-4 map: their boundaries are blurred over a few pixels. In
every window of the image the filter fits the mask as a linear function of the colour, so a
refined mask changes where the colour changes and nowhere else.

``MaskRefinement`` filters all the masks of a batch at once, without host synchronisation: the
guides' statistics (window means, inverse regularised colour covariances) are computed once for
the zero-padded batch, every window mean counting only the pixels of its own image, and every
mask is filtered on fixed-size tiles of its box, all tiles of the batch together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .layers import batch_images, group_indices


def window_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over the (2r+1) x (2r+1) window of every pixel, zero outside the map: running sums
    along rows, then along columns, differenced 2r+1 apart (the cost does not grow with the
    radius; on a CPU about twice as fast as depthwise convolutions on the tiles of
    ``MaskRefinement``). x: (N, C, H, W) -> (N, C, H, W)."""
    size = 2 * radius + 1
    running = F.pad(x, (radius + 1, radius)).cumsum(dim=-1)
    rows = running[..., size:] - running[..., :-size]
    running = F.pad(rows, (0, 0, radius + 1, radius)).cumsum(dim=-2)
    return running[..., size:, :] - running[..., :-size, :]


def unpack_symmetric(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, P, H, W) symmetric C x C matrices packed as their P = C (C + 1) / 2 upper-triangle
    entries in the order of ``torch.triu_indices`` -> (N, C, C, H, W)."""
    index = torch.zeros(channels, channels, dtype=torch.long)
    rows, cols = torch.triu_indices(channels, channels)
    index[rows, cols] = index[cols, rows] = torch.arange(len(rows))
    return packed[:, index.flatten().to(packed.device)].unflatten(1, (channels, channels))


def upper_triangle_products(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The products x_i y_j, i <= j, of the channels of x and y (B, C, H, W), packed as in
    ``unpack_symmetric``: (B, C (C + 1) / 2, H, W)."""
    return torch.cat([x[:, i:] * y[:, i : i + 1] for i in range(x.shape[1])], dim=1)


def inverse_regularised_covariance(covariance: torch.Tensor, eps: float) -> torch.Tensor:
    """(Sigma + eps I)^-1 of symmetric C x C matrices in closed form (C = 1 or 3; the adjugate
    over the determinant for 3 x 3), elementwise over the leading and trailing dimensions,
    both packed as upper triangles (see ``unpack_symmetric``).
    covariance: (..., P, H, W) -> (..., P, H, W), P = 1 or 6."""
    entries = covariance.shape[-3]
    if entries == 1:
        return 1.0 / (covariance + eps)
    if entries != 6:
        raise ValueError(
            f"The guided filter takes a guide of 1 or 3 channels, got {entries} covariance entries"
        )
    a, b, c, d, e, f = (
        covariance[..., k, :, :] + (eps if k in (0, 3, 5) else 0.0) for k in range(6)
    )
    cof_a, cof_b, cof_c = d * f - e * e, c * e - b * f, b * e - c * d
    cof_d, cof_e, cof_f = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * cof_a + b * cof_b + c * cof_c
    return torch.stack([cof_a, cof_b, cof_c, cof_d, cof_e, cof_f], dim=-3) / det[..., None, :, :]


def guide_statistics(
    guide: torch.Tensor, valid: torch.Tensor, radius: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means (B, C, H, W) of guides (B, C, H, W) over their valid pixels (B, 1, H, W)
    and the inverse regularised colour covariance of every window, packed (B, P, H, W) (see
    ``unpack_symmetric``)."""
    channels = guide.shape[1]
    guide = guide * valid
    sums = window_sum(
        torch.cat([valid, guide, upper_triangle_products(guide, guide)], dim=1), radius
    )
    means = sums[:, 1:] / sums[:, :1].clamp(min=1.0)
    mean, second = means[:, :channels], means[:, channels:]
    return mean, inverse_regularised_covariance(second - upper_triangle_products(mean, mean), eps)


def filter_with_statistics(
    guide: torch.Tensor,
    valid: torch.Tensor,
    mean: torch.Tensor,
    inverse: torch.Tensor,
    src: torch.Tensor,
    radius: int,
) -> torch.Tensor:
    """The guided filter of N maps, each with its own guide, valid pixels and guide statistics.

    guide: (N, C, H, W); valid: (N, 1, H, W); src: (N, H, W); mean (N, C, H', W') and inverse
    (N, P, H', W') packed (see ``guide_statistics``) over the whole maps (H' = H) or over their
    centre only, ``radius`` pixels in from every side (H' = H - 2 radius): the result then
    covers that centre. Returns (N, H', W'), meaningful on valid pixels.
    """
    channels = guide.shape[1]
    source = src[:, None].to(guide.dtype) * valid
    sums = window_sum(torch.cat([valid, source, guide * source], dim=1), radius)
    if mean.shape[-1] < guide.shape[-1]:
        centre = (Ellipsis, slice(radius, -radius), slice(radius, -radius))
        sums, guide, valid = sums[centre], guide[centre], valid[centre]
    count = sums[:, :1].clamp(min=1.0)
    mean_p = sums[:, 1:2] / count
    cross = sums[:, 2:] / count - mean * mean_p  # (N, C, H, W)
    a = (unpack_symmetric(inverse, channels) * cross[:, None]).sum(dim=2)  # (N, C, H, W)
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
        guide.expand(n, -1, -1, -1),
        valid.expand(n, -1, -1, -1),
        mean.expand(n, -1, -1, -1),
        inverse.expand(n, -1, -1, -1),
        src,
        radius,
    )


def box_tiles(
    boxes: torch.Tensor, tile: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Square tiles of side ``tile`` that cover each box's pixel rows int(y0) .. int(y1) and
    columns int(x0) .. int(x1) (clipped to the (height, width) frame) in a grid from its
    top-left pixel; the last row and column of tiles may reach past the box and the frame.

    boxes: (N, 4) XYXY on the host (computed with NumPy: host arithmetic, nothing to wait
    for). Returns, per tile, its box (T,) and its top row and left column (T,), int64."""
    boxes = boxes.detach().to("cpu", torch.float64).numpy()
    limit = np.array([width, height])
    start = np.minimum(np.clip(boxes[:, :2].astype(np.int64), 0, None), limit - 1)
    stop = np.minimum(boxes[:, 2:].astype(np.int64) + 1, limit)
    counts = -(-np.maximum(stop - start, 1) // tile)  # (N, 2) tiles across and down, rounded up
    per_box = counts.prod(axis=1)
    box_of_tile = np.repeat(np.arange(len(boxes)), per_box)
    index = np.arange(len(box_of_tile)) - np.repeat(np.cumsum(per_box) - per_box, per_box)
    across = counts[box_of_tile, 0]
    tops = start[box_of_tile, 1] + index // across * tile
    lefts = start[box_of_tile, 0] + index % across * tile
    return torch.from_numpy(box_of_tile), torch.from_numpy(tops), torch.from_numpy(lefts)


@dataclass(frozen=True)
class MaskRefinement:
    """Guided-filter refinement of pseudo masks (``MODEL.BOX_TEACHER.REFINE_RADIUS``,
    ``REFINE_EPS``).

    radius: window radius in pixels of the masks' frame (about the mask stride);
    eps: regularisation, for colours scaled to [0, 1].
    """

    radius: int = 4
    eps: float = 0.01

    def __call__(
        self, image: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor
    ) -> torch.Tensor:
        """Refine each mask of one image inside its box; zero outside it.

        image: (C, H, W) uint8 (any channel order); masks: (N, H, W) bool or probabilities;
        boxes: (N, 4) XYXY in pixels of the same frame. Returns (N, H, W) float refined
        probabilities in [0, 1]. See ``refine_batch``.
        """
        return self.refine_batch([image], [masks], [boxes])[0]

    @property
    def tile(self) -> int:
        """Side of the tiles the boxes are cut into: 8 radii, so that a tile with its margin
        of two radii on each side holds 2.25 times its pixels."""
        return 8 * self.radius

    def refine_batch(
        self, images: list[torch.Tensor], masks: list[torch.Tensor], boxes: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Refine the masks of several images, each inside its box, all at once.

        The guides' statistics (window means, inverse covariances) are computed once per image,
        every window counting the pixels of its own image only. Every box is cut into tiles of
        one size (``tile``) and every tile filtered with a margin of twice the radius (all a
        pixel's output depends on), all tiles of the batch together: inside the box the result
        equals filtering the whole image, and the work grows with the boxes' area. The tiles
        are placed from the boxes' values on the host: host boxes spare a device-to-host copy.

        images: per image (C, h_i, w_i) uint8; masks: per image (N_i, h_i, w_i) bool or
        probabilities; boxes: per image (N_i, 4) XYXY. Returns per image (N_i, h_i, w_i) float
        refined probabilities in [0, 1], zero outside the box.
        """
        device = masks[0].device
        counts = [m.shape[0] for m in masks]
        sizes = [tuple(m.shape[-2:]) for m in masks]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        # Room for the tiles that reach past the frame; cropped at the end.
        out = torch.zeros(
            (sum(counts), height + self.tile, width + self.tile), dtype=torch.float32, device=device
        )
        if out.shape[0] > 0:
            self._refine_into(out, images, masks, boxes, counts, sizes, height, width)
        return [o[:, :h, :w] for o, (h, w) in zip(out.split(counts), sizes)]

    def _refine_into(self, out, images, masks, boxes, counts, sizes, height, width) -> None:
        device, tile, margin = out.device, self.tile, 2 * self.radius
        all_boxes = torch.cat([b.detach().to("cpu", torch.float64) for b in boxes])
        box_of_tile, tops, lefts = box_tiles(all_boxes, tile, height, width)
        image_of_tile = group_indices(counts)[box_of_tile]
        tiles_per_image = np.bincount(image_of_tile.numpy(), minlength=len(counts)).tolist()
        first_box_of_image = torch.from_numpy(np.cumsum([0] + counts[:-1]))
        box_in_image = (box_of_tile - first_box_of_image[image_of_tile]).to(device)
        image_of_tile, box_of_tile = image_of_tile.to(device), box_of_tile.to(device)

        guides, _ = batch_images([im.to(device) for im in images], 1)
        guides = guides[:, :, :height, :width].float() / 255.0
        frame_sizes = torch.tensor(sizes, device=device)
        rows_in = torch.arange(height, device=device) < frame_sizes[:, :1]
        cols_in = torch.arange(width, device=device) < frame_sizes[:, 1:]
        valid = (rows_in[:, :, None] & cols_in[:, None, :]).to(guides.dtype)[:, None]
        mean, inverse = guide_statistics(guides, valid, self.radius, self.eps)

        # Rows and columns of every tile with its margin, in the frame; a margin may reach past
        # it: those pixels are read at the border and count as invalid. The guide statistics
        # are only read within one radius of the tile.
        span = torch.arange(-margin, tile + margin)
        rows = (tops[:, None] + span)[:, :, None].to(device)
        cols = (lefts[:, None] + span)[:, None, :].to(device)
        in_frame = ((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width))[:, None]
        rows_read, cols_read = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
        near = slice(self.radius, -self.radius)

        def crops(
            statistic: torch.Tensor, r: torch.Tensor, c: torch.Tensor
        ) -> torch.Tensor:  # (B, K, H, W) -> (T, K, r, c)
            return statistic[image_of_tile[:, None, None], :, r, c].permute(0, 3, 1, 2)

        crop_valid = crops(valid, rows_read, cols_read) * in_frame
        sources = torch.cat(
            [
                mask[box[:, None, None], r.clamp(0, h - 1), c.clamp(0, w - 1)].float()
                for mask, (h, w), box, r, c in zip(
                    masks,
                    sizes,
                    box_in_image.split(tiles_per_image),
                    rows.split(tiles_per_image),
                    cols.split(tiles_per_image),
                )
            ]
        )
        rows_near, cols_near = rows_read[:, near], cols_read[:, :, near]
        refined = filter_with_statistics(
            crops(guides, rows_read, cols_read),
            crop_valid,
            crops(mean, rows_near, cols_near),
            crops(inverse, rows_near, cols_near),
            sources,
            self.radius,
        )
        in_crop, in_refined = (
            slice(margin, margin + tile),
            slice(margin - self.radius, margin - self.radius + tile),
        )
        rows, cols = rows[:, in_crop], cols[:, :, in_crop]
        box = all_boxes.to(device, torch.float32)[box_of_tile][:, :, None, None]
        centre_y, centre_x = rows + 0.5, cols + 0.5
        inside = (
            (centre_y >= box[:, 1])
            & (centre_y <= box[:, 3])
            & (centre_x >= box[:, 0])
            & (centre_x <= box[:, 2])
        )
        kept = (
            refined[:, in_refined, in_refined].clamp_(0.0, 1.0)
            * inside
            * crop_valid[:, 0, in_crop, in_crop]
        )
        out[box_of_tile[:, None, None], rows, cols] = kept
