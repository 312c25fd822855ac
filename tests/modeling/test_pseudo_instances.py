"""Pseudo instances of unlabelled images (``modeling/pseudo_instances.py``) on hand-made
teacher outputs."""

import pytest
import torch

from boxteacher.modeling.pseudo_instances import PseudoInstanceFilter


def teacher_output() -> dict[str, torch.Tensor]:
    """Five detections on a 10x10 image: confident with a mask, confident with a 4-pixel mask,
    uncertain, at the low threshold, background."""
    probs = torch.zeros(5, 10, 10)
    probs[0, 2:6, 2:6] = 0.9  # 16 pixels
    probs[1, 0:2, 0:2] = 0.8  # 4 pixels: too small
    probs[2, 5:9, 5:9] = 0.7
    probs[3, 1:4, 6:9] = 0.6
    probs[4, 7:9, 0:3] = 0.6
    return {
        "boxes": torch.tensor(
            [[2.0, 2, 6, 6], [0, 0, 2, 2], [5, 5, 9, 9], [6, 1, 9, 4], [0, 7, 3, 9]]
        ),
        "scores": torch.tensor([0.8, 0.9, 0.45, 0.3, 0.1]),
        "labels": torch.tensor([2, 0, 1, 1, 0]),
        "mask_probs": probs,
        "mask_scores": torch.tensor([0.85, 0.8, 0.6, 0.5, 0.3]),
    }


def test_confident_large_detections_become_instances_and_uncertain_ones_ignore_regions():
    out = PseudoInstanceFilter(score_high=0.5, score_low=0.3, min_mask_area=5)(teacher_output())
    torch.testing.assert_close(out["boxes"], torch.tensor([[2.0, 2, 6, 6]]))
    assert out["labels"].tolist() == [2] and out["weights"].tolist() == [pytest.approx(0.85)]
    assert (
        out["masks"].dtype == torch.bool
        and out["masks"].shape == (1, 10, 10)
        and out["masks"].sum() == 16
    )
    # the 0.45 and the 0.3 (the low threshold is inclusive) detections; not the 0.1 one
    torch.testing.assert_close(out["ignore_boxes"], torch.tensor([[5.0, 5, 9, 9], [6, 1, 9, 4]]))


def test_the_mask_threshold_and_area_decide_which_masks_are_large_enough():
    out = PseudoInstanceFilter(min_mask_area=4)(teacher_output())
    assert out["labels"].tolist() == [2, 0]
    out = PseudoInstanceFilter(mask_threshold=0.95)(teacher_output())
    assert len(out["labels"]) == 0 and out["masks"].shape == (0, 10, 10)


def test_no_detection_gives_no_instance_and_no_ignore_region():
    empty = {k: v[:0] for k, v in teacher_output().items()}
    out = PseudoInstanceFilter()(empty)
    assert (
        out["boxes"].shape == (0, 4)
        and out["ignore_boxes"].shape == (0, 4)
        and out["masks"].shape == (0, 10, 10)
    )


@pytest.mark.parametrize("low, high", [(0.6, 0.5), (-0.1, 0.5), (0.3, 1.2)])
def test_thresholds_out_of_order_are_an_error(low, high):
    with pytest.raises(ValueError, match="score_low .* score_high"):
        PseudoInstanceFilter(score_high=high, score_low=low)
