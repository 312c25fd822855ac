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
from torch import nn
from torch.profiler import record_function
from torchvision.ops import box_iou

from ..geometry import resized_shape
from .layers import batch_images, full_precision, group_indices, inside_boxes, select_rows
from .mask_scores import foreground_sums, mask_aware_scores, mean_of_sums
from .postprocess import upsampling_weights


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


def resize_to_test_size(
    image: torch.Tensor, min_size: int | None, max_size: int | None
) -> torch.Tensor:
    """Bilinearly resize a (C, h, w) float image by the shortest-edge rule (None: unchanged)."""
    if min_size is None:
        return image
    size = resized_shape(image.shape[-2], image.shape[-1], min_size, max_size)
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def to_student_frame(
    boxes: torch.Tensor,
    im_inds: torch.Tensor,
    input_sizes: list[tuple[int, int]],
    student_sizes: list[tuple[int, int]],
) -> torch.Tensor:
    """(M, 4) XYXY boxes of the batch's teacher inputs (image ``im_inds``, unpadded sizes
    ``input_sizes``) in the frame of each image's student input, clipped to it."""
    limits = boxes.new_tensor([[w, h, w, h] for h, w in student_sizes])
    scales = limits / boxes.new_tensor([[w, h, w, h] for h, w in input_sizes])
    return torch.minimum((boxes * scales[im_inds]).clamp(min=0), limits[im_inds])


def assignable_detections(
    detections: dict[str, torch.Tensor],
    student_boxes: torch.Tensor,
    gt_boxes: list[torch.Tensor],
    iou_threshold: float,
    unlabeled: list[bool] | None = None,
) -> dict[str, torch.Tensor]:
    """The detections of the batch (every field indexed by detection, images ``im_inds``) whose
    box in the student frame (``student_boxes`` (M, 4)) has IoU >= ``iou_threshold`` with one of
    the ground-truth boxes of its image (``gt_boxes``: per image (N_i, 4)), and every detection
    of the images ``unlabeled`` marks (no boxes to assign to: all are pseudo-instance
    candidates); order kept."""
    gt_images = group_indices([len(b) for b in gt_boxes])
    iou = box_iou(student_boxes, torch.cat(gt_boxes).to(student_boxes))
    same_image = detections["im_inds"][:, None] == gt_images.to(student_boxes.device)[None]
    keep = ((iou >= iou_threshold) & same_image).any(dim=1)
    if unlabeled is not None and any(unlabeled):
        kept_images = torch.tensor(unlabeled, device=keep.device)
        keep |= kept_images[detections["im_inds"]]
    return select_rows(detections, keep)


def image_mask_probs(
    mask_probs: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    inside: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """One image's ``upsample_mask_probs`` as matrix products with its interpolation weights
    (see ``upsampling_weights``): mask_probs (M, H/s, W/s), rows (h, H/s), cols (W/s, w).
    inside: the rows (M, h, 1) and columns (M, 1, w) inside each detection's box (0 or 1) to
    zero the probabilities outside it, or None. Returns (M, h, w)."""
    if inside is not None:
        rows, cols = rows * inside[0], cols * inside[1]
    return torch.matmul(rows, torch.matmul(mask_probs, cols))


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

    The upsampling weights, the boxes' rows and columns and the scores are computed for the
    whole batch; the probabilities and their foreground sums image by image, a few operators
    each. Measured on a CPU, one (M, H, W) tensor for the whole batch (padded to its largest
    image) cost twice as much: above the allocator's 32 MiB threshold, its memory is mapped
    afresh, page by page, at every step, where per-image tensors reuse freed memory.
    """
    threshold = -1.0 if settings.float_masks else settings.mask_threshold
    boxes = to_student_frame(detections["boxes"], detections["im_inds"], input_sizes, student_sizes)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    fields = select_rows(
        {k: v for k, v in detections.items() if k not in ("boxes", "top_feat")} | {"boxes": boxes},
        keep,
    )
    counts = torch.bincount(fields.pop("im_inds"), minlength=len(input_sizes)).tolist()
    mask_probs = fields.pop("mask_probs")[:, 0]
    rows, cols = upsampling_weights(
        tuple(mask_probs.shape[-2:]), mask_stride, input_sizes, student_sizes
    )
    heights, widths = [h for h, _ in student_sizes], [w for _, w in student_sizes]
    rows, cols = rows.to(mask_probs).split(heights), cols.to(mask_probs).split(widths, dim=1)
    inside = [None] * len(counts)
    if settings.clip_masks_to_boxes:
        in_rows, in_cols = inside_boxes(fields["boxes"], (max(heights), max(widths)))
        inside = zip(
            in_rows[:, :, None].to(rows[0].dtype).split(counts),
            in_cols[:, None].to(rows[0].dtype).split(counts),
        )
    probs, sums = [], []
    for p, r, c, box_inside, b in zip(
        mask_probs.split(counts), rows, cols, inside, fields["boxes"].split(counts)
    ):
        if box_inside is not None:
            box_inside = (box_inside[0][:, : r.shape[0]], box_inside[1][:, :, : c.shape[1]])
        probs.append(image_mask_probs(p, r, c, box_inside))
        sums.append(foreground_sums(probs[-1], threshold, b if settings.score_in_box else None))
    ranking, weights = mask_aware_scores(
        fields["scores"], mean_of_sums(*(torch.cat(s) for s in zip(*sums)))
    )
    fields |= {"scores": ranking, "mask_scores": weights, "fcos_scores": fields["scores"]}
    per_image = zip(*(v.split(counts) for v in fields.values()))
    return [dict(zip(fields, values), mask_probs=p) for values, p in zip(per_image, probs)]


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
        images = [
            (x["image"].to(detector.device).float() - detector.pixel_mean) / detector.pixel_std
            for x in batched_inputs
        ]
        student_sizes = [tuple(im.shape[-2:]) for im in images]
        resized = [resize_to_test_size(im, settings.min_size, settings.max_size) for im in images]
        batch, sizes = batch_images(resized, detector.backbone.size_divisibility)
        with record_function("teacher: network"):
            mask_feats, outputs, top_feats, locations = detector.run_heads(batch)
        with record_function("teacher: detections"):
            detections = detector.proposal_generator.predict_batch(
                outputs, locations, top_feats, settings.post_nms_topk
            )
            if settings.candidate_iou is not None and all("instances" in x for x in batched_inputs):
                detections = assignable_detections(
                    detections,
                    to_student_frame(
                        detections["boxes"], detections["im_inds"], sizes, student_sizes
                    ),
                    [x["instances"]["boxes"] for x in batched_inputs],
                    settings.candidate_iou,
                    [bool(x.get("unlabeled", False)) for x in batched_inputs],
                )
        with record_function("teacher: mask head"):
            detections["mask_probs"] = detector.mask_logits(
                mask_feats, detections, "top_feat"
            ).sigmoid()
        with record_function("teacher: post-processing"), full_precision(detector.device):
            return teacher_outputs(
                detections, sizes, student_sizes, detector.mask_out_stride, settings
            )
