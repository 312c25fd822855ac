"""BoxTeacher's pseudo labels: the box-based assignment of teacher detections to ground-truth boxes
and the ``PseudoLabeler`` that turns a teacher's detections into a pseudo mask per box."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function
from torchvision.ops import box_iou

from .guided_filter import MaskRefinement
from .layers import group_indices


def assign_detections_to_boxes(
    det_boxes: torch.Tensor,
    det_scores: torch.Tensor,
    gt_boxes: torch.Tensor,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.0,
    legacy_first_detection_bug: bool = False,
    det_counts: list[int] | None = None,
    gt_counts: list[int] | None = None,
) -> torch.Tensor:
    """Greedy one-to-one matching of detections to ground-truth boxes.

    Detections are visited by descending score (stable; below ``score_threshold`` they are
    skipped); each takes, among the boxes not matched yet, the one of highest IoU if that IoU
    is >= ``iou_threshold`` (on equal IoU the later box). Classes are ignored. With
    ``det_counts`` and ``gt_counts`` (per image, the detections and boxes are grouped by image)
    the images are matched in one pass, each detection within its own image only.

    The greedy loop is computed in rounds on the device: a (detection, box) pair whose box is
    the detection's best available box and whose detection is the best-ranked available one
    with that box as a candidate is matched by the greedy loop too, so all such pairs are
    accepted at once; matched detections and boxes leave; detections without any candidate
    left are done. Rounds repeat until nothing changes (few rounds in practice, one host
    synchronisation each, for the whole batch).

    ``legacy_first_detection_bug`` reproduces the released code, which tests "already
    matched" with ``> 0`` on detection indices: a box matched to an image's first detection (in
    NMS order) stays available and a later detection can take it over.

    Args:
        det_boxes: (M, 4) XYXY; det_scores: (M,) ranking scores; gt_boxes: (N, 4) XYXY;
        det_counts, gt_counts: detections and boxes per image (default: all of one image).
    Returns:
        (N,) int64: index of the detection assigned to each box, -1 if none.
    """
    num_dets, num_gts = det_boxes.shape[0], gt_boxes.shape[0]
    matched = torch.full((num_gts,), -1, dtype=torch.long, device=gt_boxes.device)
    if num_dets == 0 or num_gts == 0:
        return matched
    det_counts, gt_counts = det_counts or [num_dets], gt_counts or [num_gts]
    iou = box_iou(det_boxes, gt_boxes)
    order = torch.argsort(det_scores, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_dets, device=order.device)
    candidates = (iou >= iou_threshold) & (det_scores >= score_threshold)[:, None]
    if len(det_counts) > 1:
        same_image = torch.block_diag(
            *[torch.ones(m, n, dtype=torch.bool) for m, n in zip(det_counts, gt_counts)]
        )
        candidates &= same_image.to(candidates.device)
    if not legacy_first_detection_bug:
        return _greedy_matching(iou, candidates, rank)
    return _legacy_matching(iou, candidates, rank, det_counts, gt_counts)


def _legacy_matching(
    iou: torch.Tensor,
    candidates: torch.Tensor,
    rank: torch.Tensor,
    det_counts: list[int],
    gt_counts: list[int],
) -> torch.Tensor:
    """The released code's matching: an image's first detection never blocks a box. The
    others are matched as if the first detections did not exist; each first detection then
    takes its best box among those not matched by detections ranked before it, and keeps it
    unless a later detection took it."""
    num_gts = iou.shape[1]
    starts = [sum(det_counts[:i]) for i in range(len(det_counts))]
    first_of_box = torch.tensor(
        [s for s, n in zip(starts, gt_counts) for _ in range(n)], device=iou.device
    )
    firsts = torch.tensor([s for s, m in zip(starts, det_counts) if m > 0], device=iou.device)
    without_firsts = candidates.clone()
    without_firsts[firsts] = False
    matched = _greedy_matching(iou, without_firsts, rank)
    # first_of_box may point past the last detection for images without any: never a candidate.
    before_first = rank[matched.clamp(min=0)] < rank[first_of_box.clamp(max=iou.shape[0] - 1)]
    choice = _best_available(
        iou[firsts], candidates[firsts] & ~((matched >= 0) & before_first)[None]
    )
    with_slot = torch.cat(
        [matched, matched.new_full((1,), -1)]
    )  # writes that do not happen go to the extra slot
    target = torch.where(choice >= 0, choice, num_gts)
    take = (choice >= 0) & (with_slot[target] < 0)
    with_slot[torch.where(take, target, num_gts)] = torch.where(take, firsts, -1)
    return with_slot[:num_gts]


@dataclass(frozen=True)
class PseudoLabeler:
    """Turns a teacher's detections into a pseudo mask and weight per ground-truth box
    (``MODEL.BOX_TEACHER.*``). Built once (``build.py``); training, the training pictures and the
    pseudo-mask export all label through it (``BoxTeacher.pseudo_label``).

    iou_threshold, score_threshold, legacy_first_detection_bug: of the assignment
        (``assign_detections_to_boxes``).
    mask_threshold: binarises the assigned probabilities (None: kept as probabilities).
    refinement: refines the assigned probabilities inside their box with the guided filter of
        the view the teacher saw (None: as they are).
    """

    iou_threshold: float = 0.5
    score_threshold: float = 0.0
    legacy_first_detection_bug: bool = False
    mask_threshold: float | None = 0.5
    refinement: MaskRefinement | None = None

    def label(
        self,
        predictions: list[dict[str, torch.Tensor]],
        gt_boxes: list[torch.Tensor],
        images: list[torch.Tensor] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """The pseudo mask and weight of every ground-truth box of every image of a batch.

        predictions: per image a teacher's detections (``boxes`` (M_i, 4), ranking ``scores``
            (M_i,), pseudo-mask weights ``mask_scores`` (M_i,), ``mask_probs`` (M_i, h_i, w_i));
        gt_boxes: per image (N_i, 4) XYXY in the same frame. The detections are assigned to the
            boxes of their image by ``assign_detections_to_boxes``, all images in one pass.
        images: per image (C, h_i, w_i) uint8, the view the teacher saw (the guide of the
            refinement, needed only with it). The refinement's windows are placed from
            ``gt_boxes`` as given: host boxes spare a device-to-host copy.
        Returns per image ``masks`` (N_i, h_i, w_i): the assigned detection's (refined)
        probabilities binarised at ``mask_threshold`` (bool; kept as probabilities when it is
        None), zero for a box without a detection; ``weights`` (N_i,): its ``mask_scores``, 0
        without; ``assigned`` (N_i,) int64: the detection's index in the image, -1 without.
        """
        device = predictions[0]["mask_probs"].device
        det_counts = [p["boxes"].shape[0] for p in predictions]
        gt_counts = [len(b) for b in gt_boxes]
        det_offsets = [sum(det_counts[:i]) for i in range(len(det_counts))]
        with record_function("pseudo labels: assignment"):
            assigned = assign_detections_to_boxes(
                torch.cat([p["boxes"] for p in predictions]),
                torch.cat([p["scores"] for p in predictions]),
                torch.cat(gt_boxes).to(device),
                self.iou_threshold,
                self.score_threshold,
                self.legacy_first_detection_bug,
                det_counts,
                gt_counts,
            )
            offsets = torch.tensor(det_offsets)[group_indices(gt_counts)].to(device)
            assigned = torch.where(assigned >= 0, assigned - offsets, assigned).split(gt_counts)
        chosen, weights = [], []
        for prediction, index in zip(predictions, assigned):
            probs, scores = prediction["mask_probs"], prediction["mask_scores"]
            if probs.shape[0] == 0:
                probs, scores = probs.new_zeros((1, *probs.shape[1:])), scores.new_zeros(1)
            chosen.append(probs[index.clamp(min=0)])
            weights.append(
                torch.where(index >= 0, scores[index.clamp(min=0)], scores.new_zeros(()))
            )
        if self.refinement is not None:
            # Every box is refined (the unmatched ones are zeroed below): no host synchronisation.
            with record_function("pseudo labels: refinement"):
                refined = self.refinement.refine_batch(images, chosen, gt_boxes)
                chosen = [r.to(c.dtype) for r, c in zip(refined, chosen)]
        labels = []
        for masks, weight, index in zip(chosen, weights, assigned):
            if self.mask_threshold is not None:
                masks = masks > self.mask_threshold
            labels.append(
                {"masks": masks * (index >= 0)[:, None, None], "weights": weight, "assigned": index}
            )
        return labels


def _best_available(iou: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Per row, the column of highest IoU among the available ones (the last on ties), or -1."""
    num_cols = iou.shape[1]
    masked = torch.where(available, iou, iou.new_full((), -1.0))
    best_from_end = torch.argmax(masked.flip(1), dim=1)
    best = num_cols - 1 - best_from_end
    return torch.where(available.any(dim=1), best, torch.full_like(best, -1))


