"""The teacher pass of BoxTeacher: detections with masks and mask-aware scores of the clean view,
at the student's input resolution, from a teacher view of a detector (``TeacherView``).

The teacher protocol: any object with ``forward_teacher(batch)`` returning, per image, ``boxes``
(M, 4) in the student frame, ranking ``scores`` (M,), pseudo-mask weights ``mask_scores`` (M,) and
``mask_probs`` (M, h, w) at the student's unpadded input size can teach (see ``teacher_outputs``).
``TeacherView`` provides it for CondInst; another detector plugs in with its own view."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from torch import nn
from torch.profiler import record_function

from ..geometry import resized_shape
from .layers import batch_images, full_precision, group_indices, select_rows, zero_outside_boxes
from .mask_scores import mask_aware_scores, mean_foreground_probability
from .postprocess import upsample_mask_probs


class TeacherProtocol(Protocol):
    """What BoxTeacher needs of a teacher: its detections of a batch's clean views, per image
    ``boxes`` (M, 4) in the student frame, ranking ``scores`` (M,), pseudo-mask weights
    ``mask_scores`` (M,) and ``mask_probs`` (M, h, w) at the student's unpadded input size."""

    def forward_teacher(self, batched_inputs: list[dict]) -> list[dict[str, torch.Tensor]]: ...


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


def to_student_frame(
    boxes: torch.Tensor, im_inds: torch.Tensor, input_sizes: list[tuple[int, int]], student_sizes: list[tuple[int, int]]
) -> torch.Tensor:
    """(M, 4) XYXY boxes of the batch's teacher inputs (image ``im_inds``, unpadded sizes
    ``input_sizes``) in the frame of each image's student input, clipped to it."""
    limits = boxes.new_tensor([[w, h, w, h] for h, w in student_sizes])
    scales = limits / boxes.new_tensor([[w, h, w, h] for h, w in input_sizes])
    return torch.minimum((boxes * scales[im_inds]).clamp(min=0), limits[im_inds])


def assignable_detections(
    detections: dict[str, torch.Tensor], student_boxes: torch.Tensor, gt_boxes: list[torch.Tensor], iou_threshold: float
) -> dict[str, torch.Tensor]:
    """The detections of the batch (every field indexed by detection, images ``im_inds``) whose
    box in the student frame (``student_boxes`` (M, 4)) has IoU >= ``iou_threshold`` with one of
    the ground-truth boxes of its image (``gt_boxes``: per image (N_i, 4)); order kept."""
    gt_images = group_indices([len(b) for b in gt_boxes])
    iou = box_iou(student_boxes, torch.cat(gt_boxes).to(student_boxes))
    same_image = detections["im_inds"][:, None] == gt_images.to(student_boxes.device)[None]
    return select_rows(detections, ((iou >= iou_threshold) & same_image).any(dim=1))


def teacher_outputs(
    detections: dict[str, torch.Tensor],
    input_sizes: list[tuple[int, int]],
    student_sizes: list[tuple[int, int]],
    mask_stride: int,
    settings: TeacherPass,
) -> list[dict[str, torch.Tensor]]:
    """Per image: ``boxes`` (M, 4) in the student frame, ``scores`` (M,) the mask-aware ranking
    score, ``mask_scores`` (M,) the pseudo-mask weight, ``fcos_scores``, ``labels``,
    ``mask_probs`` (M, h, w) at the student's unpadded input size, and the FCOS ``fpn_levels``
    and ``locations`` (teacher input frame) of the detections when the detector gives them.

    detections: the detector's detections of the whole batch of resized images (boxes in that
    frame, ``im_inds``, ``mask_probs`` (M, 1, H/s, W/s) at ``mask_stride`` over the padded
    batch), grouped by image; input_sizes: the resized sizes. Detections whose box is empty in
    the student frame are dropped. Two host synchronisations per batch.
    """
    threshold = -1.0 if settings.float_masks else settings.mask_threshold
    boxes = to_student_frame(detections["boxes"], detections["im_inds"], input_sizes, student_sizes)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    fields = select_rows({k: v for k, v in detections.items() if k not in ("boxes", "top_feat")} | {"boxes": boxes}, keep)
    counts = torch.bincount(fields.pop("im_inds"), minlength=len(input_sizes)).tolist()
    outputs = []
    for i, values in enumerate(zip(*(v.split(counts) for v in fields.values()))):
        det = dict(zip(fields, values))
        probs = upsample_mask_probs(det["mask_probs"], mask_stride, input_sizes[i], student_sizes[i])
        if settings.clip_masks_to_boxes:
            probs = zero_outside_boxes(probs, det["boxes"])
        mean = mean_foreground_probability(probs, threshold, det["boxes"] if settings.score_in_box else None)
        ranking, weights = mask_aware_scores(det["scores"], mean)
        outputs.append({
            "boxes": det["boxes"],
            "scores": ranking,
            "mask_scores": weights,
            "fcos_scores": det["scores"],
            "labels": det["labels"],
            "mask_probs": probs,
            **{k: det[k] for k in ("fpn_levels", "locations") if k in det},
        })
    return outputs


class TeacherView:
    """A CondInst detector seen as a teacher: ``forward_teacher`` runs the detector's network on
    the clean view and post-processes its detections into what pseudo labelling needs. Not a
    module: it holds no weights of its own, only the detector and the settings.

    Args:
        detector: a ``CondInst`` (backbone, heads, FCOS inference and the dynamic mask head).
        settings: how the pass runs (test size, thresholds, candidate pruning).
    """

    def __init__(self, detector: nn.Module, settings: TeacherPass = TeacherPass()):
        self.detector = detector
        self.settings = settings

    @torch.no_grad()
    def forward_teacher(self, batched_inputs: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Detections of the clean view ``image`` of every sample, each image resized to the
        teacher's test size (``settings.min_size``; None: as it is), with masks at the sample's
        own (student input) resolution. Runs the detector in its current mode (BoxTeacher keeps
        the teacher in train mode by default: batch statistics in the mask branch) but always
        post-processes as at test time. With ``settings.candidate_iou``, detections that cannot
        be assigned to a ground-truth box of the sample are dropped before the mask head runs.
        See ``teacher_outputs`` for the fields."""
        detector, settings = self.detector, self.settings
        images = [(x["image"].to(detector.device).float() - detector.pixel_mean) / detector.pixel_std
                  for x in batched_inputs]
        student_sizes = [tuple(im.shape[-2:]) for im in images]
        resized = [resize_to_test_size(im, settings.min_size, settings.max_size) for im in images]
        batch, sizes = batch_images(resized, detector.backbone.size_divisibility)
        with record_function("teacher: network"):
            mask_feats, outputs, top_feats, locations = detector.run_heads(batch)
        with record_function("teacher: detections"):
            detections = detector.proposal_generator.predict_batch(outputs, locations, top_feats, settings.post_nms_topk)
            if settings.candidate_iou is not None and all("instances" in x for x in batched_inputs):
                detections = assignable_detections(
                    detections, to_student_frame(detections["boxes"], detections["im_inds"], sizes, student_sizes),
                    [x["instances"]["boxes"] for x in batched_inputs], settings.candidate_iou,
                )
        with record_function("teacher: mask head"):
            detections["mask_probs"] = detector.mask_logits(mask_feats, detections, "top_feat").sigmoid()
        with record_function("teacher: post-processing"), full_precision(detector.device):
            return teacher_outputs(detections, sizes, student_sizes, detector.mask_out_stride, settings)
