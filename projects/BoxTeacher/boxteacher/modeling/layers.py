"""Small building blocks shared by the heads: normalisation factory, per-level scale,
aligned bilinear upsampling, location grids and image batching."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

NormFactory = Callable[[int], nn.Module]


def get_norm(name: str) -> NormFactory | None:
    """Normalisation layer factory by name: "FrozenBN", "BN", "SyncBN", "GN" (32 groups), or
    "" / "none" for no normalisation (returns None)."""
    factories: dict[str, NormFactory] = {
        "FrozenBN": FrozenBatchNorm2d,
        "BN": nn.BatchNorm2d,
        "SyncBN": nn.SyncBatchNorm,
        "GN": lambda channels: nn.GroupNorm(32, channels),
    }
    if name in ("", "none"):
        return None
    if name not in factories:
        raise ValueError(
            f"Unknown normalisation '{name}'; expected one of {sorted(factories)} or ''."
        )
    return factories[name]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with every BatchNorm replaced by a FrozenBatchNorm2d holding its
    statistics and affine parameters (used for frozen backbone stages)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = freeze_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class Scale(nn.Module):
    """Multiplies its input by one learnable scalar (FCOS per-level regression scale)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def aligned_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample ``x`` (N, C, h, w) by an integer ``factor`` to (N, C, factor*h, factor*w) so
    that output pixel centres stay aligned with the input grid (CondInst's upsampling)."""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def compute_locations(h: int, w: int, stride: int, device: torch.device) -> torch.Tensor:
    """Image coordinates (x, y) of the centres of an h x w feature grid of the given stride:
    (h*w, 2) float32, row-major, x = j*stride + stride//2, y = i*stride + stride//2."""
    xs = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=device)
    ys = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=device)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((x.reshape(-1), y.reshape(-1)), dim=1) + stride // 2


def batch_images(
    images: list[torch.Tensor], size_divisibility: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad images (C, h_i, w_i) at the bottom/right into one (B, C, H, W) tensor whose H, W
    are the largest sizes rounded up to a multiple of ``size_divisibility``.

    Returns the batch and the unpadded (h_i, w_i) of every image.
    """
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    batch = images[0].new_zeros((len(images), images[0].shape[0], max_h, max_w))
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch, sizes


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: the parts of a mixed-precision step that must stay float32
    (training targets, pseudo labels, post-processing)."""
    return torch.autocast(device.type, enabled=False)


def select_rows(fields: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of every field where the (M,) bool ``keep`` is true (one host synchronisation
    for all fields, where indexing each by the mask would make one per field)."""
    index = torch.nonzero(keep)[:, 0]
    return {k: v[index] for k, v in fields.items()}


def group_indices(counts: list[int]) -> torch.Tensor:
    """(sum(counts),) int64 on the host: the group of every element of consecutive groups of
    these sizes (e.g. the image of every box of a batch)."""
    return torch.tensor(
        [group for group, count in enumerate(counts) for _ in range(count)], dtype=torch.int64
    )


def inside_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, h) rows and (M, w) columns (bool) whose pixel centres lie inside each (M, 4) XYXY box
    of an (h, w) frame."""
    ys = torch.arange(size[0], device=boxes.device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(size[1], device=boxes.device, dtype=boxes.dtype) + 0.5
    inside_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])
    inside_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])
    return inside_y, inside_x


def boxes_to_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(M, 4) XYXY boxes -> (M, h, w) bool masks of the pixels whose centre is inside the box."""
    inside_y, inside_x = inside_boxes(boxes, size)
    return inside_y[:, :, None] & inside_x[:, None, :]
