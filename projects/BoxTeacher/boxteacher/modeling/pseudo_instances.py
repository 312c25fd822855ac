"""Pseudo instances of an unlabelled image from the teacher's detections (semi-supervised
training, after Guided Distillation, Berrada et al., WACV 2024).

A detection scoring at least ``score_high`` becomes an instance: its class, its box, its mask
binarised at ``mask_threshold`` and, as the weight of its mask loss, its mask-aware score (the
pseudo-mask weight of BoxTeacher); one whose binarised mask has fewer than ``min_mask_area``
pixels is dropped. A detection scoring in [``score_low``, ``score_high``) is too uncertain to be
an instance or background: its box becomes an ignore region, whose locations the classification
loss counts neither as positives nor as negatives.

The thresholds apply to the teacher's ranking score (``scores`` of the teacher protocol, the
score evaluation ranks by). CondInst's scores are not the calibrated softmax probabilities of
Guided Distillation's Mask2Former; the defaults come from a measurement of a trained BoxTeacher
(box precision 0.86 at 0.7, 0.40 at 0.5; see ``MODEL.SEMI`` in ``config/defaults.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PseudoInstanceFilter:
    """Which teacher detections of an unlabelled image become instances or ignore regions."""

    score_high: float = 0.7
    score_low: float = 0.5
    mask_threshold: float = 0.5
    min_mask_area: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_low <= self.score_high <= 1.0:
            raise ValueError(
                "Pseudo-instance thresholds need 0 <= score_low <= score_high <= 1, got "
                f"score_low {self.score_low} and score_high {self.score_high}."
            )

    def __call__(self, detections: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pseudo instances of one image.

        detections: the teacher's output for the image (teacher protocol): ``boxes`` (M, 4)
            XYXY, ``scores`` (M,), ``labels`` (M,), ``mask_probs`` (M, h, w) in [0, 1],
            ``mask_scores`` (M,).

        Returns ``boxes`` (N, 4), ``labels`` (N,), ``masks`` bool (N, h, w), ``weights`` (N,)
        (the mask-aware scores) and ``ignore_boxes`` (K, 4), in the detections' order.
        """
        scores = detections["scores"]
        masks = detections["mask_probs"] >= self.mask_threshold
        large = masks.flatten(1).sum(dim=1) >= self.min_mask_area
        keep = (scores >= self.score_high) & large
        ignore = (scores >= self.score_low) & (scores < self.score_high)
        return {
            "boxes": detections["boxes"][keep],
            "labels": detections["labels"][keep],
            "masks": masks[keep],
            "weights": detections["mask_scores"][keep],
            "ignore_boxes": detections["boxes"][ignore],
        }
