"""FCOS training targets: which locations are positive for which ground-truth box.

All functions are pure; shapes are in the docstrings. L = number of locations of all levels of
one image, N = number of ground-truth boxes of one image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import group_indices

INF = 100000000


@dataclass
class FCOSTargets:
    """Per-location targets of a batch, flattened level-major, then image, then row-major
    (the order in which the head outputs are flattened).

    labels: (B*L,) int64 class, ``num_classes`` for background.
    reg_targets: (B*L, 4) float (l, t, r, b) distances in units of the level stride.
    gt_inds: (B*L,) int64 index of the assigned box among all boxes of the batch (image 0
        first), -1 for background.
    im_inds, fpn_levels: (B*L,) int64 image and level index of every location.
    locations: (B*L, 2) float (x, y) image coordinates of every location.
    ignore: (B*L,) bool, the background locations inside an ignore region, which the
        classification loss leaves out; None when no image has ignore regions.
    """

    labels: torch.Tensor
    reg_targets: torch.Tensor
    gt_inds: torch.Tensor
    im_inds: torch.Tensor
    fpn_levels: torch.Tensor
    locations: torch.Tensor
    ignore: torch.Tensor | None = None


def mask_centers(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Centre of mass (x, y) of each mask (N, H, W); the box centre for an empty mask.

    Returns (N, 2) float.
    """
    masks = masks.float()
    area = masks.sum(dim=(1, 2))
    xs = torch.arange(masks.shape[2], dtype=torch.float32, device=masks.device)
    ys = torch.arange(masks.shape[1], dtype=torch.float32, device=masks.device)
    cx = (masks.sum(dim=1) * xs).sum(dim=1) / area.clamp(min=1e-6)
    cy = (masks.sum(dim=2) * ys).sum(dim=1) / area.clamp(min=1e-6)
    centers = torch.stack([cx, cy], dim=1)
    box_centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    return torch.where((area > 0)[:, None], centers, box_centers)


def _in_center_region(
    locations: torch.Tensor,
    location_strides: torch.Tensor,
    boxes: torch.Tensor,
    centers: torch.Tensor,
    radius: float,
) -> torch.Tensor:
    """(L, N) bool: location strictly inside the box shrunk to ``radius`` strides around the
    centre. AdelaiDet skips the whole image when its first box's centre has x == 0; that can only
    happen for an empty box, which the data pipeline removes, so it is not reproduced."""
    half = location_strides[:, None] * radius  # (L, 1)
    x0 = torch.maximum(centers[None, :, 0] - half, boxes[None, :, 0])
    y0 = torch.maximum(centers[None, :, 1] - half, boxes[None, :, 1])
    x1 = torch.minimum(centers[None, :, 0] + half, boxes[None, :, 2])
    y1 = torch.minimum(centers[None, :, 1] + half, boxes[None, :, 3])
    xs, ys = locations[:, 0:1], locations[:, 1:2]
    dist = torch.stack([xs - x0, ys - y0, x1 - xs, y1 - ys], dim=2)
    return dist.min(dim=2).values > 0


