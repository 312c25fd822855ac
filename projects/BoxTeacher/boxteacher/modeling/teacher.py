"""The teacher pass of BoxTeacher: detections with masks and mask-aware scores of the clean view,
at the student's input resolution."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from .layers import boxes_to_masks, resized_shape
from .postprocess import detections_to_output_frame, rescale_boxes
from .pseudo_labels import mask_aware_scores, mean_foreground_probability


@dataclass(frozen=True)
class TeacherPass:
    """How a detector runs as a teacher.

    min_size, max_size: every image is resized to this test size (shortest edge, longest
        edge cap) before the teacher sees it, whatever the student's training scale; None:
        the teacher sees the student's input size.
    mask_threshold: foreground threshold of the teacher's masks and of the mask-aware score.
    post_nms_topk: detections kept per image.
    float_masks: return the mask probabilities as pseudo masks (the original's
        RETURN_FLOAT_MASK; its mask-aware score then averages over the whole image).
    score_in_box: average the foreground probability only inside the predicted box (the
        paper's formula) instead of over the whole mask (the released code).
    clip_masks_to_boxes: zero the mask probabilities outside the predicted box before scoring.
    candidate_iou: when set and the samples carry ground-truth ``instances``, only detections
        whose box overlaps one of the ground-truth boxes with IoU >= candidate_iou are kept
        (the others can never be assigned a box): the mask head and the post-processing run for
        fewer detections, and the outputs of the kept detections do not change.
    """

    min_size: int | None = 800
    max_size: int | None = 1333
    mask_threshold: float = 0.5
    post_nms_topk: int = 100
    float_masks: bool = False
    score_in_box: bool = False
    clip_masks_to_boxes: bool = False
    candidate_iou: float | None = None


def resize_to_test_size(image: torch.Tensor, min_size: int | None, max_size: int | None) -> torch.Tensor:
    """Bilinearly resize a (C, h, w) float image by the shortest-edge rule (None: unchanged)."""
    if min_size is None:
        return image
    size = resized_shape(image.shape[-2], image.shape[-1], min_size, max_size)
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def assignable_detections(
    detections: dict[str, torch.Tensor],
    input_size: tuple[int, int],
    student_size: tuple[int, int],
    gt_boxes: torch.Tensor,
    iou_threshold: float,
) -> dict[str, torch.Tensor]:
    """The detections of one image (every field indexed by detection) whose box, in the student
    frame, has IoU >= ``iou_threshold`` with one of ``gt_boxes`` (N, 4); order kept."""
    boxes = rescale_boxes(detections["boxes"], input_size, student_size)
    if gt_boxes.shape[0] == 0:
        keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    else:
        keep = (box_iou(boxes, gt_boxes.to(boxes)) >= iou_threshold).any(dim=1)
    return {k: v[keep] for k, v in detections.items()}


def teacher_outputs(
    detections: list[dict[str, torch.Tensor]],
    input_sizes: list[tuple[int, int]],
    student_sizes: list[tuple[int, int]],
    mask_stride: int,
    settings: TeacherPass,
) -> list[dict[str, torch.Tensor]]:
    """Per image: ``boxes`` (M, 4) in the student frame, ``scores`` (M,) the mask-aware ranking
    score, ``mask_scores`` (M,) the pseudo-mask weight, ``fcos_scores``, ``labels``,
    ``mask_probs`` (M, h, w) at the student's unpadded input size, and the FCOS ``fpn_levels``
    and ``locations`` (teacher input frame) of the detections when the detector gives them.

    detections: the detector's detections of the resized images (boxes in that frame,
    ``mask_probs`` at ``mask_stride`` over the padded batch); input_sizes: the resized sizes.
    """
    threshold = -1.0 if settings.float_masks else settings.mask_threshold
    outputs = []
    for det, input_size, student_size in zip(detections, input_sizes, student_sizes):
        frame = detections_to_output_frame(
            det, det["mask_probs"], mask_stride, input_size, student_size, threshold
        )
        probs = frame["mask_probs"]
        if settings.clip_masks_to_boxes:
            probs = probs * boxes_to_masks(frame["boxes"], probs.shape[-2:]).to(probs.dtype)
        mean = mean_foreground_probability(probs, threshold, frame["boxes"] if settings.score_in_box else None)
        ranking, weights = mask_aware_scores(frame["scores"], mean)
        outputs.append({
            "boxes": frame["boxes"],
            "scores": ranking,
            "mask_scores": weights,
            "fcos_scores": frame["scores"],
            "labels": frame["labels"],
            "mask_probs": probs,
            **{k: frame[k] for k in ("fpn_levels", "locations") if k in frame},
        })
    return outputs
