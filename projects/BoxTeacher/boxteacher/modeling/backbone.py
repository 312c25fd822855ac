"""ResNet (torchvision blocks, detectron2 options) and the FCOS feature pyramid P3-P7.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1`` ...) so that
torchvision ImageNet weights load as they are; detectron2 / AdelaiDet checkpoints load through a
rename table.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1
from torchvision.ops import DeformConv2d, FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .layers import NormFactory, freeze_batchnorm

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_NAMES = ("res2", "res3", "res4", "res5")
INITIALISATIONS = ("msra", "pytorch")


def msra_fill_(conv: nn.Module) -> None:
    """Caffe2's "MSRAFill" as detectron2's ``c2_msra_fill``: weight ~ N(0, 2 / fan_out) with
    fan_out = C_out * kh * kw, bias (if any) 0."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class DeformableConv3x3(DeformConv2d):
    """A 3x3 deformable convolution (no bias) whose sampling offsets, and with ``modulated`` its
    mask (DCNv2), come from a regular 3x3 convolution ``offset`` of the same input, zero-
    initialised so that it starts as a plain convolution. Offset channels follow detectron2:
    for DCNv2 the 27 (per offset group) are split in three; the first two thirds are the
    offsets, the last third the mask logits."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        groups: int,
        deform_groups: int,
        modulated: bool,
    ):
        super().__init__(
            in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False
        )
        self.modulated = modulated
        per_group = 27 if modulated else 18
        self.offset = nn.Conv2d(in_channels, per_group * deform_groups, 3, stride=stride, padding=1)
        msra_fill_(self)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset(x)
        if not self.modulated:
            return super().forward(x, offset)
        offset_x, offset_y, mask = torch.chunk(offset, 3, dim=1)
        return super().forward(x, torch.cat((offset_x, offset_y), dim=1), mask.sigmoid())


class ResNet(nn.Module):
    """ResNet body returning the requested stage outputs ("res2".."res5", strides 4..32).

    Args:
        depth: 18, 34 (basic blocks), 50 or 101 (bottlenecks).
        norm: normalisation factory (FrozenBatchNorm2d for MSRA weights).
        out_features: names of the stages to return.
        stem_out_channels: channels of the 7x7 stem.
        res2_out_channels: output channels of res2; they double at every later stage.
        num_groups, width_per_group: bottleneck width at res2 = num_groups * width_per_group.
        stride_in_1x1: put the stride-2 of bottlenecks in the first 1x1 conv (MSRA layout)
            instead of the 3x3 conv (torchvision layout).
        freeze_at: freeze the stem (1), and res2 .. (2..5); BatchNorm in frozen stages is
            converted to FrozenBatchNorm2d.
        deform_on_per_stage: deformable 3x3 convolutions in the bottlenecks of res2..res5.
        deform_modulated, deform_num_groups: DCNv2 and the offset groups of those.
        init: "msra" (detectron2's ResNet): every convolution of the stem, the blocks and the
            shortcuts gets ``msra_fill_``; "pytorch": they keep PyTorch's default
            (kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))). Either way the norms
            start at weight 1, bias 0, including the last norm of each block (detectron2 does
            not zero it), and deformable convolutions are MSRA-filled with zero offsets.
    """

    def __init__(
        self,
        depth: int,
        norm: NormFactory,
        out_features: tuple[str, ...] = ("res3", "res4", "res5"),
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        num_groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = True,
        freeze_at: int = 0,
        deform_on_per_stage: tuple[bool, ...] = (False, False, False, False),
        deform_modulated: bool = False,
        deform_num_groups: int = 1,
        init: str = "msra",
    ):
        super().__init__()
        if init not in INITIALISATIONS:
            raise ValueError(f"ResNet init must be one of {INITIALISATIONS}, got {init!r}")
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}")
        unknown = set(out_features) - set(STAGE_NAMES)
        if unknown:
            raise ValueError(
                f"Unknown ResNet output features {sorted(unknown)}; valid: {STAGE_NAMES}"
            )
        self.out_features = tuple(out_features)
        block = BasicBlock if depth < 50 else Bottleneck
        if block is BasicBlock and any(deform_on_per_stage):
            raise ValueError("Deformable convolutions need a bottleneck ResNet (depth 50 or 101).")

        self.conv1 = nn.Conv2d(3, stem_out_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(stem_out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = stem_out_channels
        out_channels = res2_out_channels
        bottleneck_width = num_groups * width_per_group
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        for index, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
            stride = 1 if index == 0 else 2
            stage = self._make_stage(
                block,
                num_blocks,
                in_channels,
                out_channels,
                bottleneck_width,
                num_groups,
                stride,
                norm,
                stride_in_1x1,
            )
            if deform_on_per_stage[index]:
                for b in stage:
                    b.conv2 = DeformableConv3x3(
                        b.conv2.in_channels,
                        b.conv2.out_channels,
                        b.conv2.stride[0],
                        b.conv2.groups,
                        deform_num_groups,
                        deform_modulated,
                    )
            self.add_module(f"layer{index + 1}", stage)
            self.out_channels[STAGE_NAMES[index]] = out_channels
            self.strides[STAGE_NAMES[index]] = 4 * 2**index
            in_channels = out_channels
            out_channels *= 2
            bottleneck_width *= 2
        if init == "msra":
            self._msra_fill_convolutions()
        self._freeze(freeze_at)

    @staticmethod
    def _make_stage(
        block: type[nn.Module],
        num_blocks: int,
        in_channels: int,
        out_channels: int,
        bottleneck_width: int,
        groups: int,
        stride: int,
        norm: NormFactory,
        stride_in_1x1: bool,
    ) -> nn.Sequential:
        if block is BasicBlock:
            planes, extra = out_channels, {}
        else:
            planes = out_channels // Bottleneck.expansion
            # torchvision's bottleneck width is planes * base_width / 64 * groups.
            extra = {"groups": groups, "base_width": bottleneck_width * 64 // (planes * groups)}
        blocks = []
        for i in range(num_blocks):
            block_stride = stride if i == 0 else 1
            downsample = None
            if i == 0 and (block_stride != 1 or in_channels != out_channels):
                downsample = nn.Sequential(
                    conv1x1(in_channels, out_channels, block_stride), norm(out_channels)
                )
            b = block(in_channels, planes, block_stride, downsample, norm_layer=norm, **extra)
            if block is Bottleneck and stride_in_1x1 and block_stride != 1:
                b.conv1.stride, b.conv2.stride = (block_stride, block_stride), (1, 1)
            blocks.append(b)
            in_channels = out_channels
        return nn.Sequential(*blocks)

    def _msra_fill_convolutions(self) -> None:
        # Deformable convolutions are DeformConv2d, not nn.Conv2d, and already MSRA-filled; the
        # offset convolutions inside them stay zero.
        offsets = {id(m.offset) for m in self.modules() if isinstance(m, DeformableConv3x3)}
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and id(module) not in offsets:
                msra_fill_(module)

    def _freeze(self, freeze_at: int) -> None:
        frozen = [nn.ModuleList([self.conv1, self.bn1])] + [
            getattr(self, f"layer{i}") for i in range(1, 5)
        ]
        for index, module in enumerate(frozen[:freeze_at]):
            for p in module.parameters():
                p.requires_grad_(False)
            if index == 0:
                self.bn1 = freeze_batchnorm(self.bn1)
            else:
                freeze_batchnorm(module)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) normalised images -> {stage name: (B, C_stage, H/s, W/s)}."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = {}
        for index, name in enumerate(STAGE_NAMES):
            x = getattr(self, f"layer{index + 1}")(x)
            if name in self.out_features:
                outputs[name] = x
            if all(f in outputs for f in self.out_features):
                break
        return outputs


class FPNBackbone(nn.Module):
    """Bottom-up network + feature pyramid as FCOS builds it: P3-P5 from the backbone stages,
    P6 and P7 by stride-2 convs on P5 (``LastLevelP6P7``).

    Output: ``{"p3": (B, C, H/8, W/8), ..., "p7": (B, C, H/128, W/128)}``.
    """

    def __init__(
        self,
        bottom_up: ResNet,
        in_features: tuple[str, ...],
        out_channels: int,
        norm: NormFactory | None = None,
        top_levels: int = 2,
    ):
        super().__init__()
        if top_levels not in (0, 2):
            raise ValueError(f"FCOS.TOP_LEVELS must be 0 or 2 (P6 and P7), got {top_levels}")
        missing = [f for f in in_features if f not in bottom_up.out_features]
        if missing:
            raise ValueError(f"FPN input features {missing} are not produced by the backbone")
        self.bottom_up = bottom_up
        self.in_features = tuple(in_features)
        self.fpn = FeaturePyramidNetwork(
            [bottom_up.out_channels[f] for f in in_features],
            out_channels,
            extra_blocks=LastLevelP6P7(out_channels, out_channels) if top_levels else None,
            norm_layer=norm,
        )
        first_level = len(bin(bottom_up.strides[in_features[0]])) - 3  # log2(stride)
        num_levels = len(in_features) + top_levels
        self.out_features = tuple(f"p{first_level + i}" for i in range(num_levels))
        self.strides = {name: 2 ** (first_level + i) for i, name in enumerate(self.out_features)}
        self.out_channels = out_channels
        # Inputs are padded to a multiple of the coarsest backbone stride.
        self.size_divisibility = bottom_up.strides[in_features[-1]]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.bottom_up(images)
        pyramid = self.fpn(OrderedDict((f, features[f]) for f in self.in_features))
        return dict(zip(self.out_features, pyramid.values()))
