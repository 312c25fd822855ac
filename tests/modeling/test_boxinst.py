"""BoxInst: hand-computed box masks, validity, colour similarity, projection and pairwise terms;
the fast pairwise term against the unfold oracle; robustness to tiny, outside and missing boxes."""

import math
import os

import pytest
import torch

from boxteacher.build import build_model
from boxteacher.modeling.boxinst import (
    box_mask_centers,
    box_masks_at_stride,
    color_similarity,
    downsampled_lab,
    projection_loss,
    rgb_to_lab,
    valid_pixels_at_stride,
)
from boxteacher.modeling.pairwise import (
    PairWeights,
    neighbour_offsets,
    pairwise_loss,
    pairwise_loss_reference,
    pairwise_losses,
)

from tiny_models import tiny_cfg

OFFSETS = neighbour_offsets(3, 2)


def test_neighbour_offsets_are_the_dilated_ring_in_raster_order():
    assert OFFSETS == [(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)]


def test_box_masks_use_truncated_pixel_ranges_including_boxes_at_the_border():
    boxes = torch.tensor([[0.0, 5.0, 16.0, 16.0], [4.5, 2.9, 7.2, 6.1]])
    masks = box_masks_at_stride(boxes, (16, 16), 4)  # samples full-res pixels 2, 6, 10, 14
    # Box 0 touches the left and right borders: columns 0..16 -> all samples;
    # rows 5..16 -> 6, 10, 14.
    assert masks[0].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    # Box 1: columns int(4.5)=4 .. int(8.2)-1=7 -> sample 6; rows 2 .. int(7.1)-1=6 -> 2, 6.
    assert masks[1].tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # Centres of mass of the full-resolution masks, clipped to the frame: box 0 covers columns
    # 0..15 and rows 5..15, box 1 columns 4..7 and rows 2..6.
    assert box_mask_centers(boxes, (16, 16)).tolist() == [[7.5, 10.0], [5.5, 4.0]]


def test_bottom_pixels_rule_and_padding():
    # An image resized from height 48 to 24 loses int(10 * 24 / 48) = 5 rows: full-res rows >= 19.
    valid = valid_pixels_at_stride([(24, 16)], [48], (24, 24), 4, 10, torch.device("cpu"))
    assert valid[0].tolist() == [[1, 1, 1, 1, 0, 0]] * 5 + [[0] * 6]
    assert (
        valid_pixels_at_stride([(24, 16)], [48], (24, 24), 4, 0, torch.device("cpu"))[0, 5, 0] == 1
    )


def test_lab_of_reference_colours():
    colours = torch.tensor([[255.0, 255.0, 255.0], [0.0, 0.0, 0.0], [255.0, 0.0, 0.0]]).T.reshape(
        1, 3, 3, 1
    )
    lab = rgb_to_lab(colours)[0, :, :, 0].T
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.01)
    assert lab[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-4)
    assert lab[2].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.02)  # sRGB red


def test_color_similarity_of_a_constant_image_is_one_where_the_neighbour_is_valid():
    image = torch.full((1, 3, 24, 24), 77, dtype=torch.uint8)
    lab = downsampled_lab(image, 4, [2, 1, 0])
    valid = valid_pixels_at_stride([(24, 20)], [24], (24, 24), 4, 4, torch.device("cpu"))
    sim = color_similarity(lab, valid, OFFSETS)
    for n, (dy, dx) in enumerate(OFFSETS):
        for y in range(6):
            for x in range(6):
                ny, nx = y + dy, x + dx
                inside = 0 <= ny < 6 and 0 <= nx < 6
                expected = 1.0 if inside and valid[0, ny, nx] == 1 else 0.0
                assert sim[0, n, y, x].item() == pytest.approx(expected, abs=1e-5)


