"""CondInst: dynamic head layout, positive sampling, losses on empty and normal batches,
inference output format, parameter names and counts."""

import pytest
import torch

from boxteacher.build import build_model
from boxteacher.config import get_cfg
from boxteacher.modeling.condinst import DynamicMaskHead, sample_top_per_object
from boxteacher.modeling.layers import aligned_bilinear

from tiny_models import sample, tiny_cfg


def test_dynamic_head_parameter_layout():
    head = DynamicMaskHead(in_channels=16, channels=8, num_layers=3)
    assert head.num_gen_params == 233
    assert head.weight_nums + head.bias_nums == [144, 64, 8, 8, 8, 1]
    params = torch.arange(2 * 233, dtype=torch.float32).reshape(2, 233)
    weights, biases = head.split_params(params)
    assert [tuple(w.shape) for w in weights] == [(2, 8, 18), (2, 8, 8), (2, 1, 8)]
    assert [tuple(b.shape) for b in biases] == [(2, 8, 1), (2, 8, 1), (2, 1, 1)]
    # W0 is (out, in) row-major: element o * 18 + i.
    assert weights[0][0, 1, 2].item() == 1 * 18 + 2
    assert biases[2][1, 0, 0].item() == 233 + 232


def test_dynamic_head_matches_a_per_instance_convolution():
    torch.manual_seed(0)
    head = DynamicMaskHead(in_channels=4, channels=3, num_layers=2, disable_rel_coords=True)
    feats = torch.randn(2, 4, 5, 6)
    params = torch.randn(3, head.num_gen_params)
    im_inds = torch.tensor([1, 0, 1])
    out = head(feats, 8, params, im_inds, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    weights, biases = head.split_params(params)
    for k in range(3):
        x = torch.nn.functional.conv2d(
            feats[im_inds[k] : im_inds[k] + 1], weights[0][k][..., None, None], biases[0][k, :, 0]
        )
        x = torch.nn.functional.conv2d(x.relu(), weights[1][k][..., None, None], biases[1][k, :, 0])
        torch.testing.assert_close(out[k : k + 1], x)


def test_relative_coordinates_are_instance_minus_pixel_over_size_of_interest():
    head = DynamicMaskHead(in_channels=1, channels=1, num_layers=1, sizes_of_interest=[64, 128])
    # A single linear layer reading only the x offset: weight (1, 3) = [1, 0, 0], bias 0.
    params = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    out = head(
        torch.zeros(1, 1, 1, 3),
        8,
        params,
        torch.tensor([0]),
        torch.tensor([[20.0, 4.0]]),
        torch.tensor([1]),
    )
    assert out.flatten().tolist() == pytest.approx(
        [(20 - 4) / 128, (20 - 12) / 128, (20 - 20) / 128]
    )


def test_aligned_bilinear_keeps_constant_maps_and_shapes():
    x = torch.full((1, 1, 3, 5), 0.25)
    y = aligned_bilinear(x, 4)
    assert y.shape == (1, 1, 12, 20) and torch.allclose(y, x.new_full(y.shape, 0.25))
    assert aligned_bilinear(x, 1) is x


def test_top_per_object_sampling():
    # Image 0 has objects 0 (3 positives) and 1 (1 positive); image 1 has object 2 (2 positives).
    positives = {
        "gt_inds": torch.tensor([0, 1, 0, 0, 2, 2]),
        "im_inds": torch.tensor([0, 0, 0, 0, 1, 1]),
        "logits": torch.tensor([[0.0], [0.0], [2.0], [1.0], [0.0], [3.0]]),
        "ctrness": torch.zeros(6),
    }
    # per_image = 2: image 0 keeps 1 per object (2 objects), image 1 keeps 2 for its object.
    assert sample_top_per_object(positives, 2).tolist() == [2, 1, 5, 4]
    assert sample_top_per_object(positives, 64).tolist() == [2, 3, 0, 1, 5, 4]


def test_training_losses_and_zero_losses_for_empty_images(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    model.train()
    batch = [sample(64, 64, [(8, 8, 40, 40)], [1]), sample(64, 48, [(4, 10, 30, 60)], [2], seed=1)]
    losses = model(batch, iteration=0)
    assert set(losses) == {
        "loss_fcos_cls",
        "loss_fcos_loc",
        "loss_fcos_ctr",
        "loss_mask",
        "num_fcos_positives",
    }
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    assert model.mask_head._iter.item() == 1  # the official layout's counter, kept up to date

    empty = [sample(64, 64, [], []), sample(48, 64, [], [], seed=1)]
    losses = model(empty, iteration=0)
    for name in ("loss_fcos_loc", "loss_fcos_ctr", "loss_mask"):
        assert losses[name].item() == 0.0 and losses[name].requires_grad
    assert losses["loss_fcos_cls"].item() > 0
    sum(losses.values()).backward()
    assert model.controller.weight.grad is not None
    assert all(p.grad is not None for p in model.mask_branch.parameters())
    assert model.controller.weight.grad.abs().sum() == 0


def test_inputs_are_not_mutated():
    model = build_model(tiny_cfg())
    batch = [sample(64, 64, [(8, 8, 40, 40)], [1])]
    before = {k: v.clone() for k, v in batch[0]["instances"].items()}
    model.train()
    model(batch, iteration=0)
    assert all(torch.equal(before[k], batch[0]["instances"][k]) for k in before)


def test_inference_output_format_in_the_original_frame():
    model = build_model(
        tiny_cfg("MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.FCOS.POST_NMS_TOPK_TEST", "7")
    )
    model.eval()
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    (out,) = model([{"image": image, "height": 128, "width": 192}])
    inst = out["instances"]
    assert set(inst) == {"boxes", "scores", "labels", "masks"}
    n = inst["boxes"].shape[0]
    assert 0 < n <= 7
    assert inst["masks"].shape == (n, 128, 192) and inst["masks"].dtype == torch.bool
    assert (inst["boxes"][:, 0::2] <= 192).all() and (inst["boxes"][:, 1::2] <= 128).all()
    assert (inst["boxes"] >= 0).all()
    assert inst["labels"].dtype == torch.int64 and (inst["labels"] < 3).all()


def test_batched_inference_equals_one_image_at_a_time():
    torch.manual_seed(0)
    model = build_model(
        tiny_cfg("MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.FCOS.POST_NMS_TOPK_TEST", "5")
    )
    model.eval()
    images = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    inputs = [{"image": im, "height": 64, "width": 64} for im in images]
    together = model(inputs)
    for single_input, batched in zip(inputs, together):
        (alone,) = model([single_input])
        torch.testing.assert_close(
            alone["instances"]["boxes"], batched["instances"]["boxes"], atol=1e-4, rtol=1e-4
        )


def test_r50_condinst_state_dict_matches_the_official_layout():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS", "16"])
    model = build_model(cfg)
    state = model.state_dict()
    params = list(model.parameters())
    # Spec section 6.2: 372 entries (137 parameters, 235 buffers), 34,259,731 parameters,
    # 34,037,331 trainable with FREEZE_AT = 2; pixel mean/std are not saved.
    assert len(state) == 372 and len(params) == 137
    assert sum(p.numel() for p in params) == 34_259_731
    assert sum(p.numel() for p in params if p.requires_grad) == 34_037_331
    assert not any("pixel" in k for k in state)
    assert state["mask_head.sizes_of_interest"].tolist() == [64, 128, 256, 512, 1024]
    assert state["controller.weight"].shape == (233, 256, 3, 3)
    assert state["proposal_generator.fcos_head.cls_logits.bias"][0].item() == pytest.approx(
        -4.59512, abs=1e-5
    )


def test_inference_without_any_detection_returns_empty_instances():
    model = build_model(tiny_cfg("MODEL.FCOS.INFERENCE_TH_TEST", "0.999"))
    model.eval()
    (out,) = model(
        [{"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "height": 32, "width": 48}]
    )
    inst = out["instances"]
    assert inst["boxes"].shape == (0, 4) and inst["masks"].shape == (0, 32, 48)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_resnet_depths_match_torchvision(depth):
    """Our ResNet body has torchvision's parameters (minus the 1000-class classifier)."""
    import torchvision

    from boxteacher.modeling.backbone import ResNet
    from boxteacher.modeling.layers import get_norm

    ours = ResNet(
        depth,
        get_norm("BN"),
        out_features=("res5",),
        res2_out_channels=64 if depth < 50 else 256,
        stride_in_1x1=False,
    )
    reference = getattr(torchvision.models, f"resnet{depth}")()
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    x = torch.randn(1, 3, 64, 64)
    assert ours(x)["res5"].shape == (1, 512 if depth < 50 else 2048, 2, 2)
