"""Straightforward per-image (and per-box) implementations of steps that the package computes
batched: the tests check the batched code against them (not a test module)."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms


def fcos_predict_per_image(
    fcos, outputs, locations, top_feats=None, post_nms_topk=None
) -> list[dict]:
    """FCOS inference image by image and level by level: threshold, pre-NMS top-k of each
    level, class-aware NMS, post-NMS top-k."""
    post_nms_topk = fcos.post_nms_topk if post_nms_topk is None else post_nms_topk
    results = []
    for i in range(outputs.logits[0].shape[0]):
        candidates = [
            _level_candidates(fcos, outputs, locations, top_feats, level, i)
            for level in range(len(locations))
        ]
        merged = {k: torch.cat([c[k] for c in candidates]) for k in candidates[0]}
        keep = batched_nms(merged["boxes"], merged["scores"], merged["labels"], fcos.nms_threshold)
        if post_nms_topk > 0:
            keep = keep[:post_nms_topk]
        results.append({k: v[keep] for k, v in merged.items()})
    return results


def _level_candidates(fcos, outputs, locations, top_feats, level, image):
    num_classes = outputs.logits[level].shape[1]
    probs = outputs.logits[level][image].permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
    ctr = outputs.ctrness[level][image].reshape(-1).sigmoid()
    if fcos.thresh_with_ctr:
        probs = probs * ctr[:, None]
    candidate = probs > fcos.score_threshold
    if not fcos.thresh_with_ctr:
        probs = probs * ctr[:, None]
    scores = probs[candidate]
    loc_index, labels = candidate.nonzero(as_tuple=True)
    if scores.numel() > fcos.pre_nms_topk:
        scores, top = scores.topk(fcos.pre_nms_topk)
        loc_index, labels = loc_index[top], labels[top]
    reg = (
        outputs.bbox_reg[level][image].permute(1, 2, 0).reshape(-1, 4)[loc_index]
        * fcos.strides[level]
    )
    points = locations[level][loc_index]
    result = {
        "boxes": torch.cat([points - reg[:, :2], points + reg[:, 2:]], dim=1),
        "scores": torch.sqrt(scores),
        "labels": labels,
        "fpn_levels": torch.full_like(labels, level),
        "locations": points,
    }
    if top_feats is not None:
        feats = top_feats[level][image]
        result["top_feat"] = feats.permute(1, 2, 0).reshape(-1, feats.shape[0])[loc_index]
    return result


def forward_teacher_per_image(view, batched_inputs: list[dict]) -> list[dict]:
    """``TeacherView.forward_teacher`` image by image: per-image FCOS inference, per-image choice
    of the assignable detections, per-image post-processing."""
    from torchvision.ops import box_iou

    from boxteacher.modeling.layers import batch_images, boxes_to_masks
    from boxteacher.modeling.mask_scores import (
        mask_aware_scores,
        mean_foreground_probability,
    )
    from boxteacher.modeling.postprocess import rescale_boxes
    from boxteacher.modeling.teacher import resize_to_test_size

    model, settings = view.detector, view.settings
    images = [
        (x["image"].to(model.device).float() - model.pixel_mean) / model.pixel_std
        for x in batched_inputs
    ]
    student_sizes = [tuple(im.shape[-2:]) for im in images]
    resized = [resize_to_test_size(im, settings.min_size, settings.max_size) for im in images]
    batch, sizes = batch_images(resized, model.backbone.size_divisibility)
    mask_feats, outputs, top_feats, locations = model.run_heads(batch)
    detections = fcos_predict_per_image(
        model.proposal_generator, outputs, locations, top_feats, settings.post_nms_topk
    )
    if settings.candidate_iou is not None:
        for i, (size, student_size, x) in enumerate(zip(sizes, student_sizes, batched_inputs)):
            boxes = rescale_boxes(detections[i]["boxes"], size, student_size)
            gt = x["instances"]["boxes"].to(boxes)
            keep = (
                (box_iou(boxes, gt) >= settings.candidate_iou).any(dim=1)
                if len(gt)
                else boxes.new_zeros(len(boxes), dtype=torch.bool)
            )
            detections[i] = {k: v[keep] for k, v in detections[i].items()}
    counts = [d["scores"].numel() for d in detections]
    merged = {k: torch.cat([d[k] for d in detections]) for k in detections[0]}
    merged["im_inds"] = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    probs = model.mask_logits(mask_feats, merged, "top_feat").sigmoid()
    threshold = -1.0 if settings.float_masks else settings.mask_threshold
    results = []
    for det, p, size, student_size in zip(detections, probs.split(counts), sizes, student_sizes):
        frame = detections_to_output_frame_full_resolution(
            det, p, model.mask_out_stride, size, student_size, threshold
        )
        probs_i = frame["mask_probs"]
        if settings.clip_masks_to_boxes:
            probs_i = probs_i * boxes_to_masks(frame["boxes"], probs_i.shape[-2:]).to(probs_i.dtype)
        mean = mean_foreground_probability(
            probs_i, threshold, frame["boxes"] if settings.score_in_box else None
        )
        ranking, weights = mask_aware_scores(frame["scores"], mean)
        results.append(
            {
                "boxes": frame["boxes"],
                "scores": ranking,
                "mask_scores": weights,
                "fcos_scores": frame["scores"],
                "labels": frame["labels"],
                "mask_probs": probs_i,
                "fpn_levels": frame["fpn_levels"],
                "locations": frame["locations"],
            }
        )
    return results


def detections_to_output_frame_full_resolution(
    detections: dict,
    mask_probs: torch.Tensor,
    mask_stride: int,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_threshold: float = 0.5,
) -> dict:
    """``postprocess.detections_to_output_frame`` as it was before masks were pasted a chunk of
    detections at a time: all the detections' probabilities upsampled at once to (M', height,
    width) floats (returned as ``mask_probs``, with ``masks`` their thresholding)."""
    from boxteacher.modeling.postprocess import rescale_boxes, upsample_mask_probs

    boxes = rescale_boxes(detections["boxes"], input_size, output_size)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    probs = upsample_mask_probs(mask_probs[keep], mask_stride, input_size, output_size)
    origin = {k: detections[k][keep] for k in ("fpn_levels", "locations") if k in detections}
    return {
        "boxes": boxes[keep],
        "scores": detections["scores"][keep],
        "labels": detections["labels"][keep],
        "mask_probs": probs,
        "masks": probs > mask_threshold,
        **origin,
    }


def teacher_outputs_per_image(
    detections, input_sizes, student_sizes, mask_stride, settings
) -> list[dict]:
    """``teacher.teacher_outputs`` image by image, as it was before the upsampling became matrix
    products: ``upsample_mask_probs``, the probabilities multiplied by the boxes' masks, then
    the mean foreground probability counted with bools."""
    from boxteacher.modeling.layers import boxes_to_masks, select_rows
    from boxteacher.modeling.mask_scores import mask_aware_scores
    from boxteacher.modeling.postprocess import upsample_mask_probs
    from boxteacher.modeling.teacher import to_student_frame

    threshold = -1.0 if settings.float_masks else settings.mask_threshold
    boxes = to_student_frame(detections["boxes"], detections["im_inds"], input_sizes, student_sizes)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    fields = select_rows(
        {k: v for k, v in detections.items() if k not in ("boxes", "top_feat")} | {"boxes": boxes},
        keep,
    )
    counts = torch.bincount(fields.pop("im_inds"), minlength=len(input_sizes)).tolist()
    outputs = []
    for i, values in enumerate(zip(*(v.split(counts) for v in fields.values()))):
        det = dict(zip(fields, values))
        probs = upsample_mask_probs(
            det["mask_probs"], mask_stride, input_sizes[i], student_sizes[i]
        )
        if settings.clip_masks_to_boxes:
            probs = probs * boxes_to_masks(det["boxes"], probs.shape[-2:])
        foreground = probs > threshold
        if settings.score_in_box:
            foreground &= boxes_to_masks(det["boxes"], probs.shape[-2:])
        count = foreground.sum(dim=(1, 2)).to(probs.dtype)
        mean = torch.where(foreground, probs, 0.0).sum(dim=(1, 2)) / (count + 1e-6)
        ranking, weights = mask_aware_scores(det["scores"], mean)
        outputs.append(
            {
                "boxes": det["boxes"],
                "scores": ranking,
                "mask_scores": weights,
                "fcos_scores": det["scores"],
                "labels": det["labels"],
                "mask_probs": probs,
                **{k: det[k] for k in ("fpn_levels", "locations") if k in det},
            }
        )
    return outputs
