"""ResNet initialisation (MODEL.RESNETS.INIT): detectron2's MSRA fill by default, PyTorch's
default as a choice; checked per layer against the closed-form standard deviations."""

import math

import pytest
import torch
from torch import nn

from boxteacher.build import build_backbone
from boxteacher.config import get_cfg, load_config
from boxteacher.modeling.backbone import DeformableConv3x3, ResNet
from boxteacher.modeling.layers import get_norm

from tiny_models import REPO, tiny_cfg


def detectron2_msra_std(weight: torch.Tensor) -> float:
    """detectron2's ``c2_msra_fill``: kaiming normal with fan_out = C_out * kh * kw."""
    return math.sqrt(2.0 / (weight.shape[0] * weight[0, 0].numel()))


def pytorch_default_std(weight: torch.Tensor) -> float:
    """nn.Conv2d's default: U(-b, b), b = 1 / sqrt(fan_in), fan_in = C_in / groups * kh * kw."""
    return 1.0 / math.sqrt(3.0 * weight[0].numel())


def assert_std(weight: torch.Tensor, expected: float, name: str) -> None:
    """Sample std and mean of ``weight`` agree with N(0, expected^2) within 5 standard errors."""
    n = weight.numel()
    std = weight.std().item()
    assert abs(std / expected - 1) < 5 / math.sqrt(2 * n), (
        f"{name}: std {std:.5f}, expected {expected:.5f}"
    )
    assert abs(weight.mean().item()) < 5 * expected / math.sqrt(n), (
        f"{name}: mean {weight.mean().item():.5f}"
    )


def convolutions(resnet: nn.Module) -> dict[str, nn.Module]:
    """Every convolution of the ResNet body except the offset branches of deformable ones."""
    offsets = {id(m.offset) for m in resnet.modules() if isinstance(m, DeformableConv3x3)}
    return {
        name: m
        for name, m in resnet.named_modules()
        if isinstance(m, (nn.Conv2d, DeformableConv3x3)) and id(m) not in offsets
    }


def test_msra_is_the_default_and_gives_detectron2s_std_to_every_convolution():
    torch.manual_seed(0)
    assert get_cfg().MODEL.RESNETS.INIT == "msra"
    resnet = ResNet(18, get_norm("BN"), res2_out_channels=64)
    res2_conv = resnet.layer1[0].conv2.weight
    assert res2_conv.shape == (64, 64, 3, 3)
    assert_std(res2_conv, math.sqrt(2 / (9 * 64)), "res2 3x3")
    convs = convolutions(resnet)
    assert {"conv1", "layer2.0.downsample.0", "layer4.1.conv2"} <= set(
        convs
    )  # stem, shortcut, body
    for name, conv in convs.items():
        assert_std(conv.weight, detectron2_msra_std(conv.weight), name)
        assert conv.bias is None


def test_norms_start_at_one_and_zero_including_the_last_of_each_block():
    """detectron2 leaves the zero-init of the last BN of a block commented out: gamma is 1."""
    for init in ("msra", "pytorch"):
        resnet = ResNet(50, get_norm("BN"), init=init)
        norms = [m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)]
        assert resnet.layer1[0].bn3 in norms
        for norm in norms:
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_pytorch_init_keeps_the_default_of_nn_conv2d():
    torch.manual_seed(0)
    resnet = ResNet(18, get_norm("BN"), res2_out_channels=64, init="pytorch")
    assert_std(resnet.layer1[0].conv2.weight, 1 / math.sqrt(3 * 9 * 64), "res2 3x3")
    for name, conv in convolutions(resnet).items():
        bound = 1 / math.sqrt(conv.weight[0].numel())
        assert conv.weight.abs().max().item() <= bound, name
        assert_std(conv.weight, pytorch_default_std(conv.weight), name)


def test_the_two_initialisations_differ_only_in_the_resnet_convolutions():
    """Same seed: the norms are equal and, since the convolutions are re-drawn in place after
    construction, nothing else in the body moves."""
    models = {}
    for init in ("msra", "pytorch"):
        torch.manual_seed(0)
        models[init] = ResNet(
            18, get_norm("BN"), res2_out_channels=32, stem_out_channels=32, init=init
        )
    msra, default = (m.state_dict() for m in models.values())
    conv_keys = {f"{name}.weight" for name in convolutions(models["msra"])}
    assert conv_keys and set(msra) == set(default)
    for key in msra:
        assert torch.equal(msra[key], default[key]) != (key in conv_keys), key


def test_unknown_init_is_an_error_that_names_the_key():
    with pytest.raises(ValueError, match=r"MODEL\.RESNETS\.INIT.*'msra', 'pytorch'.*'xavier'"):
        build_backbone(tiny_cfg("MODEL.RESNETS.INIT", "xavier"))
    with pytest.raises(ValueError, match="init"):
        ResNet(18, get_norm("BN"), init="kaiming")


@pytest.mark.parametrize(
    "config", ["configs/coco/boxteacher_r50_1x.yaml", "configs/coco/boxteacher_r101_dcn_3x.yaml"]
)
def test_backbone_of_the_release_recipes_matches_detectron2_layer_by_layer(config):
    """The official config built from scratch (no weights): every ResNet convolution has the
    std of detectron2's formula, deformable convolutions included, their offsets at zero."""
    torch.manual_seed(0)
    cfg = load_config(str(REPO / config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.RESNETS.INIT == "msra"
    resnet = build_backbone(cfg).bottom_up
    convs = convolutions(resnet)
    assert len(convs) == 1 + sum(
        3 * n + 1 for n in ((3, 4, 6, 3) if cfg.MODEL.RESNETS.DEPTH == 50 else (3, 4, 23, 3))
    )
    for name, conv in convs.items():
        assert_std(conv.weight, detectron2_msra_std(conv.weight), name)
    deformable = [m for m in resnet.modules() if isinstance(m, DeformableConv3x3)]
    assert bool(deformable) == any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
    for m in deformable:
        assert not m.offset.weight.any() and not m.offset.bias.any()
