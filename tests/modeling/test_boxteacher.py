"""BoxTeacher: EMA math and hook, pseudo-mask targets and losses, one training step, the views."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from boxteacher.build import build_model
from boxteacher.data.color_augment import perturb_colors
from boxteacher.engine import SimpleTrainer
from boxteacher.engine.hooks import EMAHook
from boxteacher.modeling.criteria import mean_projection_loss, pseudo_mask_affinity
from boxteacher.modeling.ema import (
    copy_student_to_teacher,
    ema_momentum,
    ema_update,
    mean_parameter_distance,
    momentum_for_horizon,
    teacher_momentum,
)
from boxteacher.modeling.pairwise import neighbour_offsets

from reference_implementations import forward_teacher_per_image
from tiny_models import TINY_BOXTEACHER, label_one, tiny_cfg
from tiny_models import two_view_batch as batch

OFFSETS = neighbour_offsets(3, 2)


def test_ema_momentum_ramp_and_cap():
    assert [ema_momentum(t, 0.999) for t in (0, 1, 2, 9)] == pytest.approx([0, 0.5, 2 / 3, 0.9])
    assert ema_momentum(999, 0.999) == pytest.approx(0.999)
    assert ema_momentum(5000, 0.999) == 0.999
    assert momentum_for_horizon(1000) == pytest.approx(0.999)
    assert momentum_for_horizon(0) == 0.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)


def test_ema_update_averages_parameters_only():
    teacher, student = Net(), Net()
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
        teacher.bn.running_mean.fill_(5.0)
        student.bn.running_mean.fill_(7.0)
    ema_update(teacher, student, 0.75)
    assert all(torch.allclose(p, torch.full_like(p, 1.5)) for p in teacher.parameters())
    assert teacher.bn.running_mean.tolist() == [5.0, 5.0]  # buffers are not averaged
    assert mean_parameter_distance(teacher, student) > 0
    copy_student_to_teacher(teacher, student)
    assert (
        teacher.bn.running_mean.tolist() == [7.0, 7.0]
        and mean_parameter_distance(teacher, student) == 0
    )
    teacher.bn.running_var.fill_(100.0)  # each network's own statistics: not a parameter distance
    assert mean_parameter_distance(teacher, student) == 0


def test_ema_of_a_teacher_in_eval_mode_also_averages_batchnorm_statistics():
    teacher, student = Net(), Net()
    with torch.no_grad():
        teacher.bn.running_mean.fill_(5.0)
        student.bn.running_mean.fill_(7.0)
        teacher.bn.running_var.fill_(1.0)
        student.bn.running_var.fill_(2.0)
    student.bn.num_batches_tracked.fill_(9)
    ema_update(teacher, student, 0.75, norm_stats=True)
    assert teacher.bn.running_mean.tolist() == [5.5, 5.5] and teacher.bn.running_var.tolist() == [
        1.25,
        1.25,
    ]
    assert teacher.bn.num_batches_tracked.item() == 0


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher, self.student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        self.teacher.weight.requires_grad_(False)

    def forward(self, batch, iteration=None):
        return {"loss": (self.student(batch) ** 2).mean() * 0}


def run_ema(start_iter, iterations, teacher_value, student_value, max_momentum=0.9, burn_in=0):
    model = Pair()
    with torch.no_grad():
        model.teacher.weight.fill_(teacher_value)
        model.student.weight.fill_(student_value)
    trainer = SimpleTrainer(
        model,
        iter(lambda: torch.ones(1, 1), None),
        torch.optim.SGD(model.student.parameters(), lr=0.0),
    )
    trainer.register_hooks([EMAHook(max_momentum, log_period=1, burn_in_iters=burn_in)])
    trainer.train(start_iter, start_iter + iterations)
    return model.teacher.weight.item(), trainer.storage


def test_ema_hook_copies_the_student_at_the_start_and_keeps_the_teacher_on_resume():
    teacher, storage = run_ema(0, 3, teacher_value=10.0, student_value=2.0)
    assert teacher == pytest.approx(2.0)  # copied at iteration 0, then averaged with itself
    assert storage.history("ema_momentum").latest() == pytest.approx(2 / 3)
    # Resumed at iteration 5: the teacher of the checkpoint is kept and averaged with
    # m = 0.833, 0.857.
    teacher, _ = run_ema(5, 2, teacher_value=10.0, student_value=2.0)
    m5, m6 = 5 / 6, 6 / 7
    assert teacher == pytest.approx(((10 * m5 + 2 * (1 - m5)) * m6) + 2 * (1 - m6))


def test_a_pretrained_teacher_stays_as_loaded_through_the_burn_in_then_follows_the_student():
    assert [teacher_momentum(t, 0.9, burn_in=3) for t in range(6)] == [
        1.0,
        1.0,
        1.0,
        0.0,
        0.5,
        2 / 3,
    ]
    assert [teacher_momentum(t, 0.9) for t in range(3)] == [ema_momentum(t, 0.9) for t in range(3)]
    teacher, storage = run_ema(0, 3, teacher_value=10.0, student_value=2.0, burn_in=3)
    assert teacher == 10.0  # not copied at iteration 0, not averaged before iteration 3
    assert [v for v, _ in storage.history("ema_momentum").values()] == [1.0, 1.0, 1.0]
    teacher, _ = run_ema(0, 4, teacher_value=10.0, student_value=2.0, burn_in=3)
    assert teacher == pytest.approx(2.0)  # iteration 3: the copy
    teacher, _ = run_ema(4, 1, teacher_value=10.0, student_value=2.0, burn_in=3)
    assert teacher == pytest.approx(10 * 0.5 + 2 * 0.5)  # resumed after the copy: EMA from it


def test_pseudo_mask_affinity_by_hand():
    masks = torch.zeros(1, 1, 5)
    masks[0, 0, :2] = 1.0
    valid = torch.ones(1, 1, 5)
    soft = pseudo_mask_affinity(masks, valid, OFFSETS, threshold=-1)
    # Smoothing: q = (3x3 mean with zeros + m) / 2; on a 1 x 5 row the 3x3 window holds 3 values.
    q = torch.tensor([(2 / 9 + 1) / 2, (2 / 9 + 1) / 2, (1 / 9) / 2, 0.0, 0.0])
    right = OFFSETS.index((0, 2))
    expected = q[0] * q[2] + (1 - q[0]) * (1 - q[2])
    assert soft[0, right, 0, 0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert soft[0, right, 0, 3].item() == 0.0  # neighbour outside the grid
    hard = pseudo_mask_affinity(masks, valid, OFFSETS, threshold=0.5)
    assert hard.dtype == torch.bool and hard[0, right, 0, 0] == (expected >= 0.5)
    invalid = pseudo_mask_affinity(masks, torch.zeros(1, 1, 5), OFFSETS, threshold=-1)
    assert invalid.abs().sum() == 0


def test_mean_projection_loss_is_zero_for_identical_masks():
    masks = torch.zeros(1, 1, 6, 6)
    masks[0, 0, 1:4, 2:5] = 1
    assert mean_projection_loss(masks, masks).item() == pytest.approx(0.0, abs=1e-4)  # Dice eps
    assert mean_projection_loss(masks * 0.2, masks).item() > 0.1


def boxteacher(*overrides):
    return build_model(tiny_cfg(*TINY_BOXTEACHER, *overrides))


def test_one_training_step_has_finite_losses_and_no_teacher_gradient():
    model = boxteacher("MODEL.FCOS.INFERENCE_TH_TEST", "0.0")
    model.train()
    losses = model(batch(), iteration=0)
    expected = {
        "loss_fcos_cls",
        "loss_fcos_loc",
        "loss_fcos_ctr",
        "loss_prj",
        "loss_pairwise",
        "loss_mask",
        "loss_mask_affinity",
        "num_pseudo_masks",
        "num_fcos_positives",
    }
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert model.teacher.training  # the teacher pass runs in train mode by default


def test_the_teacher_drops_unassignable_detections_without_changing_the_training_step():
    torch.manual_seed(0)
    pruned = boxteacher("MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.BOX_TEACHER.IOU_THR", "0.3")
    full = boxteacher("MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.BOX_TEACHER.IOU_THR", "0.3")
    full.teacher_view.settings = dataclasses.replace(full.teacher_view.settings, candidate_iou=None)
    assert pruned.teacher_view.settings.candidate_iou == 0.3
    with torch.no_grad():  # boxes of about 16 x 16 pixels at stride 8 (a random head gives slivers)
        pruned.teacher.proposal_generator.fcos_head.bbox_pred.bias.fill_(1.0)
    full.load_state_dict(pruned.state_dict())
    pruned.train()
    full.train()
    with torch.no_grad():
        kept, every = (
            pruned.teacher_view.forward_teacher(batch()),
            full.teacher_view.forward_teacher(batch()),
        )
    for image, (k, e) in enumerate(zip(kept, every)):
        gt = batch()[image]["instances"]["boxes"]
        assignable = (box_iou(e["boxes"], gt) >= 0.3).any(dim=1)
        assert 0 < int(assignable.sum()) < assignable.numel()
        for key in ("boxes", "labels", "locations"):
            assert torch.equal(k[key], e[key][assignable]), key
        # The mask head runs on fewer detections: equal up to float rounding.
        for key in ("scores", "mask_scores", "mask_probs"):
            torch.testing.assert_close(k[key], e[key][assignable], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    losses_pruned = pruned(batch(), iteration=0)
    torch.manual_seed(0)
    losses_full = full(batch(), iteration=0)
    assert losses_full["num_pseudo_masks"].item() > 0
    for name, value in losses_full.items():
        torch.testing.assert_close(losses_pruned[name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("test_size, batch_shape", [("True", (64, 96)), ("False", (64, 64))])
def test_the_teacher_sees_the_test_size_or_the_student_size(test_size, batch_shape):
    model = boxteacher(
        "MODEL.BOX_TEACHER.TEACHER_TEST_SIZE", test_size
    )  # test size 64; images 64x64, 48x64
    seen = []
    run_heads = model.teacher.run_heads
    model.teacher.run_heads = lambda images: (
        seen.append(tuple(images.shape[-2:])) or run_heads(images)
    )
    model.train()
    with torch.no_grad():
        outputs = model.teacher_view.forward_teacher(batch())
    assert seen == [batch_shape]  # 48x64 -> 64x85 at the test size, padded to multiples of 32
    assert [tuple(o["mask_probs"].shape[-2:]) for o in outputs] == [(64, 64), (48, 64)]


def test_the_legacy_assignment_gets_every_teacher_detection():
    assert (
        boxteacher(
            "MODEL.BOX_TEACHER.LEGACY_ASSIGNMENT", "True"
        ).teacher_view.settings.candidate_iou
        is None
    )


def test_pseudo_losses_are_zero_and_connected_when_no_box_is_matched():
    model = boxteacher("MODEL.FCOS.INFERENCE_TH_TEST", "1.0")  # the teacher detects nothing
    model.train()
    losses = model(batch(), iteration=0)
    for name in ("loss_mask", "loss_mask_affinity"):
        assert losses[name].item() == 0.0 and losses[name].requires_grad
    assert losses["num_pseudo_masks"].item() == 1.0  # clamped count of weighted masks
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()


def test_pseudo_labels_follow_the_assignment():
    model = boxteacher()
    sample = batch()[0]
    h, w = sample["image"].shape[-2:]
    probs = torch.zeros(2, h, w)
    probs[0, 10:20, 10:20] = 0.9
    probs[1, 35:50, 35:50] = 0.8
    prediction = {
        "boxes": torch.tensor([[31.0, 31.0, 59.0, 59.0], [100.0, 100.0, 110.0, 110.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "mask_scores": torch.tensor([0.7, 0.6]),
        "mask_probs": probs,
    }
    labelled = label_one(model, sample, prediction)
    assert labelled["pseudo_weights"].tolist() == pytest.approx([0.0, 0.7])
    assert labelled["pseudo_masks"][0].sum() == 0  # unmatched box
    assert torch.equal(labelled["pseudo_masks"][1], probs[0] > 0.5)
    assert "pseudo_masks" not in sample["instances"]  # the input is not modified


def test_refined_pseudo_masks_follow_the_colour_edges_of_the_clean_view():
    assert boxteacher().labeler.refinement is None
    model = boxteacher(
        "MODEL.BOX_TEACHER.REFINE_RADIUS", "4", "MODEL.BOX_TEACHER.REFINE_EPS", "0.02"
    )
    assert (model.labeler.refinement.radius, model.labeler.refinement.eps) == (4, 0.02)
    sample = batch()[0]
    sample["image"] = torch.full_like(sample["image"], 20)
    sample["image"][:, 34:56, 34:56] = 230  # the object of the second box (30, 30, 60, 60)
    probs = torch.zeros(1, 64, 64)
    probs[0, 33:58, 33:58] = 0.9  # a teacher mask a little too large
    prediction = {
        "boxes": torch.tensor([[33.0, 33.0, 58.0, 58.0]]),
        "scores": torch.tensor([0.9]),
        "mask_scores": torch.tensor([0.7]),
        "mask_probs": probs,
    }
    masks = label_one(model, sample, prediction)["pseudo_masks"]
    assert masks.dtype == torch.bool and not masks[0].any()
    assert torch.equal(masks[1], sample["image"][0] > 100)
    with pytest.raises(ValueError, match="MODEL.BOX_TEACHER.REFINE_RADIUS"):
        boxteacher("MODEL.BOX_TEACHER.REFINE_RADIUS", "-1")


def test_soft_pseudo_masks_keep_the_teacher_probabilities_as_dice_targets():
    binary, soft = boxteacher(), boxteacher("MODEL.BOX_TEACHER.SOFT_PSEUDO_MASKS", "True")
    soft.load_state_dict(binary.state_dict())
    sample = batch()[0]
    h, w = sample["image"].shape[-2:]
    probs = torch.zeros(1, h, w)
    probs[0, 8:40, 8:40] = torch.linspace(0.2, 1.0, 32)[None, :]
    prediction = {
        "boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]),
        "scores": torch.tensor([0.9]),
        "mask_scores": torch.tensor([0.8]),
        "mask_probs": probs,
    }
    assert torch.equal(label_one(soft, sample, prediction)["pseudo_masks"][0], probs[0])
    assert torch.equal(label_one(binary, sample, prediction)["pseudo_masks"][0], probs[0] > 0.5)

    def targets(model):
        labelled = [{**sample, "instances": label_one(model, sample, prediction)}]
        gt = [{k: v for k, v in labelled[0]["instances"].items()}]
        return model.student.mask_targets(labelled, gt, (64, 64), [(h, w)])["criteria"][-1][
            "pseudo_masks"
        ]

    soft_targets, binary_targets = targets(soft), targets(binary)
    assert soft_targets.dtype == torch.float32 and binary_targets.dtype == torch.bool
    # stride-4 samples at (4r + 2, 4c + 2), inside the box
    assert soft_targets[0, 4, 4].item() == pytest.approx(probs[0, 18, 18].item())
    assert torch.equal(soft_targets > 0.5, binary_targets)
    assert 0 < soft_targets[0, 4, 2].item() < 0.5


def test_evaluation_uses_the_teacher_or_the_student():
    model = boxteacher()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01)
    model.eval()
    image = [
        {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}
    ]
    assert torch.equal(
        model(image)[0]["instances"]["boxes"], model.teacher(image)[0]["instances"]["boxes"]
    )
    model.use_teacher_inference = False
    assert torch.equal(
        model(image)[0]["instances"]["boxes"], model.student(image)[0]["instances"]["boxes"]
    )


@pytest.mark.parametrize("aug_type", ["strong", "strongv2", "weak"])
def test_student_view_changes_colours_only(aug_type):
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[:, :, 0] = 40
    image[5:15, 10:20] = (200, 60, 30)
    changed = 0
    for seed in range(20):
        view = perturb_colors(image, aug_type, np.random.default_rng(seed), "BGR")
        assert view.shape == image.shape and view.dtype == np.uint8
        changed += int(not np.array_equal(view, image))
        if aug_type != "strongv2":  # colour-only ops map equal pixels to equal pixels
            inside, outside = view[5:15, 10:20].reshape(-1, 3), view[:5].reshape(-1, 3)
            assert (inside == inside[0]).all() and (outside == outside[0]).all()
    assert changed > 0
    assert np.array_equal(perturb_colors(image, "none", np.random.default_rng(0), "BGR"), image)


def test_the_two_views_share_the_geometric_transform(tmp_path):
    import cv2

    from boxteacher.data.mapper import DatasetMapper

    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    record = {
        "file_name": str(tmp_path / "a.png"),
        "image_id": 1,
        "height": 60,
        "width": 90,
        "annotations": [{"bbox": [10.0, 5.0, 50.0, 40.0], "category_id": 0, "iscrowd": 0}],
    }
    options = dict(min_sizes=(40, 50, 60, 70), max_size=200, hflip=True, with_masks=False)
    for seed in range(8):
        plain = DatasetMapper(True, **options)(record, np.random.default_rng(seed))
        two = DatasetMapper(True, student_aug="strong", **options)(
            record, np.random.default_rng(seed)
        )
        assert torch.equal(plain["image"], two["image"])  # same resize and flip as without a view
        assert two["aug_image"].shape == two["image"].shape
        assert torch.equal(plain["instances"]["boxes"], two["instances"]["boxes"])
        replaced = DatasetMapper(True, student_aug="strong", student_aug_separate=False, **options)(
            record, np.random.default_rng(seed)
        )
        assert "aug_image" not in replaced and torch.equal(replaced["image"], two["aug_image"])


@pytest.mark.parametrize(
    "overrides",
    [
        ("MODEL.BOX_TEACHER.IOU_THR", "0.3"),
        (
            "MODEL.BOX_TEACHER.TEACHER_TEST_SIZE",
            "True",
            "MODEL.BOX_TEACHER.CLIP_MASKS_TO_BOXES",
            "True",
        ),
        ("MODEL.BOX_TEACHER.SCORE_IN_BOX", "True", "MODEL.BOX_TEACHER.IOU_THR", "0.1"),
    ],
)
def test_the_batched_teacher_pass_equals_the_per_image_reference(overrides):
    torch.manual_seed(0)
    model = boxteacher("MODEL.FCOS.INFERENCE_TH_TEST", "0.0", *overrides)
    with torch.no_grad():  # boxes of about 16 x 16 pixels at stride 8 (a random head gives slivers)
        model.teacher.proposal_generator.fcos_head.bbox_pred.bias.fill_(1.0)
    model.train()
    samples = batch() + [
        {
            **batch()[1],
            "instances": {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        }
    ]
    with torch.no_grad():
        ours = model.teacher_view.forward_teacher(samples)
        reference = forward_teacher_per_image(model.teacher_view, samples)
    assert [len(o["scores"]) for o in ours] == [len(r["scores"]) for r in reference]
    assert len(ours[0]["scores"]) > 0 and len(ours[2]["scores"]) == 0
    for o, r in zip(ours, reference):
        assert o.keys() == r.keys()
        for key in r:
            torch.testing.assert_close(o[key], r[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_mixed_precision_step_runs_the_networks_in_bfloat16_with_labels_and_losses_in_float32():
    torch.manual_seed(0)
    model = boxteacher(
        "MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.BOX_TEACHER.REFINE_RADIUS", "2"
    )
    with torch.no_grad():
        model.teacher.proposal_generator.fcos_head.bbox_pred.bias.fill_(1.0)
    model.student.load_state_dict(model.teacher.state_dict())
    model.train()
    dtypes = {}

    def record(name):
        def hook(module, inputs, outputs):
            dtypes[name] = outputs["p3"].dtype

        return hook

    model.teacher.backbone.register_forward_hook(record("teacher"))
    model.student.backbone.register_forward_hook(record("student"))
    labelled = []
    assign = model.assign
    model.assign = lambda *args: labelled.append(assign(*args)) or labelled[-1]
    torch.manual_seed(1)
    full = model(batch(), iteration=0)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(batch(), iteration=0)
    assert dtypes == {"teacher": torch.bfloat16, "student": torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in mixed.values())
    assert all(
        p["masks"].dtype == torch.bool and p["weights"].dtype == torch.float32 for p in labelled[1]
    )
    assert sum(int(p["weights"].gt(0).sum()) for p in labelled[1]) > 0
    for name, value in full.items():
        torch.testing.assert_close(mixed[name], value, rtol=0.1, atol=0.02, msg=name)


def test_the_cost_of_a_step_does_not_grow_with_the_boxes():
    """Operator calls and host synchronisations of a training step (forward and backward) with
    1 and with 16 boxes per image: no loop over boxes or detections (the assignment may take
    a round more, one sync each)."""

    def crowded_batch(num_boxes):
        g = torch.Generator().manual_seed(0)
        samples = []
        for h, w in ((64, 64), (48, 64), (64, 48)):
            image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)
            xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
            boxes = torch.cat([xy, xy + 8 + torch.rand(num_boxes, 2, generator=g) * 16], 1)
            samples.append(
                {
                    "image": image,
                    "aug_image": 255 - image,
                    "height": h,
                    "width": w,
                    "instances": {
                        "boxes": boxes,
                        "labels": torch.zeros(num_boxes, dtype=torch.long),
                    },
                }
            )
        return samples

    torch.manual_seed(0)
    model = boxteacher(
        "MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.BOX_TEACHER.REFINE_RADIUS", "2"
    )
    with torch.no_grad():
        model.teacher.proposal_generator.fcos_head.bbox_pred.bias.fill_(1.0)
    model.train()
    costs = {}
    for num_boxes in (1, 16):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            losses = model(crowded_batch(num_boxes), iteration=0)
            sum(v for k, v in losses.items() if k.startswith("loss")).backward()
        assert losses["num_pseudo_masks"] >= (3 if num_boxes == 1 else 30)
        events = list(profile.events())
        ops = sum(
            1
            for e in events
            if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        )
        syncs = sum(1 for e in events if e.name in ("aten::_local_scalar_dense", "aten::nonzero"))
        costs[num_boxes] = ops, syncs
    (ops_few, syncs_few), (ops_many, syncs_many) = costs[1], costs[16]
    assert abs(ops_many - ops_few) <= 0.05 * ops_few, costs
    assert abs(syncs_many - syncs_few) <= 2 and syncs_many <= 12, costs
