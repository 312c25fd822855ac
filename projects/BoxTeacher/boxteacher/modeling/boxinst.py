"""BoxInst's box supervision (Tian et al., CVPR 2021) as pure functions: box masks, the image
validity mask, LAB colour similarity of neighbouring pixels, and the projection loss.

Maps "at stride s" sample the full-resolution padded frame at pixel (s*i + s//2, s*j + s//2),
as the original does with ``[s//2::s, s//2::s]``; they are computed directly at that stride.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import dice_loss
from .pairwise import overlap

# sRGB (D65) -> XYZ and the D65 white point, the constants of BoxTeacher's LAB conversion.
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE = (0.95047, 1.0, 1.08883)


def _sample_positions(size: int, stride: int, device: torch.device) -> torch.Tensor:
    """Full-resolution coordinates sampled by a stride-``stride`` map of ``size // stride``
    cells."""
    return torch.arange(size // stride, device=device) * stride + stride // 2


def box_masks_at_stride(
    boxes: torch.Tensor, padded_size: tuple[int, int], stride: int
) -> torch.Tensor:
    """Box masks (N, H/s, W/s) float: 1 on rows int(y0) .. int(y1 + 1) - 1 and columns
    int(x0) .. int(x1 + 1) - 1 of the full-resolution frame (truncating casts), sampled at
    stride s. boxes: (N, 4) XYXY."""
    ys = _sample_positions(padded_size[0], stride, boxes.device)
    xs = _sample_positions(padded_size[1], stride, boxes.device)
    start = boxes[:, :2].long()
    stop = (boxes[:, 2:] + 1).long()
    inside_y = (ys[None] >= start[:, 1:2]) & (ys[None] < stop[:, 1:2])
    inside_x = (xs[None] >= start[:, 0:1]) & (xs[None] < stop[:, 0:1])
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()


def box_mask_centers(boxes: torch.Tensor, padded_size: tuple[int, int]) -> torch.Tensor:
    """Centre of mass (x, y) of each full-resolution box mask (the truncated pixel ranges of
    ``box_masks_at_stride`` clipped to the padded frame): (N, 2). AdelaiDet's BoxInst samples
    FCOS positives around it."""
    start = boxes[:, :2].long().clamp(min=0)
    limit = boxes.new_tensor([padded_size[1], padded_size[0]]).long()
    stop = torch.minimum((boxes[:, 2:] + 1).long(), limit)
    return (start + stop - 1).float() / 2


def valid_pixels_at_stride(
    image_sizes: list[tuple[int, int]],
    original_heights: list[int],
    padded_size: tuple[int, int],
    stride: int,
    bottom_pixels_removed: int,
    device: torch.device,
) -> torch.Tensor:
    """(B, H/s, W/s) float: 1 on each image's unpadded area except its bottom rows, 0 on padding.

    The last ``int(bottom_pixels_removed * h / original_height)`` rows of an image of resized
    height h are invalid (COCO annotations are often wrong there).
    """
    ys = _sample_positions(padded_size[0], stride, device)
    xs = _sample_positions(padded_size[1], stride, device)
    masks = []
    for (h, w), original_h in zip(image_sizes, original_heights):
        removed = int(bottom_pixels_removed * float(h) / float(original_h))
        rows = ys < h - max(removed, 0)
        masks.append((rows[:, None] & (xs < w)[None]).float())
    return torch.stack(masks)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) RGB in [0, 255] -> CIE LAB (D65), computed on the tensor's device."""
    c = rgb / 255.0
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    matrix = rgb.new_tensor(_RGB_TO_XYZ)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / rgb.new_tensor(_WHITE).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def downsampled_lab(images: torch.Tensor, stride: int, rgb_channels: list[int]) -> torch.Tensor:
    """LAB of the stride x stride average-pooled images, truncated to integers first as the
    original does: images (B, 3, H, W) uint8 (zero-padded) -> (B, 3, H/s, W/s).

    rgb_channels: indices of R, G, B in the input channel order ([2, 1, 0] for BGR).
    """
    pooled = F.avg_pool2d(images.float(), kernel_size=stride, stride=stride)[:, rgb_channels]
    return rgb_to_lab(pooled.to(torch.uint8).float())


def color_similarity(
    lab: torch.Tensor, valid: torch.Tensor, offsets: list[tuple[int, int]]
) -> torch.Tensor:
    """S[b, n, y, x] = exp(-||lab(y, x) - lab(neighbour n)|| / 2) * valid(neighbour n), zero when
    the neighbour is outside the grid. lab: (B, 3, h, w); valid: (B, h, w). Returns
    (B, len(offsets), h, w)."""
    b, _, h, w = lab.shape
    out = lab.new_zeros((b, len(offsets), h, w))
    for n, (dy, dx) in enumerate(offsets):
        rows, cols, rows_n, cols_n = overlap(h, w, dy, dx)
        diff = lab[:, :, rows, cols] - lab[:, :, rows_n, cols_n]
        distance = (diff * diff).sum(dim=1).sqrt()  # much faster than linalg.vector_norm on slices
        out[:, n, rows, cols] = torch.exp(-0.5 * distance) * valid[:, rows_n, cols_n]
    return out


def projection_loss(probs: torch.Tensor, box_masks: torch.Tensor) -> torch.Tensor:
    """BoxInst's projection term: Dice between the max-projections of the mask probabilities
    and of the box masks, along y and along x, summed, averaged over instances.

    probs, box_masks: (K, 1, h, w). Returns a 0-dim tensor.
    """
    along_y = dice_loss(probs.amax(dim=2), box_masks.amax(dim=2))
    along_x = dice_loss(probs.amax(dim=3), box_masks.amax(dim=3))
    return (along_x + along_y).mean()