def test_color_similarity_of_two_colours_and_the_threshold_distance():
    lab = torch.zeros(1, 3, 1, 3)
    lab[0, 0, 0, 2] = 2 * math.log(10 / 3)  # similarity exactly 0.3
    sim = color_similarity(lab, torch.ones(1, 1, 3), OFFSETS)
    assert sim[0, OFFSETS.index((0, 2)), 0, 0].item() == pytest.approx(0.3)
    assert sim[0, OFFSETS.index((0, -2)), 0, 2].item() == pytest.approx(0.3)


def test_projection_term_by_hand():
    probs = torch.zeros(1, 1, 4, 4)
    probs[0, 0, 1, 1], probs[0, 0, 2, 2] = 0.8, 0.6
    box = torch.zeros(1, 1, 4, 4)
    box[0, 0, 1:3, 1:3] = 1
    # Both projections are [0, 0.8, 0.6, 0] against [0, 1, 1, 0].
    dice = 1 - 2 * (0.8 + 0.6) / (0.64 + 0.36 + 2 + 1e-5)
    assert projection_loss(probs, box).item() == pytest.approx(2 * dice, rel=1e-5)


def test_pairwise_term_by_hand_on_one_row():
    logits = torch.tensor([[[[0.0, 5.0, math.log(3.0)]]]])  # p = 0.5, ~1, 0.75
    image = torch.full((1, 3, 4, 12), 9, dtype=torch.uint8)  # constant colour, 1 x 3 at stride 4
    lab = downsampled_lab(image, 4, [2, 1, 0])
    pair_weights = color_similarity(lab, torch.ones(1, 1, 3), OFFSETS) >= 0.3
    sums, weights = pairwise_loss(
        logits, pair_weights, torch.tensor([0]), torch.ones(1, 1, 3), OFFSETS
    )
    # Only pixels 0 and 2 are neighbours (distance 2): P(same) = 0.5 * 0.75 + 0.5 * 0.25 = 0.5.
    assert weights.item() == 2
    assert sums.item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_pairwise_term_ignores_pairs_whose_centre_is_outside_the_box():
    logits = torch.tensor([[[[0.0, 5.0, math.log(3.0)]]]])
    pair_weights = torch.ones(1, 8, 1, 3, dtype=torch.bool)
    box = torch.tensor([[[1.0, 0.0, 0.0]]])
    sums, weights = pairwise_loss(logits, pair_weights, torch.tensor([0]), box, OFFSETS)
    assert weights.item() == 8  # all 8 neighbours of pixel 0 weigh; only (0, 2) is inside the grid
    assert sums.item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "k, h, w, images", [(1, 4, 4, 1), (5, 6, 6, 2), (7, 13, 9, 3), (16, 25, 42, 2)]
)
def test_fast_pairwise_equals_the_unfold_oracle_in_value_and_gradient(
    k, h, w, images, dtype, tolerance
):
    g = torch.Generator().manual_seed(k * 100 + h)
    logits = (torch.randn(k, 1, h, w, generator=g) * 4).to(dtype).requires_grad_()
    pair_weights = torch.rand(images, 8, h, w, generator=g) > 0.3
    pair_index = torch.randint(0, images, (k,), generator=g)
    centre = (torch.rand(k, 1, h, w, generator=g) > 0.4).to(dtype)
    upstream = torch.rand(k, generator=g).to(dtype)

    fast, fast_w = pairwise_loss(logits, pair_weights, pair_index, centre, OFFSETS)
    (fast_grad,) = torch.autograd.grad((fast * upstream).sum(), logits)
    oracle, oracle_w = pairwise_loss_reference(logits, pair_weights, pair_index, centre, 3, 2)
    (oracle_grad,) = torch.autograd.grad((oracle * upstream).sum(), logits)

    assert torch.equal(fast_w, oracle_w)
    torch.testing.assert_close(
        fast / fast_w.clamp(min=1), oracle / oracle_w.clamp(min=1), atol=tolerance, rtol=0
    )
    torch.testing.assert_close(fast_grad, oracle_grad, atol=tolerance, rtol=0)