def locations_inside(locations: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(L,) bool: the locations (L, 2) (x, y) inside any of the XYXY ``boxes`` (K, 4)."""
    xs, ys = locations[:, 0:1], locations[:, 1:2]
    inside = (xs >= boxes[:, 0]) & (xs <= boxes[:, 2]) & (ys >= boxes[:, 1]) & (ys <= boxes[:, 3])
    return inside.any(dim=1)


def assign_image(
    locations: torch.Tensor,
    location_strides: torch.Tensor,
    size_ranges: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    center_sampling_radius: float | None,
    centers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign every location of one image to at most one box.

    Args:
        locations: (L, 2) (x, y); location_strides: (L,) stride of each location's level;
        size_ranges: (L, 2) [lo, hi] of max(l, t, r, b) cared for at that level (inclusive).
        boxes: (N, 4) XYXY; labels: (N,) classes.
        center_sampling_radius: positives only within this many strides of the object centre
            (None: anywhere inside the box).
        centers: (N, 2) object centres for centre sampling (default: box centres).
    Returns:
        labels (L,) (``num_classes`` = background), reg_targets (L, 4) in pixels,
        box index (L,) into ``boxes`` (-1 = background).
    """
    num_locations = locations.shape[0]
    if boxes.shape[0] == 0:
        return (
            labels.new_full((num_locations,), num_classes),
            locations.new_zeros((num_locations, 4)),
            labels.new_full((num_locations,), -1),
        )
    xs, ys = locations[:, 0:1], locations[:, 1:2]
    reg = torch.stack(
        [
            xs - boxes[None, :, 0],
            ys - boxes[None, :, 1],
            boxes[None, :, 2] - xs,
            boxes[None, :, 3] - ys,
        ],
        dim=2,
    )  # (L, N, 4)
    if center_sampling_radius is None:
        inside = reg.min(dim=2).values > 0
    else:
        if centers is None:
            centers = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = _in_center_region(
            locations, location_strides, boxes, centers, center_sampling_radius
        )
    max_reg = reg.max(dim=2).values
    cared = (max_reg >= size_ranges[:, 0:1]) & (max_reg <= size_ranges[:, 1:2])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    candidate_areas = torch.where(inside & cared, areas[None], areas.new_full((), INF))
    min_area, box_index = candidate_areas.min(dim=1)
    background = min_area == INF
    location_labels = torch.where(background, num_classes, labels[box_index])
    box_index = torch.where(background, -1, box_index)
    reg_targets = reg[torch.arange(num_locations, device=reg.device), box_index.clamp(min=0)]
    return location_labels, reg_targets, box_index


def compute_targets(
    locations_per_level: list[torch.Tensor],
    strides: list[int],
    sizes_of_interest: list[int],
    gt_boxes: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    num_classes: int,
    center_sampling_radius: float | None,
    gt_centers: list[torch.Tensor | None] | None = None,
    ignore_boxes: list[torch.Tensor] | None = None,
) -> FCOSTargets:
    """Targets of a batch of images (see ``FCOSTargets``).

    Args:
        locations_per_level: per level, (h_l * w_l, 2) location coordinates.
        strides: stride of each level; sizes_of_interest: the len(levels) - 1 boundaries
            between the object sizes handled by consecutive levels.
        gt_boxes, gt_labels: per image (N_i, 4) XYXY boxes and (N_i,) classes.
        gt_centers: per image (N_i, 2) centres for centre sampling, or None (box centres).
        ignore_boxes: per image (K_i, 4) XYXY regions whose background locations are neither
            positive nor negative (uncertain pseudo labels), or None.
    """
    device = locations_per_level[0].device
    bounds = [-1.0] + [float(s) for s in sizes_of_interest] + [float(INF)]
    counts = [loc.shape[0] for loc in locations_per_level]
    locations = torch.cat(locations_per_level)
    level_of_location = group_indices(counts).to(device)
    location_strides = torch.tensor(strides, dtype=torch.float32, device=device)[level_of_location]
    size_ranges = torch.tensor(
        [[bounds[i], bounds[i + 1]] for i in range(len(counts))], dtype=torch.float32, device=device
    )[level_of_location]

    per_image = []
    offset = 0
    for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        centers = gt_centers[i] if gt_centers is not None else None
        lab, reg, idx = assign_image(
            locations,
            location_strides,
            size_ranges,
            boxes,
            labels,
            num_classes,
            center_sampling_radius,
            centers,
        )
        idx = torch.where(idx >= 0, idx + offset, idx)
        offset += boxes.shape[0]
        per_image.append((lab, reg / location_strides[:, None], idx))

    def level_major(tensors: list[torch.Tensor]) -> torch.Tensor:
        # (B, L, ...) image-major -> level-major, then image, then position.
        split = [t.split(counts) for t in tensors]
        return torch.cat([chunk for level in zip(*split) for chunk in level])

    num_images = len(per_image)
    im_inds = torch.arange(num_images, device=device)[:, None].expand(
        num_images, locations.shape[0]
    )
    ignore = None
    if ignore_boxes is not None and any(len(b) for b in ignore_boxes):
        inside = [locations_inside(locations, b.to(locations)) for b in ignore_boxes]
        ignore = level_major(inside) & (level_major([p[0] for p in per_image]) == num_classes)
    return FCOSTargets(
        ignore=ignore,
        labels=level_major([p[0] for p in per_image]),
        reg_targets=level_major([p[1] for p in per_image]),
        gt_inds=level_major([p[2] for p in per_image]),
        im_inds=level_major(list(im_inds)),
        fpn_levels=level_major([level_of_location] * num_images),
        locations=level_major([locations] * num_images),
    )