def _greedy_matching(
    iou: torch.Tensor, candidates: torch.Tensor, rank: torch.Tensor
) -> torch.Tensor:
    """Greedy matching by detection rank (see ``assign_detections_to_boxes``); (N,) det index.
    One host synchronisation per round: the test whether a detection is still open."""
    num_dets, num_gts = iou.shape
    # One extra box slot receives the writes of the detections not accepted in a round.
    matched = torch.full((num_gts + 1,), -1, dtype=torch.long, device=iou.device)
    gt_open = torch.ones(num_gts + 1, dtype=torch.bool, device=iou.device)
    det_open = candidates.any(dim=1)
    det_index = torch.arange(num_dets, device=iou.device)
    no_rank = torch.full_like(rank, num_dets)
    while True:
        available = candidates & det_open[:, None] & gt_open[None, :num_gts]
        det_open = available.any(dim=1)
        if not bool(det_open.any()):
            return matched[:num_gts]
        best_gt = _best_available(iou, available)  # (M,)
        # For every box, the best-ranked open detection that has it as a candidate.
        first_det_rank = torch.where(available, rank[:, None], no_rank[:, None]).min(dim=0).values
        accepted = det_open & (rank == first_det_rank[best_gt.clamp(min=0)])
        target = torch.where(accepted, best_gt, num_gts)
        matched[target] = torch.where(accepted, det_index, -1)
        gt_open[target] = False
        det_open &= ~accepted
