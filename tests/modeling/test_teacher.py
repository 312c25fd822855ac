"""The teacher pass (``modeling/teacher.py``): its post-processing of a batch against the
image-by-image reference, its pieces, and the teacher view of a tiny CondInst."""

import pytest
import torch

from boxteacher.build import build_model
from boxteacher.modeling.teacher import (
    TeacherPass,
    TeacherView,
    assignable_detections,
    image_mask_probs,
    resize_to_test_size,
    teacher_outputs,
    to_student_frame,
)

from reference_implementations import teacher_outputs_per_image
from tiny_models import sample, tiny_cfg


def batch_detections(
    seed: int, input_sizes, counts, stride=4, divisibility=32
) -> dict[str, torch.Tensor]:
    """Random detections of images of ``input_sizes`` (teacher frame) padded together, with
    smooth mask probabilities at ``stride`` and a few boxes that leave the frame."""
    g = torch.Generator().manual_seed(seed)
    padded = [-(-max(s[k] for s in input_sizes) // divisibility) * divisibility for k in (0, 1)]
    m = sum(counts)
    limits = (
        torch.tensor([[w, h] for h, w in input_sizes])
        .repeat_interleave(torch.tensor(counts), dim=0)
        .float()
    )
    corner = torch.rand(m, 2, generator=g) * limits * 1.1 - 4
    logits = (
        torch.randn(m, 1, padded[0] // (4 * stride), padded[1] // (4 * stride), generator=g) * 4
    )
    return {
        "boxes": torch.cat(
            [corner, corner + 2 + torch.rand(m, 2, generator=g) * limits / 2], dim=1
        ),
        "scores": torch.rand(m, generator=g),
        "labels": torch.randint(0, 5, (m,), generator=g),
        "im_inds": torch.arange(len(counts)).repeat_interleave(torch.tensor(counts)),
        "mask_probs": torch.nn.functional.interpolate(
            logits, scale_factor=4, mode="bilinear"
        ).sigmoid(),
        "fpn_levels": torch.randint(0, 5, (m,), generator=g),
        "locations": torch.rand(m, 2, generator=g) * 64,
        "top_feat": torch.randn(m, 8, generator=g),
    }


@pytest.mark.parametrize(
    "settings",
    [
        TeacherPass(),
        TeacherPass(clip_masks_to_boxes=True),
        TeacherPass(score_in_box=True),
        TeacherPass(float_masks=True, clip_masks_to_boxes=True),
        TeacherPass(float_masks=True, score_in_box=True),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_outputs_equal_the_per_image_reference(settings, seed):
    """Images of different teacher and student sizes (larger, smaller, equal, other aspect),
    one without detections."""
    input_sizes = [(64, 96), (96, 64), (80, 80), (50, 70)]
    student_sizes = [(48, 72), (120, 80), (80, 80), (61, 87)]
    counts = [5, 3, 0, 4]
    detections = batch_detections(seed, input_sizes, counts)
    ours = teacher_outputs(detections, input_sizes, student_sizes, 4, settings)
    reference = teacher_outputs_per_image(detections, input_sizes, student_sizes, 4, settings)
    assert (
        len(ours) == len(reference) and len(ours[2]["scores"]) == 0 and len(ours[0]["scores"]) > 0
    )
    for o, r in zip(ours, reference):
        assert o.keys() == r.keys()
        for key in r:
            torch.testing.assert_close(o[key], r[key], rtol=1e-5, atol=1e-6, msg=key)


def test_teacher_outputs_of_a_batch_without_detections():
    detections = batch_detections(0, [(64, 64), (48, 64)], [0, 0])
    outputs = teacher_outputs(
        detections,
        [(64, 64), (48, 64)],
        [(32, 32), (48, 64)],
        4,
        TeacherPass(clip_masks_to_boxes=True),
    )
    assert [tuple(o["mask_probs"].shape) for o in outputs] == [(0, 32, 32), (0, 48, 64)]
    assert all(o["scores"].shape == (0,) for o in outputs)


# ---------------------------------------------------------------------------------------------
# The pieces of the pass
# ---------------------------------------------------------------------------------------------
def test_resize_to_test_size_follows_the_shortest_edge_rule():
    image = torch.rand(3, 40, 100)
    assert resize_to_test_size(image, None, None) is image
    assert resize_to_test_size(image, 40, 1000) is image  # already at the test size
    assert resize_to_test_size(image, 80, 1000).shape == (3, 80, 200)
    assert resize_to_test_size(image, 80, 150).shape == (3, 60, 150)  # the longest edge caps it
    flat = torch.full((3, 40, 100), 0.25)
    torch.testing.assert_close(resize_to_test_size(flat, 20, 1000), torch.full((3, 20, 50), 0.25))


def test_boxes_go_to_the_student_frame_of_their_own_image_clipped_to_it():
    boxes = torch.tensor([[10.0, 20, 50, 40], [-5, -5, 200, 100], [10, 20, 50, 40]])
    im_inds = torch.tensor([0, 0, 1])
    out = to_student_frame(
        boxes, im_inds, input_sizes=[(80, 100), (40, 100)], student_sizes=[(40, 50), (80, 50)]
    )
    torch.testing.assert_close(
        out, torch.tensor([[5.0, 10, 25, 20], [0, 0, 50, 40], [5, 40, 25, 80]])
    )


def test_assignable_detections_need_an_overlapping_box_of_their_own_image():
    detections = {
        "im_inds": torch.tensor([0, 0, 1, 1]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
    }
    student_boxes = torch.tensor(
        [[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 10, 9]]
    )
    gt_boxes = [torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 8]])]
    kept = assignable_detections(detections, student_boxes, gt_boxes, iou_threshold=0.85)
    # image 0: the first detection only; image 1: IoU 0.8 and 0.89, only the last passes
    torch.testing.assert_close(kept["scores"], torch.tensor([0.9, 0.6]))
    torch.testing.assert_close(kept["im_inds"], torch.tensor([0, 1]))
    assert (
        len(
            assignable_detections(detections, student_boxes, [torch.zeros(0, 4)] * 2, 0.5)["scores"]
        )
        == 0
    )


def test_image_mask_probs_are_the_two_matrix_products_zeroed_outside_the_box():
    g = torch.Generator().manual_seed(0)
    probs, rows, cols = (
        torch.rand(2, 3, 4, generator=g),
        torch.rand(6, 3, generator=g),
        torch.rand(4, 8, generator=g),
    )
    torch.testing.assert_close(image_mask_probs(probs, rows, cols, None), rows @ probs @ cols)
    in_rows = torch.zeros(2, 6, 1)
    in_rows[:, 1:4] = 1
    in_cols = torch.zeros(2, 1, 8)
    in_cols[0, :, 2:5] = 1
    clipped = image_mask_probs(probs, rows, cols, (in_rows, in_cols))
    torch.testing.assert_close(clipped, (rows @ probs @ cols) * in_rows * in_cols)
    assert clipped[1].abs().sum() == 0 and clipped[0, 0].abs().sum() == 0


def test_the_teacher_view_of_a_tiny_condinst_gives_the_protocol_fields_at_the_student_size():
    torch.manual_seed(0)
    detector = build_model(
        tiny_cfg("MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.FCOS.POST_NMS_TOPK_TEST", "5")
    )
    view = TeacherView(detector.eval(), TeacherPass(min_size=64, max_size=128, post_nms_topk=5))
    batch = [
        sample(48, 72, [(4, 4, 30, 30)], [1], seed=0),
        sample(40, 56, [(10, 10, 40, 30)], [2], seed=1),
    ]
    outputs = view.forward_teacher(batch)
    assert len(outputs) == 2
    for out, (h, w) in zip(outputs, [(48, 72), (40, 56)]):
        assert {"boxes", "scores", "mask_scores", "mask_probs", "labels"} <= out.keys()
        m = len(out["scores"])
        assert 0 < m <= 5 and out["mask_probs"].shape == (m, h, w) and out["boxes"].shape == (m, 4)
        assert (out["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (out["boxes"] >= 0).all()
        assert ((out["mask_probs"] >= 0) & (out["mask_probs"] <= 1)).all()
        assert ((out["mask_scores"] >= 0) & (out["mask_scores"] <= 1)).all()


def test_every_detection_of_an_unlabelled_image_stays_a_candidate():
    detections = {
        "im_inds": torch.tensor([0, 0, 1, 1]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
    }
    student_boxes = torch.tensor(
        [[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10], [30, 30, 40, 40]]
    )
    gt_boxes = [torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(0, 4)]
    kept = assignable_detections(detections, student_boxes, gt_boxes, 0.5, unlabeled=[False, True])
    torch.testing.assert_close(kept["scores"], torch.tensor([0.9, 0.7, 0.6]))
