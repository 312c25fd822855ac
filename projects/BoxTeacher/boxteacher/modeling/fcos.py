"""FCOS: the head, its losses and its inference (AdelaiDet's improved FCOS: centre sampling,
GIoU, centerness on the box tower, ReLU regression in stride units)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, sigmoid_focal_loss

from ..utils.comm import reduce_mean
from .fcos_targets import FCOSTargets, compute_targets
from .layers import Scale, compute_locations, select_rows
from .losses import centerness_targets, iou_loss


@dataclass
class HeadOutputs:
    """Per-level outputs of the FCOS head, each a list over levels of (B, C, h_l, w_l) maps:
    class logits (C = classes), box regression (l, t, r, b) in stride units (C = 4), centerness
    logits (C = 1) and the box-tower features (C = head channels) that CondInst's controller
    reads."""

    logits: list[torch.Tensor]
    bbox_reg: list[torch.Tensor]
    ctrness: list[torch.Tensor]
    bbox_towers: list[torch.Tensor]


class FCOSHead(nn.Module):
    """Shared head: classification tower -> class logits; box tower -> box regression and
    centerness."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int,
        num_cls_convs: int = 4,
        num_box_convs: int = 4,
        use_group_norm: bool = True,
        use_scale: bool = True,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.cls_tower = self._tower(in_channels, num_cls_convs, use_group_norm)
        self.bbox_tower = self._tower(in_channels, num_box_convs, use_group_norm)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)]) if use_scale else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    @staticmethod
    def _tower(channels: int, num_convs: int, use_group_norm: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers.append(nn.Conv2d(channels, channels, 3, padding=1))
            if use_group_norm:
                layers.append(nn.GroupNorm(32, channels))
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def forward(self, features: list[torch.Tensor]) -> HeadOutputs:
        outputs = HeadOutputs([], [], [], [])
        for level, feature in enumerate(features):
            cls_tower = self.cls_tower(feature)
            bbox_tower = self.bbox_tower(feature)
            reg = self.bbox_pred(bbox_tower)
            if self.scales is not None:
                reg = self.scales[level](reg)
            outputs.logits.append(self.cls_logits(cls_tower))
            outputs.bbox_reg.append(F.relu(reg))
            outputs.ctrness.append(self.ctrness(bbox_tower))
            outputs.bbox_towers.append(bbox_tower)
        return outputs


def flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """List over levels of (B, C, h, w) -> (sum_l B*h*w, C), level-major then image then
    row-major (the order of ``FCOSTargets``)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps])


class FCOS(nn.Module):
    """FCOS head plus target assignment, losses and inference.

    Args:
        head: the FCOSHead (its parameters live under ``fcos_head``).
        strides: stride of each input level; sizes_of_interest: object-size boundaries between
            levels (len(strides) - 1 values).
        center_sampling_radius: None disables centre sampling.
        loc_loss_type: "giou", "iou" or "linear_iou".
        thresh_with_ctr: multiply class probabilities by centerness before thresholding.
        score_threshold, pre_nms_topk, nms_threshold, post_nms_topk: inference settings.
    """

    def __init__(
        self,
        head: FCOSHead,
        strides: list[int],
        sizes_of_interest: list[int],
        center_sampling_radius: float | None = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        loc_loss_type: str = "giou",
        thresh_with_ctr: bool = False,
        score_threshold: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_threshold: float = 0.6,
        post_nms_topk: int = 100,
    ):
        super().__init__()
        if len(sizes_of_interest) != len(strides) - 1:
            raise ValueError(
                f"{len(strides)} FCOS levels need {len(strides) - 1} sizes of interest, "
                f"got {list(sizes_of_interest)}"
            )
        self.fcos_head = head
        self.num_classes = head.num_classes
        self.strides = list(strides)
        self.sizes_of_interest = list(sizes_of_interest)
        self.center_sampling_radius = center_sampling_radius
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.loc_loss_type = loc_loss_type
        self.thresh_with_ctr = thresh_with_ctr
        self.score_threshold = score_threshold
        self.pre_nms_topk = pre_nms_topk
        self.nms_threshold = nms_threshold
        self.post_nms_topk = post_nms_topk

    def locations(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level, the (h*w, 2) image coordinates of the feature-map cells."""
        return [
            compute_locations(f.shape[-2], f.shape[-1], s, f.device)
            for f, s in zip(features, self.strides)
        ]

    def targets(
        self,
        locations: list[torch.Tensor],
        gt_boxes: list[torch.Tensor],
        gt_labels: list[torch.Tensor],
        gt_centers: list[torch.Tensor | None] | None = None,
        ignore_boxes: list[torch.Tensor] | None = None,
    ) -> FCOSTargets:
        return compute_targets(
            locations,
            self.strides,
            self.sizes_of_interest,
            gt_boxes,
            gt_labels,
            self.num_classes,
            self.center_sampling_radius,
            gt_centers,
            ignore_boxes,
        )

    def losses(
        self,
        outputs: HeadOutputs,
        targets: FCOSTargets,
        top_feats: list[torch.Tensor] | None = None,
        min_positives: float = 1.0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """FCOS losses and the positive locations. The classification and centerness losses are
        normalised by the number of positive locations (mean over processes), at least
        ``min_positives``.

        Returns ``losses`` (loss_fcos_cls, loss_fcos_loc, loss_fcos_ctr; 0-dim) and
        ``positives``: per positive location (P of them) ``pos_inds``, ``labels``, ``gt_inds``,
        ``im_inds``, ``fpn_levels`` (P,), ``locations``, ``reg_targets``, ``logits`` (P, C),
        ``ctrness`` (P,) logits and, when given, ``top_feats`` (P, G).
        """
        logits = flatten_levels(outputs.logits).float()  # float32 losses also under autocast
        reg_pred = flatten_levels(outputs.bbox_reg).float()
        ctr_pred = flatten_levels(outputs.ctrness).reshape(-1).float()
        pos_inds = torch.nonzero(targets.labels != self.num_classes).squeeze(1)
        num_pos = max(
            reduce_mean(logits.new_tensor(float(pos_inds.numel()))).item(), min_positives, 1.0
        )

        class_targets = torch.zeros_like(logits)
        class_targets[pos_inds, targets.labels[pos_inds]] = 1.0
        if targets.ignore is None:
            focal = sigmoid_focal_loss(
                logits, class_targets, self.focal_alpha, self.focal_gamma, reduction="sum"
            )
        else:  # ignored locations are neither positives nor negatives
            focal = sigmoid_focal_loss(
                logits, class_targets, self.focal_alpha, self.focal_gamma, reduction="none"
            )
            focal = (focal * ~targets.ignore[:, None]).sum()
        loss_cls = focal / num_pos

        reg_targets = targets.reg_targets[pos_inds]
        ctr_targets = centerness_targets(reg_targets)
        ctr_denorm = max(reduce_mean(ctr_targets.sum()).item(), 1e-6)
        loss_loc = (
            iou_loss(reg_pred[pos_inds], reg_targets, self.loc_loss_type, ctr_targets) / ctr_denorm
        )
        loss_ctr = (
            F.binary_cross_entropy_with_logits(ctr_pred[pos_inds], ctr_targets, reduction="sum")
            / num_pos
        )

        positives = {
            "pos_inds": pos_inds,
            "labels": targets.labels[pos_inds],
            "gt_inds": targets.gt_inds[pos_inds],
            "im_inds": targets.im_inds[pos_inds],
            "fpn_levels": targets.fpn_levels[pos_inds],
            "locations": targets.locations[pos_inds],
            "reg_targets": reg_targets,
            "logits": logits[pos_inds],
            "ctrness": ctr_pred[pos_inds],
        }
        if top_feats is not None:
            positives["top_feats"] = flatten_levels(top_feats)[pos_inds]
        losses = {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}
        return losses, positives

    @torch.no_grad()
    def predict(
        self,
        outputs: HeadOutputs,
        locations: list[torch.Tensor],
        top_feats: list[torch.Tensor] | None = None,
        post_nms_topk: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image after class-aware NMS, best first.

        Each dict holds ``boxes`` (M, 4) XYXY in the padded input frame, ``scores`` (M,) =
        sqrt(cls prob * centerness prob), ``labels``, ``fpn_levels`` (M,), ``locations`` (M, 2)
        and, when given, ``top_feat`` (M, G). See ``predict_batch``.
        """
        detections = self.predict_batch(outputs, locations, top_feats, post_nms_topk)
        counts = torch.bincount(
            detections.pop("im_inds"), minlength=outputs.logits[0].shape[0]
        ).tolist()
        return [
            dict(zip(detections, values))
            for values in zip(*(v.split(counts) for v in detections.values()))
        ]

    @torch.no_grad()
    def predict_batch(
        self,
        outputs: HeadOutputs,
        locations: list[torch.Tensor],
        top_feats: list[torch.Tensor] | None = None,
        post_nms_topk: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The detections of the whole batch, computed for all images at once (two host
        synchronisations per batch): per level the ``pre_nms_topk`` best (location, class)
        pairs above the score threshold, class-aware NMS per image, the ``post_nms_topk`` best
        of each image. Fields as in ``predict`` plus ``im_inds`` (M,); grouped by image, best
        first within an image."""
        post_nms_topk = self.post_nms_topk if post_nms_topk is None else post_nms_topk
        num_images = outputs.logits[0].shape[0]
        levels = [
            self._level_candidates(outputs, locations, top_feats, level)
            for level in range(len(locations))
        ]
        merged = {k: torch.cat([c[k] for c in levels], dim=1).flatten(0, 1) for k in levels[0]}
        per_image = sum(c["scores"].shape[1] for c in levels)
        merged["im_inds"] = torch.arange(
            num_images, device=merged["scores"].device
        ).repeat_interleave(per_image)
        merged = select_rows(merged, merged.pop("valid"))
        keep = nms_per_image_and_class(
            merged["boxes"],
            merged["scores"],
            merged["im_inds"],
            merged["labels"],
            self.nms_threshold,
        )
        keep = keep[
            torch.argsort(merged["im_inds"][keep], stable=True)
        ]  # grouped by image, best first
        if post_nms_topk > 0:
            keep = keep[rank_within_groups(merged["im_inds"][keep], num_images) < post_nms_topk]
        return {k: v[keep] for k, v in merged.items()}

    def _level_candidates(
        self,
        outputs: HeadOutputs,
        locations: list[torch.Tensor],
        top_feats: list[torch.Tensor] | None,
        level: int,
    ) -> dict[str, torch.Tensor]:
        """The ``pre_nms_topk`` best (location, class) pairs of every image at one level, best
        first: each field (B, k, ...), and ``valid`` (B, k) for those above the threshold."""
        logits = outputs.logits[level].float()  # boxes and scores in float32 also under autocast
        num_images, num_classes = logits.shape[:2]
        probs = logits.permute(0, 2, 3, 1).reshape(num_images, -1, num_classes).sigmoid()
        ctr = outputs.ctrness[level].float().reshape(num_images, -1, 1).sigmoid()
        if self.thresh_with_ctr:
            probs = probs * ctr
        candidate = (probs > self.score_threshold).flatten(1)
        if not self.thresh_with_ctr:
            probs = probs * ctr
        masked = torch.where(candidate, probs.flatten(1), probs.new_full((), -1.0))
        scores, index = masked.topk(min(self.pre_nms_topk, masked.shape[1]), dim=1)
        loc_index, labels = index // num_classes, index % num_classes
        reg = outputs.bbox_reg[level].float().permute(0, 2, 3, 1).reshape(num_images, -1, 4)
        reg = reg.gather(1, loc_index[..., None].expand(-1, -1, 4)) * self.strides[level]
        points = locations[level][loc_index]
        result = {
            "boxes": torch.cat([points - reg[..., :2], points + reg[..., 2:]], dim=2),
            "scores": torch.sqrt(scores.clamp(min=0)),
            "labels": labels,
            "fpn_levels": torch.full_like(labels, level),
            "locations": points,
            "valid": candidate.gather(1, index),
        }
        if top_feats is not None:
            feats = top_feats[level].flatten(2).transpose(1, 2)  # (B, h*w, G)
            result["top_feat"] = feats.gather(
                1, loc_index[..., None].expand(-1, -1, feats.shape[2])
            )
        return result


def nms_per_image_and_class(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float,
) -> torch.Tensor:
    """Indices kept by NMS run separately for every (image, class), by decreasing score.

    One ``torchvision.ops.nms`` call for all groups: the boxes of different classes are moved
    apart along x and those of different images along y by more than the extent of all boxes
    (``batched_nms`` moves classes along both axes: the same float precision for one image)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    span = boxes.max() - boxes.min() + 1
    shift = torch.stack([labels, images], dim=1).to(boxes) * span
    return nms(boxes + shift.repeat(1, 2), scores, iou_threshold)


def rank_within_groups(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Position of every element within its group, for elements sorted by group: (M,) int64."""
    counts = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(groups.numel(), device=groups.device) - starts[groups]