def box_supports(k: int, h: int, w: int, g: torch.Generator, tall: bool) -> torch.Tensor:
    """(K, 1, h, w) centre weights inside random boxes: many touch a border of the grid (their
    pairs reach outside it), one is empty, one covers the grid; tall or wide boxes."""
    centre = torch.zeros(k, 1, h, w)
    for i in range(k):
        y0, x0 = [int(v) for v in torch.randint(0, 3, (2,), generator=g)]
        bh = (
            int(torch.randint(1, h + 1, (1,), generator=g))
            if tall
            else int(torch.randint(1, 4, (1,), generator=g))
        )
        bw = (
            int(torch.randint(1, 4, (1,), generator=g))
            if tall
            else int(torch.randint(1, w + 1, (1,), generator=g))
        )
        if i % 3 == 1:  # at the bottom-right corner
            y0, x0 = max(h - bh, 0), max(w - bw, 0)
        centre[i, 0, y0 : y0 + bh, x0 : x0 + bw] = (
            torch.rand(min(bh, h - y0), min(bw, w - x0), generator=g) + 0.5
        )
    centre[0] = 0
    centre[-1] = 1
    return centre


@pytest.mark.parametrize("tall", [True, False])
@pytest.mark.parametrize("float_pairs", [True, False])
@pytest.mark.parametrize("k, h, w", [(2, 5, 7), (9, 17, 23), (12, 30, 11)])
def test_pairwise_on_the_regions_of_boxes_equals_the_unfold_oracle(k, h, w, float_pairs, tall):
    """Boxes that touch the borders, stacked regions of different heights, an empty instance,
    one that covers the grid, pair weights as bool or float, and wide or tall boxes (the canvas
    then stacks columns): the same loss sums, weight sums and gradients as the oracle."""
    g = torch.Generator().manual_seed(k * 1000 + h * 10 + w + 7 * float_pairs + tall)
    logits = (torch.randn(k, 1, h, w, generator=g) * 4).double().requires_grad_()
    pair_weights = torch.rand(3, 8, h, w, generator=g)
    pair_weights = pair_weights.double() if float_pairs else pair_weights > 0.3
    pair_index = torch.randint(0, 3, (k,), generator=g)
    centre = box_supports(k, h, w, g, tall).double()
    upstream = torch.rand(k, generator=g).double()

    fast, fast_w = pairwise_loss(logits, pair_weights, pair_index, centre, OFFSETS)
    (fast_grad,) = torch.autograd.grad((fast * upstream).sum(), logits)
    oracle, oracle_w = pairwise_loss_reference(logits, pair_weights, pair_index, centre, 3, 2)
    (oracle_grad,) = torch.autograd.grad((oracle * upstream).sum(), logits)

    torch.testing.assert_close(fast_w, oracle_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, oracle, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_grad, oracle_grad, rtol=1e-10, atol=1e-10)
    assert fast[0] == 0 and fast_w[0] == 0


def test_pairwise_without_instances_or_weights_is_zero_and_connected_to_the_graph():
    for k, weight in ((0, 1.0), (3, 0.0)):
        logits = torch.randn(k, 1, 6, 8, requires_grad=True)
        sums, weights = pairwise_loss(
            logits,
            torch.ones(1, 8, 6, 8, dtype=torch.bool),
            torch.zeros(k, dtype=torch.long),
            torch.full((k, 1, 6, 8), weight),
            OFFSETS,
        )
        assert sums.shape == weights.shape == (k,) and not sums.any() and not weights.any()
        sums.sum().backward()
        assert logits.grad is not None and not logits.grad.any()


