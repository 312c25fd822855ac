"""CondInst's mask side: the shared mask branch, the dynamic (per-instance) mask head whose
weights the controller predicts, and the selection of positives that train it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import NormFactory, aligned_bilinear, compute_locations


def _conv_norm_relu(in_channels: int, out_channels: int, norm: NormFactory | None) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm is None)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0.0)
    layers: list[nn.Module] = [conv] + ([norm(out_channels)] if norm is not None else [])
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class MaskBranch(nn.Module):
    """Fuses P3-P5 at the stride of the first input and maps them to ``out_channels`` mask
    features shared by all instances.

    Input: {level name: (B, C_in, H/s, W/s)}. Output: (B, out_channels, H/s0, W/s0).
    """

    def __init__(
        self,
        in_features: list[str],
        in_channels: int,
        channels: int = 128,
        out_channels: int = 8,
        num_convs: int = 4,
        norm: NormFactory | None = nn.BatchNorm2d,
    ):
        super().__init__()
        self.in_features = list(in_features)
        self.refine = nn.ModuleList(
            [_conv_norm_relu(in_channels, channels, norm) for _ in self.in_features]
        )
        tower: list[nn.Module] = [
            _conv_norm_relu(channels, channels, norm) for _ in range(num_convs)
        ]
        tower.append(nn.Conv2d(channels, out_channels, 1))
        self.tower = nn.Sequential(*tower)
        self.out_channels = out_channels

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.refine[0](features[self.in_features[0]])
        for refine, name in zip(self.refine[1:], self.in_features[1:]):
            y = refine(features[name])
            x = x + aligned_bilinear(y, x.shape[-2] // y.shape[-2])
        return self.tower(x)


class DynamicMaskHead(nn.Module):
    """A small stack of 1x1 convolutions whose weights differ per instance.

    Each instance k gets the mask features of its image, plus (unless disabled) the offsets from
    its location to every mask-feature pixel divided by the size of interest of its FPN level,
    and runs them through layers whose weights and biases are the instance's generated
    parameter vector (``num_gen_params`` values: all weights, then all biases).

    Buffers: ``sizes_of_interest`` (int64, one per level) and ``_iter`` (float, the number of
    training forward passes). Nothing reads ``_iter`` (the loss warm-ups follow the iteration the
    engine passes in); it is kept so that checkpoints keep the layout of AdelaiDet's and the
    official BoxTeacher's, which store and restore it.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 8,
        num_layers: int = 3,
        sizes_of_interest: list[int] = (64, 128, 256, 512, 1024),
        disable_rel_coords: bool = False,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"The dynamic mask head needs at least one layer, got {num_layers}")
        self.in_channels = in_channels
        self.disable_rel_coords = disable_rel_coords
        first_in = in_channels + (0 if disable_rel_coords else 2)
        dims = [first_in] + [channels] * (num_layers - 1) + [1]
        self.layer_shapes = list(zip(dims[1:], dims[:-1]))  # (out, in) per layer
        self.weight_nums = [o * i for o, i in self.layer_shapes]
        self.bias_nums = [o for o, _ in self.layer_shapes]
        self.num_gen_params = sum(self.weight_nums) + sum(self.bias_nums)
        self.register_buffer(
            "sizes_of_interest", torch.tensor(list(sizes_of_interest), dtype=torch.int64)
        )
        self.register_buffer("_iter", torch.zeros([1]))

    def split_params(self, params: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(K, num_gen_params) -> per layer weights (K, out, in) and biases (K, out, 1)."""
        chunks = params.split(self.weight_nums + self.bias_nums, dim=1)
        n = len(self.weight_nums)
        weights = [w.reshape(-1, o, i) for w, (o, i) in zip(chunks[:n], self.layer_shapes)]
        biases = [b.reshape(-1, o, 1) for b, (o, _) in zip(chunks[n:], self.layer_shapes)]
        return weights, biases

    def forward(
        self,
        mask_feats: torch.Tensor,
        mask_feat_stride: int,
        params: torch.Tensor,
        im_inds: torch.Tensor,
        locations: torch.Tensor,
        fpn_levels: torch.Tensor,
    ) -> torch.Tensor:
        """Mask logits of K instances at the mask-feature resolution.

        Args:
            mask_feats: (B, C, h, w) mask-branch output of stride ``mask_feat_stride``.
            params: (K, num_gen_params); im_inds, fpn_levels: (K,) int64; locations: (K, 2).
        Returns:
            (K, 1, h, w) logits.
        """
        num_insts = params.shape[0]
        _, channels, h, w = mask_feats.shape
        x = mask_feats[im_inds].reshape(num_insts, channels, h * w)
        if not self.disable_rel_coords:
            grid = compute_locations(h, w, mask_feat_stride, mask_feats.device)  # (h*w, 2)
            offsets = locations[:, None, :] - grid[None]  # (K, h*w, 2)
            soi = self.sizes_of_interest.float()[fpn_levels]
            rel_coords = (offsets.permute(0, 2, 1) / soi[:, None, None]).to(mask_feats.dtype)
            x = torch.cat([rel_coords, x], dim=1)
        weights, biases = self.split_params(params)
        for layer, (weight, bias) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(bias, weight, x)
            if layer < len(weights) - 1:
                x = F.relu(x)
        return x.reshape(num_insts, 1, h, w)


def sample_top_per_object(positives: dict[str, torch.Tensor], per_image: int) -> torch.Tensor:
    """Indices of the positives to train the mask head on (CondInst's TOPK_PROPOSALS_PER_IM).

    In each image with U distinct objects among its positives, every object keeps its
    k = max(per_image // U, 1) positives with the highest max_c sigmoid(cls_c) * sigmoid(ctr).
    Returned in the order image, object (ascending ``gt_inds``), score (descending).
    """
    gt_inds = positives["gt_inds"]
    if gt_inds.numel() == 0:
        return gt_inds
    scores = positives["logits"].sigmoid().max(dim=1).values * positives["ctrness"].sigmoid()
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(gt_inds[by_score], stable=True)]
    sorted_gt = gt_inds[order]
    new_group = torch.ones_like(sorted_gt, dtype=torch.bool)
    new_group[1:] = sorted_gt[1:] != sorted_gt[:-1]
    group_id = torch.cumsum(new_group.long(), dim=0) - 1
    group_start = torch.nonzero(new_group).squeeze(1)
    rank_in_group = torch.arange(order.numel(), device=order.device) - group_start[group_id]

    im_inds = positives["im_inds"][order]
    objects_per_image = torch.zeros(int(im_inds.max()) + 1, dtype=torch.long, device=order.device)
    objects_per_image.index_add_(0, im_inds[new_group], torch.ones_like(im_inds[new_group]))
    keep_per_object = torch.clamp(per_image // objects_per_image[im_inds], min=1)
    return order[rank_in_group < keep_per_object]
