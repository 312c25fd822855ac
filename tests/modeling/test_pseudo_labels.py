"""BoxTeacher's assignment against a brute-force greedy loop, and the mask-aware scores."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from boxteacher.modeling.layers import boxes_to_masks
from boxteacher.modeling.mask_scores import (
    mask_aware_scores,
    mean_foreground_probability,
)
from boxteacher.modeling.pseudo_labels import assign_detections_to_boxes


def greedy_reference(det_boxes, det_scores, gt_boxes, iou_thr, score_thr, legacy):
    """The released code's loop, written plainly: detections by descending score, each takes
    the unmatched box of highest IoU >= iou_thr (the later box on ties)."""
    matched = [-1] * len(gt_boxes)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return matched
    iou = box_iou(det_boxes, gt_boxes)
    for d in sorted(range(len(det_boxes)), key=lambda i: -float(det_scores[i])):
        if det_scores[d] < score_thr:
            continue
        best, best_iou = -1, -1.0
        for g in range(len(gt_boxes)):
            taken = matched[g] > 0 if legacy else matched[g] >= 0
            if not taken and iou[d, g] >= iou_thr and iou[d, g] >= best_iou:
                best, best_iou = g, float(iou[d, g])
        if best >= 0:
            matched[best] = d
    return matched


def random_case(g, num_dets, num_gts, size=40):
    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * size
        wh = 2 + torch.rand(n, 2, generator=g) * size / 2
        return torch.cat([xy, xy + wh], dim=1)

    gt = boxes(num_gts)
    # Detections: jittered copies of boxes (so that IoU >= 0.5 is common) and random ones.
    jittered = (
        gt[torch.randint(0, max(num_gts, 1), (num_dets,), generator=g)]
        if num_gts
        else boxes(num_dets)
    )
    dets = jittered + torch.randn(num_dets, 4, generator=g) * 2
    dets[:, 2:] = torch.maximum(dets[:, 2:], dets[:, :2] + 1)
    scores = torch.rand(num_dets, generator=g)
    scores[torch.rand(num_dets, generator=g) < 0.2] = 0.0  # ties, as rescored scores of empty masks
    return dets, scores, gt


@pytest.mark.parametrize("legacy", [False, True])
def test_assignment_equals_the_greedy_loop_on_random_cases(legacy):
    g = torch.Generator().manual_seed(0)
    shapes = [(0, 3), (4, 0), (0, 0), (1, 1), (3, 8), (30, 5), (100, 20), (7, 7)]
    for case in range(200):
        num_dets, num_gts = shapes[case % len(shapes)]
        dets, scores, gt = random_case(g, num_dets, num_gts)
        score_thr = 0.3 if case % 5 == 0 else 0.0
        expected = greedy_reference(dets, scores, gt, 0.5, score_thr, legacy)
        got = assign_detections_to_boxes(dets, scores, gt, 0.5, score_thr, legacy).tolist()
        assert got == expected, (case, got, expected)


def test_equal_iou_goes_to_the_later_box():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    det = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert assign_detections_to_boxes(det, torch.tensor([0.9]), gt).tolist() == [-1, 0]


def test_the_legacy_flag_reproduces_the_first_detection_off_by_one():
    # Detection 0 (first in NMS order) ranks first and matches box 0; detection 1 also
    # overlaps box 0. The intended rule keeps detection 0; the released code lets 1 take over.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    dets = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0]])
    scores = torch.tensor([0.9, 0.8])
    assert assign_detections_to_boxes(dets, scores, gt).tolist() == [0]
    assert assign_detections_to_boxes(
        dets, scores, gt, legacy_first_detection_bug=True
    ).tolist() == [1]


def test_mean_foreground_probability_and_scores_by_hand():
    probs = torch.zeros(2, 4, 4)
    probs[0, :2, :2] = torch.tensor([[0.9, 0.7], [0.6, 0.4]])  # foreground (> 0.5): 0.9, 0.7, 0.6
    probs[1] = 0.3  # no foreground
    mean = mean_foreground_probability(probs)
    assert mean[0].item() == pytest.approx(2.2 / (3 + 1e-6), rel=1e-6)
    assert mean[1].item() == 0.0
    ranking, weight = mask_aware_scores(torch.tensor([0.64, 0.81]), mean)
    assert ranking[0].item() == pytest.approx(math.sqrt(0.64 * 2.2 / 3), rel=1e-5)
    assert weight[0].item() == pytest.approx(0.64**0.25 * math.sqrt(2.2 / 3), rel=1e-5)
    assert ranking[1].item() == 0.0 and weight[1].item() == 0.0


def test_box_restricted_mean_probability_of_the_paper():
    probs = torch.zeros(1, 4, 4)
    probs[0, 0, 0], probs[0, 3, 3] = 0.9, 0.7
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])  # covers pixel (0, 0) only of the two
    assert boxes_to_masks(box, (4, 4))[0].sum().item() == 4
    assert mean_foreground_probability(probs, boxes=box).item() == pytest.approx(0.9, rel=1e-5)
    assert mean_foreground_probability(probs).item() == pytest.approx(0.8, rel=1e-5)


@pytest.mark.parametrize("legacy", [False, True])
def test_one_pass_over_several_images_equals_image_by_image(legacy):
    """Boxes of different images overlap (same coordinates range) but never match across."""
    g = torch.Generator().manual_seed(1)
    for case in range(40):
        shapes = [(int(m), int(n)) for m, n in torch.randint(0, 12, (4, 2), generator=g)]
        images = [random_case(g, m, n) for m, n in shapes]
        dets, scores, gt = (torch.cat([x[k] for x in images]) for k in range(3))
        got = assign_detections_to_boxes(
            dets, scores, gt, 0.5, 0.0, legacy, [m for m, _ in shapes], [n for _, n in shapes]
        )
        offsets = [sum(m for m, _ in shapes[:i]) for i in range(len(shapes))]
        expected = [
            d + offset if d >= 0 else -1
            for (d_boxes, d_scores, g_boxes), offset in zip(images, offsets)
            for d in greedy_reference(d_boxes, d_scores, g_boxes, 0.5, 0.0, legacy)
        ]
        assert got.tolist() == expected, (case, shapes)
