"""FCOS: hand-checked target assignment, losses on known cases, inference decoding."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from boxteacher.modeling.fcos import (
    FCOS,
    FCOSHead,
    HeadOutputs,
    nms_per_image_and_class,
)
from boxteacher.modeling.fcos_targets import compute_targets, mask_centers
from boxteacher.modeling.layers import compute_locations
from boxteacher.modeling.losses import centerness_targets, ltrb_iou_and_giou

from reference_implementations import fcos_predict_per_image

STRIDES = [8, 16]
SIZES = [32]


def locations_32x32():
    return [
        compute_locations(4, 4, 8, torch.device("cpu")),
        compute_locations(2, 2, 16, torch.device("cpu")),
    ]


def test_locations_are_cell_centres():
    loc = compute_locations(2, 3, 8, torch.device("cpu"))
    assert loc.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]


def test_one_box_positives_are_centre_region_of_the_right_level():
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0]])]
    labels = [torch.tensor([2])]
    t = compute_targets(
        locations_32x32(), STRIDES, SIZES, boxes, labels, num_classes=3, center_sampling_radius=1.5
    )
    # Level 0 (stride 8, 4x4 cells at 4, 12, 20, 28): the centre region [-2, 22] clipped to the
    # box [0, 20] holds x, y in {4, 12}; 20 is on the edge (strictly inside is required).
    positives = torch.nonzero(t.labels != 3).squeeze(1)
    assert t.locations[positives].tolist() == [[4, 4], [12, 4], [4, 12], [12, 12]]
    assert (t.labels[positives] == 2).all() and (t.gt_inds[positives] == 0).all()
    assert (t.fpn_levels[positives] == 0).all()
    # (l, t, r, b) of location (4, 4) is (4, 4, 16, 16) pixels = (0.5, 0.5, 2, 2) strides.
    assert t.reg_targets[positives[0]].tolist() == [0.5, 0.5, 2.0, 2.0]
    assert centerness_targets(t.reg_targets[positives[:1]]).item() == pytest.approx(0.25)
    # Level 1 locations see max(l, t, r, b) <= 16, outside its range [32, inf].
    assert (t.labels[t.fpn_levels == 1] == 3).all()
    assert (t.gt_inds[t.labels == 3] == -1).all()


def test_overlapping_boxes_go_to_the_smaller_one():
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [8.0, 8.0, 16.0, 16.0]])]
    labels = [torch.tensor([0, 1])]
    t = compute_targets(
        locations_32x32(), STRIDES, SIZES, boxes, labels, num_classes=3, center_sampling_radius=1.5
    )
    assign = {
        tuple(loc): (int(lab), int(g))
        for loc, lab, g in zip(t.locations.tolist(), t.labels, t.gt_inds)
    }
    assert assign[(12.0, 12.0)] == (1, 1)
    assert assign[(4.0, 4.0)] == (0, 0)


def test_without_centre_sampling_every_inside_location_is_positive():
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0]])]
    t = compute_targets(locations_32x32(), STRIDES, SIZES, boxes, [torch.tensor([0])], 3, None)
    assert int((t.labels == 0).sum()) == 4  # 20 is on the right/bottom edge: not inside
    boxes = [torch.tensor([[0.0, 0.0, 21.0, 21.0]])]
    t = compute_targets(locations_32x32(), STRIDES, SIZES, boxes, [torch.tensor([0])], 3, None)
    assert int((t.labels == 0).sum()) == 9


def test_flattening_is_level_major_then_image():
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.tensor([[12.0, 12.0, 32.0, 32.0]])]
    labels = [torch.tensor([0]), torch.tensor([1])]
    t = compute_targets(locations_32x32(), STRIDES, SIZES, boxes, labels, 3, 1.5)
    assert t.im_inds.tolist() == [0] * 16 + [1] * 16 + [0] * 4 + [1] * 4
    assert t.fpn_levels.tolist() == [0] * 32 + [1] * 8
    # The second image's box gets the global index 1.
    assert set(t.gt_inds[t.im_inds == 1].tolist()) == {-1, 1}


def test_empty_image_is_all_background():
    t = compute_targets(
        locations_32x32(),
        STRIDES,
        SIZES,
        [torch.zeros((0, 4))],
        [torch.zeros((0,), dtype=torch.long)],
        3,
        1.5,
    )
    assert (t.labels == 3).all() and (t.gt_inds == -1).all()


def test_mask_centres_use_centre_of_mass_and_fall_back_to_box_centre():
    masks = torch.zeros((2, 10, 10), dtype=torch.bool)
    masks[0, 2:4, 6:8] = True  # pixels x in {6, 7}, y in {2, 3}
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 6.0, 4.0]])
    assert mask_centers(masks, boxes).tolist() == [[6.5, 2.5], [4.0, 3.0]]


def test_smoothed_iou_and_giou_of_ltrb_boxes():
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    iou, giou = ltrb_iou_and_giou(pred, target)
    assert iou.item() == pytest.approx((4 + 1) / (16 + 1))
    assert giou.item() == pytest.approx(iou.item())  # enclosing box == union


def _fcos(num_classes=2):
    head = FCOSHead(32, num_classes, num_levels=2, num_cls_convs=1, num_box_convs=1)
    return FCOS(head, STRIDES, SIZES, center_sampling_radius=1.5, thresh_with_ctr=True)


def test_losses_of_a_known_prediction():
    fcos = _fcos()
    locations = locations_32x32()
    targets = fcos.targets(locations, [torch.tensor([[0.0, 0.0, 20.0, 20.0]])], [torch.tensor([1])])
    logits = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)]
    reg = [torch.full((1, 4, 4, 4), 1.0), torch.full((1, 4, 2, 2), 1.0)]
    ctr = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    losses, positives = fcos.losses(HeadOutputs(logits, reg, ctr, []), targets)
    # Focal loss at logit 0: background term 0.75 * 0.5^2 * ln 2 per (location, class); 4 positives.
    bg = 0.75 * 0.25 * math.log(2)
    fg = 0.25 * 0.25 * math.log(2)
    expected_cls = (20 * 2 * bg - 4 * bg + 4 * fg) / 4
    assert losses["loss_fcos_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    ctr_t = centerness_targets(positives["reg_targets"])
    iou, giou = ltrb_iou_and_giou(torch.ones(4, 4), positives["reg_targets"])
    assert losses["loss_fcos_loc"].item() == pytest.approx(
        ((1 - giou) * ctr_t).sum().item() / ctr_t.sum().item(), rel=1e-6
    )
    bce = (
        torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(4), ctr_t, reduction="sum")
        / 4
    )
    assert losses["loss_fcos_ctr"].item() == pytest.approx(bce.item(), rel=1e-6)
    assert positives["pos_inds"].numel() == 4


def test_predict_decodes_boxes_in_pixels_and_applies_nms():
    fcos = _fcos()
    locations = locations_32x32()
    logits = [torch.full((1, 2, 4, 4), -10.0), torch.full((1, 2, 2, 2), -10.0)]
    logits[0][0, 1, 1, 1] = 5.0  # location (12, 12), class 1
    logits[0][0, 1, 1, 2] = 4.0  # location (20, 12), class 1: same box -> suppressed
    reg = [torch.ones(1, 4, 4, 4), torch.ones(1, 4, 2, 2)]
    ctr = [torch.full((1, 1, 4, 4), 10.0), torch.full((1, 1, 2, 2), 10.0)]
    reg[0][0, :, 1, 2] = torch.tensor([2.0, 1.0, 0.0, 1.0])
    dets = fcos.predict(HeadOutputs(logits, reg, ctr, []), locations)[0]
    assert dets["boxes"].tolist() == [[4.0, 4.0, 20.0, 20.0]]
    assert dets["labels"].tolist() == [1]
    assert dets["scores"].item() == pytest.approx(
        math.sqrt(torch.sigmoid(torch.tensor(5.0)) * torch.sigmoid(torch.tensor(10.0))), rel=1e-6
    )


@pytest.mark.parametrize("thresh_with_ctr", [False, True])
def test_batched_predict_equals_predicting_image_by_image(thresh_with_ctr):
    """Random head outputs of 3 images (the last detects nothing), a pre-NMS top-k that cuts
    the larger level and a post-NMS top-k that cuts the images: the same detections, in the
    same order, as the per-image reference."""
    g = torch.Generator().manual_seed(int(thresh_with_ctr))
    fcos = FCOS(
        FCOSHead(8, 3, 2, 1, 1, use_group_norm=False),
        strides=[8, 16],
        sizes_of_interest=[64],
        thresh_with_ctr=thresh_with_ctr,
        pre_nms_topk=40,
        post_nms_topk=12,
        nms_threshold=0.5,
    )
    shapes = [(8, 10), (4, 5)]
    logits = [torch.randn(3, 3, h, w, generator=g) for h, w in shapes]
    logits[0][2], logits[1][2] = -20.0, -20.0
    outputs = HeadOutputs(
        logits,
        [torch.rand(3, 4, h, w, generator=g) * 3 for h, w in shapes],
        [torch.randn(3, 1, h, w, generator=g) for h, w in shapes],
        [],
    )
    locations = fcos.locations([torch.zeros(1, 1, h, w) for h, w in shapes])
    top_feats = [torch.randn(3, 7, h, w, generator=g) for h, w in shapes]
    expected = fcos_predict_per_image(fcos, outputs, locations, top_feats)
    batched = fcos.predict(outputs, locations, top_feats)
    assert (
        [d["scores"].numel() for d in batched]
        == [d["scores"].numel() for d in expected]
        == [12, 12, 0]
    )
    for ours, reference in zip(batched, expected):
        assert ours.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], msg=key)
    flat = fcos.predict_batch(outputs, locations, top_feats, post_nms_topk=0)
    assert flat["im_inds"].tolist() == sorted(flat["im_inds"].tolist())
    unlimited = fcos_predict_per_image(fcos, outputs, locations, top_feats, post_nms_topk=0)
    assert torch.bincount(flat["im_inds"], minlength=3).tolist() == [
        d["scores"].numel() for d in unlimited
    ]


def test_nms_per_image_and_class_never_suppresses_across_groups():
    boxes = torch.tensor([[-40.0, -40.0, 10.0, 10.0]] * 4)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    keep = nms_per_image_and_class(
        boxes, scores, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 0]), 0.5
    )
    assert keep.tolist() == [0, 1, 2]


def test_ignore_regions_take_background_locations_out_of_the_classification_loss():
    """Background locations inside an ignore box count neither as positives nor as negatives;
    positives inside it stay; without ignore boxes the loss is the plain focal loss."""
    torch.manual_seed(0)
    fcos = FCOS(FCOSHead(8, 2, 2, 1, 1, use_group_norm=False), STRIDES, SIZES)
    features = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
    outputs = fcos.fcos_head(features)
    locations = fcos.locations(features)
    boxes, labels = [torch.tensor([[4.0, 4, 28, 28]])], [torch.tensor([1])]
    plain = fcos.targets(locations, boxes, labels)
    assert plain.ignore is None
    assert fcos.targets(locations, boxes, labels, ignore_boxes=[torch.zeros(0, 4)]).ignore is None
    ignoring = fcos.targets(
        locations, boxes, labels, ignore_boxes=[torch.tensor([[0.0, 0, 64, 40]])]
    )
    positive = plain.labels != 2
    expected = (ignoring.locations[:, 1] <= 40) & ~positive
    assert (
        torch.equal(ignoring.ignore, expected) and expected.any() and (~expected & ~positive).any()
    )
    assert torch.equal(ignoring.labels, plain.labels)

    logits = torch.cat([o.permute(0, 2, 3, 1).reshape(-1, 2) for o in outputs.logits])
    class_targets = torch.zeros_like(logits)
    class_targets[positive, plain.labels[positive]] = 1.0
    focal = sigmoid_focal_loss(logits, class_targets, 0.25, 2.0, reduction="none")
    num_pos = float(positive.sum())
    plain_loss = fcos.losses(outputs, plain)[0]["loss_fcos_cls"]
    ignoring_loss = fcos.losses(outputs, ignoring)[0]["loss_fcos_cls"]
    torch.testing.assert_close(plain_loss, focal.sum() / num_pos)
    torch.testing.assert_close(ignoring_loss, focal[~expected].sum() / num_pos)