def test_fast_pairwise_is_stable_for_saturated_logits():
    logits = torch.tensor([[[[60.0, 0.0, -60.0, 0.0, 60.0]]]], requires_grad=True)
    sums, _ = pairwise_loss(
        logits,
        torch.ones(1, 8, 1, 5, dtype=torch.bool),
        torch.tensor([0]),
        torch.ones(1, 1, 5),
        OFFSETS,
    )
    sums.sum().backward()
    assert torch.isfinite(sums).all() and torch.isfinite(logits.grad).all()
    # Both directions of the pairs (0, 2) and (2, 4) cost 60 - log 2 each; those of (1, 3) log 2.
    assert sums.item() == pytest.approx(4 * (60 - math.log(2)) + 2 * math.log(2), rel=1e-6)


def test_several_weightings_at_once_equal_one_call_each_in_value_and_gradient():
    """BoxTeacher's student weighs the same likelihoods by colour (per image) and by pseudo-mask
    affinity (per instance, bool): one pass for both gives what two passes give."""
    g = torch.Generator().manual_seed(0)
    k, h, w = 6, 20, 24
    logits = torch.randn(k, 1, h, w, generator=g, dtype=torch.float64) * 3
    colour = PairWeights(
        torch.rand(2, 8, h, w, generator=g, dtype=torch.float64),
        torch.tensor([0, 0, 1, 1, 0, 1]),
        (torch.rand(k, h, w, generator=g) > 0.3).double(),
    )
    affinity = PairWeights(
        torch.rand(k, 8, h, w, generator=g) > 0.5,
        torch.arange(k),
        (torch.rand(k, h, w, generator=g) > 0.3).double(),
    )
    scale_a, scale_b = (
        torch.rand(k, generator=g, dtype=torch.float64),
        torch.rand(k, generator=g, dtype=torch.float64),
    )

    def run(together):
        x = logits.clone().requires_grad_()
        if together:
            (loss_a, count_a), (loss_b, count_b) = pairwise_losses(
                x, [colour, affinity], OFFSETS, kernel="packed"
            )
        else:
            loss_a, count_a = pairwise_loss(x, *colour, OFFSETS, kernel="packed")
            loss_b, count_b = pairwise_loss(x, *affinity, OFFSETS, kernel="packed")
        ((loss_a * scale_a).sum() + (loss_b * scale_b).sum()).backward()
        return [t.detach() for t in (loss_a, count_a, loss_b, count_b, x.grad)]

    for together, apart in zip(run(True), run(False)):
        torch.testing.assert_close(together, apart, rtol=1e-12, atol=1e-12)


def boxinst(*overrides):
    return build_model(tiny_cfg("MODEL.BOXINST.ENABLED", "True", *overrides))


def box_sample(h, w, boxes, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g),
        "height": h,
        "width": w,
        "instances": {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
        },
    }


def test_boxinst_losses_and_their_names():
    model = boxinst()
    model.train()
    losses = model(
        [box_sample(64, 64, [(8, 8, 40, 40)], [1]), box_sample(64, 48, [(4, 10, 30, 60)], [2], 1)],
        iteration=0,
    )
    assert set(losses) == {
        "loss_fcos_cls",
        "loss_fcos_loc",
        "loss_fcos_ctr",
        "loss_prj",
        "loss_pairwise",
        "num_fcos_positives",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_prj"].item() > 0
    # Warm-up: the pairwise term is scaled by (t + 1) / 10000 at the engine's iteration t.
    model2 = boxinst("MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", "1")
    model2.load_state_dict(model.state_dict())
    batch = [box_sample(64, 64, [(8, 8, 40, 40)], [1])]
    full = model2(batch, iteration=0)["loss_pairwise"]
    for iteration in (0, 4999, 20000):
        warm = model(batch, iteration=iteration)["loss_pairwise"]
        assert warm.item() == pytest.approx(
            full.item() * min((iteration + 1) / 10000, 1.0), rel=1e-5
        )


def test_empty_images_give_zero_mask_losses_connected_to_the_graph():
    model = boxinst()
    model.train()
    losses = model([box_sample(64, 64, [], []), box_sample(32, 64, [], [], 1)], iteration=0)
    for name in ("loss_fcos_loc", "loss_fcos_ctr", "loss_prj", "loss_pairwise"):
        assert losses[name].item() == 0.0 and losses[name].requires_grad
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.mask_branch.parameters())


