"""BoxTeacher's pseudo labels: the mask-aware confidence of a teacher mask and the box-based
assignment of teacher detections to ground-truth boxes."""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

from .guided_filter import MaskRefinement
from .layers import boxes_to_masks


def mean_foreground_probability(
    mask_probs: torch.Tensor, threshold: float = 0.5, boxes: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean probability over the pixels predicted as foreground: sum(P * [P > t]) / (sum([P > t])
    + 1e-6). With ``boxes`` (M, 4) XYXY, only pixels inside each box count (the paper's
    variant). mask_probs: (M, h, w). Returns (M,)."""
    foreground = (mask_probs > threshold).to(mask_probs.dtype)
    if boxes is not None:
        foreground = foreground * boxes_to_masks(boxes, mask_probs.shape[-2:]).to(mask_probs.dtype)
    return (mask_probs * foreground).sum(dim=(1, 2)) / (foreground.sum(dim=(1, 2)) + 1e-6)


def mask_aware_scores(
    fcos_scores: torch.Tensor, mean_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's mask-aware scores of detections with FCOS scores c and mean
    foreground probabilities m: the ranking score sqrt(c * m) and the pseudo-mask loss weight
    sqrt(sqrt(c) * m) = c^(1/4) m^(1/2). Both (M,)."""
    return torch.sqrt(fcos_scores * mean_probs), torch.sqrt(torch.sqrt(fcos_scores) * mean_probs)


def assign_detections_to_boxes(
    det_boxes: torch.Tensor,
    det_scores: torch.Tensor,
    gt_boxes: torch.Tensor,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.0,
    legacy_first_detection_bug: bool = False,
) -> torch.Tensor:
    """Greedy one-to-one matching of detections to ground-truth boxes.

    Detections are visited by descending score (stable; below ``score_threshold`` they are
    skipped); each takes, among the boxes not matched yet, the one of highest IoU if that IoU
    is >= ``iou_threshold`` (on equal IoU the later box). Classes are ignored.

    The greedy loop is computed in rounds on the device: a (detection, box) pair whose box is
    the detection's best available box and whose detection is the best-ranked available one
    with that box as a candidate is matched by the greedy loop too, so all such pairs are
    accepted at once; matched detections and boxes leave; detections without any candidate
    left are done. Rounds repeat until nothing changes (few rounds in practice).

    ``legacy_first_detection_bug`` reproduces the released code, which tests "already
    matched" with ``> 0`` on detection indices: a box matched to detection 0 (the first in
    NMS order) stays available and a later detection can take it over.

    Args:
        det_boxes: (M, 4) XYXY; det_scores: (M,) ranking scores; gt_boxes: (N, 4) XYXY.
    Returns:
        (N,) int64: index of the detection assigned to each box, -1 if none.
    """
    num_dets, num_gts = det_boxes.shape[0], gt_boxes.shape[0]
    matched = torch.full((num_gts,), -1, dtype=torch.long, device=gt_boxes.device)
    if num_dets == 0 or num_gts == 0:
        return matched
    iou = box_iou(det_boxes, gt_boxes)
    order = torch.argsort(det_scores, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_dets, device=order.device)
    candidates = (iou >= iou_threshold) & (det_scores >= score_threshold)[:, None]
    if not legacy_first_detection_bug:
        return _greedy_matching(iou, candidates, rank)
    # The released code: detection 0's match never blocks a box. The others are matched as if
    # detection 0 did not exist; detection 0 then takes its best box among those not matched
    # by detections ranked before it, and keeps it unless a later detection took it.
    without_first = candidates.clone()
    without_first[0] = False
    matched = _greedy_matching(iou, without_first, rank)
    taken_before_first = (matched >= 0) & (rank[matched.clamp(min=0)] < rank[0])
    first_choice = _best_available(iou[0:1], candidates[0:1] & ~taken_before_first[None])
    if first_choice[0] >= 0 and matched[first_choice[0]] < 0:
        matched[first_choice[0]] = 0
    return matched


def pseudo_masks_for_boxes(
    prediction: dict[str, torch.Tensor],
    gt_boxes: torch.Tensor,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.0,
    legacy_first_detection_bug: bool = False,
    mask_threshold: float | None = 0.5,
    refinement: MaskRefinement | None = None,
    image: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The pseudo mask and weight of every ground-truth box of one image.

    prediction: a teacher's detections (``boxes`` (M, 4), ranking ``scores`` (M,), pseudo-mask
        weights ``mask_scores`` (M,), ``mask_probs`` (M, h, w)); gt_boxes: (N, 4) XYXY in the
        same frame. The detections are assigned to the boxes by ``assign_detections_to_boxes``.
    refinement, image: when given, the assigned probabilities are refined inside their box by
        the guided filter with ``image`` (C, h, w) uint8 (the view the teacher saw, at the masks'
        size) as guide, and zeroed outside it. The filter's windows are placed from
        ``gt_boxes`` as given: host boxes spare a device-to-host copy.
    Returns ``masks`` (N, h, w): the assigned detection's (refined) probabilities binarised at
    ``mask_threshold`` (bool; kept as probabilities when it is None), zero for a box without a
    detection; ``weights`` (N,): its ``mask_scores``, 0 without; ``assigned`` (N,) int64: the
    detection index, -1 without.
    """
    probs = prediction["mask_probs"]
    boxes = gt_boxes.to(probs.device)
    assigned = assign_detections_to_boxes(
        prediction["boxes"], prediction["scores"], boxes,
        iou_threshold, score_threshold, legacy_first_detection_bug,
    )
    has_match = assigned >= 0
    weights = prediction["mask_scores"]
    if probs.shape[0] == 0:
        probs, weights = probs.new_zeros((1, *probs.shape[1:])), probs.new_zeros(1)
    index = assigned.clamp(min=0)
    chosen = probs[index]
    if refinement is not None:
        # Every box is refined (the unmatched ones are zeroed below): no host synchronisation.
        chosen = refinement(image, chosen, gt_boxes).to(chosen.dtype)
    if mask_threshold is not None:
        chosen = chosen > mask_threshold
    return {
        "masks": chosen * has_match[:, None, None],
        "weights": torch.where(has_match, weights[index], weights.new_zeros(())),
        "assigned": assigned,
    }


def _best_available(iou: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Per row, the column of highest IoU among the available ones (the last on ties), or -1."""
    num_cols = iou.shape[1]
    masked = torch.where(available, iou, iou.new_full((), -1.0))
    best_from_end = torch.argmax(masked.flip(1), dim=1)
    best = num_cols - 1 - best_from_end
    return torch.where(available.any(dim=1), best, torch.full_like(best, -1))


def _greedy_matching(iou: torch.Tensor, candidates: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Greedy matching by detection rank (see ``assign_detections_to_boxes``); (N,) det index."""
    num_dets, num_gts = iou.shape
    matched = torch.full((num_gts,), -1, dtype=torch.long, device=iou.device)
    det_open = candidates.any(dim=1)
    gt_open = torch.ones(num_gts, dtype=torch.bool, device=iou.device)
    no_rank = torch.full_like(rank, num_dets)
    while True:
        available = candidates & det_open[:, None] & gt_open[None, :]
        det_open = available.any(dim=1)
        if not bool(det_open.any()):
            return matched
        best_gt = _best_available(iou, available)  # (M,)
        # For every box, the best-ranked open detection that has it as a candidate.
        first_det_rank = torch.where(available, rank[:, None], no_rank[:, None]).min(dim=0).values
        det_index = torch.arange(num_dets, device=iou.device)
        accepted = det_open & (rank == first_det_rank[best_gt.clamp(min=0)])
        matched[best_gt[accepted]] = det_index[accepted]
        det_open &= ~accepted
        gt_open[best_gt[accepted]] = False