@pytest.mark.parametrize(
    "boxes",
    [
        [(10.2, 10.3, 10.8, 10.9)],  # smaller than one stride-4 cell
        [(40.0, 50.0, 90.0, 120.0)],  # mostly outside the 64 x 64 image
        [(-20.0, -5.0, 12.0, 70.0), (30.0, 30.0, 30.5, 60.0)],
    ],
)
def test_degenerate_boxes_give_finite_losses_and_gradients(boxes):
    model = boxinst("MODEL.FCOS.SIZES_OF_INTEREST", "[8, 16, 32, 64]")
    model.train()
    losses = model([box_sample(64, 64, boxes, [0] * len(boxes))], iteration=0)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_box_supervision_never_reads_masks():
    model = boxinst()
    model.train()
    sample = box_sample(64, 64, [(8, 8, 40, 40)], [1])

    class NoMasks(dict):
        def __getitem__(self, key):
            assert key != "masks", "BoxInst read the annotation masks"
            return super().__getitem__(key)

    sample["instances"] = NoMasks(sample["instances"])
    model([sample], iteration=0)


FUSED_CHECK = """
import torch
from boxteacher.modeling.pairwise import neighbour_offsets, pairwise_loss, pairwise_loss_reference
g = torch.Generator().manual_seed(0)
for k, h, w, images, size, dilation, soft in [
    (3, 7, 9, 2, 3, 2, False), (4, 12, 10, 3, 3, 1, True), (2, 9, 11, 1, 5, 1, False)
]:
    logits = torch.randn(k, 1, h, w, generator=g) * 4
    pair_weights = torch.rand(images, size * size - 1, h, w, generator=g)
    pair_weights = pair_weights if soft else pair_weights > 0.3
    pair_index = torch.randint(0, images, (k,), generator=g)
    centre = (torch.rand(k, 1, h, w, generator=g) > 0.4).float()
    upstream = torch.rand(k, generator=g)
    results = []
    for kernel in ("fused", "reference"):
        x = logits.clone().requires_grad_()
        if kernel == "fused":
            sums, weights = pairwise_loss(
                x, pair_weights, pair_index, centre, neighbour_offsets(size, dilation), "fused"
            )
        else:
            sums, weights = pairwise_loss_reference(
                x, pair_weights, pair_index, centre, size, dilation
            )
        (sums * upstream).sum().backward()
        results.append((sums, weights, x.grad))
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused.detach(), reference.detach(), rtol=1e-5, atol=1e-4)
print("fused kernels agree")
"""


@pytest.mark.slow
def test_fused_pairwise_kernels_equal_the_unfold_oracle_in_tritons_interpreter():
    """The CUDA kernels run on the CPU in Triton's interpreter (set before Triton is imported,
    hence a fresh process): values and gradients equal the oracle's, for 3x3 and 5x5
    neighbourhoods, hard and soft pair weights."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", FUSED_CHECK], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0 and "fused kernels agree" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-3000:]
    )


def test_the_pairwise_kernel_is_chosen_by_device():
    with pytest.raises(ValueError, match="kernel"):
        pairwise_loss(
            torch.zeros(1, 3, 3),
            torch.ones(1, 8, 3, 3, dtype=torch.bool),
            torch.tensor([0]),
            torch.ones(1, 3, 3),
            OFFSETS,
            "triton",
        )
    sums, _ = pairwise_loss(
        torch.zeros(1, 3, 3, requires_grad=True),
        torch.ones(1, 8, 3, 3, dtype=torch.bool),
        torch.tensor([0]),
        torch.ones(1, 3, 3),
        OFFSETS,
    )
    assert (
        "PairwiseLoss" in type(sums.grad_fn).__name__
        and "Triton" not in type(sums.grad_fn).__name__
    )
