"""BoxInst (Tian et al., CVPR 2021): CondInst trained from boxes, optionally mixed with the
annotation masks some instances have. The loss terms themselves are the pure functions of
``boxinst.py`` and ``pairwise.py``."""
from __future__ import annotations

import torch

from .boxinst import (
    box_mask_centers,
    box_masks_at_stride,
    color_similarity,
    downsampled_lab,
    projection_loss,
    valid_pixels_at_stride,
)
from .layers import batch_images
from .losses import masked_dice_loss
from .meta_arch import CondInst
from .pairwise import PairWeights, neighbour_offsets, pairwise_loss


class BoxInst(CondInst):
    """CondInst trained from boxes only (BoxInst, Tian et al., CVPR 2021).

    The mask losses are the projection term (``loss_prj``) and the colour-pairwise term
    (``loss_pairwise``, warmed up linearly over ``pairwise_warmup_iters`` training iterations).
    Their targets (box masks, colour similarity of the unnormalised input ``image``) are built
    before the heads run; annotation masks are not read. FCOS positives are sampled around
    the centres of the box masks, as in AdelaiDet.

    Mixed supervision (``mixed_supervision``): instances carry ``masks`` and ``has_mask``; the
    sampled positives of masked instances get CondInst's Dice loss with their mask
    (``loss_gt_mask``, the mean over them), the box terms cover the other positives only (all of
    them with ``box_terms_on_masked``), and the metrics ``num_gt_masks`` / ``num_box_only``
    count the batch's instances with and without an annotation mask.

    Args:
        bottom_pixels_removed: rows at the bottom of every image, in original-image pixels,
            whose colours are not trusted by the pairwise term.
        pairwise_size, pairwise_dilation: the neighbourhood of the pairwise term.
        pairwise_color_thresh: pairs of at least this LAB similarity must share a label.
        pairwise_warmup_iters: length of the linear warm-up of the pairwise term.
        input_format: channel order of ``image`` ("BGR" or "RGB").
        centers_from_box_masks: sample FCOS positives around the centres of the box masks
            (AdelaiDet's BoxInst) instead of the box centres (BoxTeacher's student).
        mixed_supervision: learn from the annotation masks of the instances that have one.
        box_terms_on_masked: in mixed supervision, apply the box terms to masked instances too.
        **kwargs: the arguments of ``CondInst``.
    """

    def __init__(
        self,
        *,
        bottom_pixels_removed: int = 10,
        pairwise_size: int = 3,
        pairwise_dilation: int = 2,
        pairwise_color_thresh: float = 0.3,
        pairwise_warmup_iters: int = 10000,
        input_format: str = "BGR",
        centers_from_box_masks: bool = True,
        mixed_supervision: bool = False,
        box_terms_on_masked: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.centers_from_box_masks = centers_from_box_masks
        self.mixed_supervision = mixed_supervision
        self.box_terms_on_masked = box_terms_on_masked
        self.bottom_pixels_removed = bottom_pixels_removed
        self.pairwise_offsets = neighbour_offsets(pairwise_size, pairwise_dilation)
        self.pairwise_color_thresh = pairwise_color_thresh
        self.pairwise_warmup_iters = pairwise_warmup_iters
        self.rgb_channels = [2, 1, 0] if input_format == "BGR" else [0, 1, 2]

    def mask_targets(
        self,
        batched_inputs: list[dict],
        gt: list[dict[str, torch.Tensor]],
        padded_size: tuple[int, int],
        image_sizes: list[tuple[int, int]],
    ) -> dict:
        """Box masks of all images at the mask output stride (``box_masks``: (N_total, H/s, W/s)),
        per-image neighbour weights 1[colour similarity >= threshold] (``pair_weights``:
        (B, len(offsets), H/s, W/s) bool), the valid pixels (``valid``: (B, H/s, W/s)) and the
        centres FCOS samples positives around (``centers``). In mixed supervision also the
        annotation masks (``gt_masks``: (N_total, H/s, W/s)) and ``has_mask`` (N_total,) bool."""
        s = self.mask_out_stride
        raw, _ = batch_images([x["image"].to(self.device) for x in batched_inputs], self.backbone.size_divisibility)
        valid = valid_pixels_at_stride(
            image_sizes, [int(x.get("height", size[0])) for x, size in zip(batched_inputs, image_sizes)],
            padded_size, s, self.bottom_pixels_removed, self.device,
        )
        similarity = color_similarity(downsampled_lab(raw, s, self.rgb_channels), valid, self.pairwise_offsets)
        targets = {
            "box_masks": torch.cat([box_masks_at_stride(g["boxes"], padded_size, s) for g in gt]),
            "pair_weights": similarity >= self.pairwise_color_thresh,
            "valid": valid,
            "centers": [box_mask_centers(g["boxes"], padded_size) if self.centers_from_box_masks else None for g in gt],
        }
        if self.mixed_supervision:
            targets.update(self._annotation_mask_targets(gt, padded_size))
        return targets

    def _annotation_mask_targets(self, gt: list[dict[str, torch.Tensor]], padded_size: tuple[int, int]) -> dict:
        """``gt_masks`` (N_total, H/s, W/s) at the mask output stride and ``has_mask`` (N_total,)."""
        missing = [i for i, g in enumerate(gt) if not {"masks", "has_mask"} <= g.keys()]
        if missing:
            raise ValueError(
                f"Mixed supervision (MODEL.BOXINST.GT_MASKS) needs instances 'masks' and 'has_mask', "
                f"which images {missing} of the batch lack."
            )
        return {
            "gt_masks": torch.cat([self._masks_at_output_stride(g["masks"], padded_size) for g in gt]),
            "has_mask": torch.cat([g["has_mask"] for g in gt]),
        }

    LOSS_NAMES = ("loss_prj", "loss_pairwise")

    def loss_names(self) -> tuple[str, ...]:
        """The losses of ``box_and_mask_losses``."""
        return self.LOSS_NAMES + (("loss_gt_mask",) if self.mixed_supervision else ())

    def mask_losses(
        self, mask_feats: torch.Tensor, sampled: dict[str, torch.Tensor], targets: dict
    ) -> dict[str, torch.Tensor]:
        if sampled["gt_inds"].numel() == 0:
            zero = self.zero_loss(mask_feats, sampled)
            losses = {name: zero.clone() for name in self.loss_names()}
        else:
            logits = self.mask_logits(mask_feats, sampled, "top_feats")
            losses = self.box_and_mask_losses(logits, sampled, targets)
        return losses | self.supervision_counts(targets)

    def supervision_counts(self, targets: dict) -> dict[str, torch.Tensor]:
        """Mixed supervision's metrics: the batch's instances with an annotation mask
        (``num_gt_masks``) and without (``num_box_only``); none otherwise."""
        if not self.mixed_supervision:
            return {}
        has_mask = targets["has_mask"]
        return {"num_gt_masks": has_mask.sum().float(), "num_box_only": (~has_mask).sum().float()}

    def box_and_mask_losses(
        self, logits: torch.Tensor, sampled: dict[str, torch.Tensor], targets: dict
    ) -> dict[str, torch.Tensor]:
        """The box terms of K sampled positives' mask logits (K, 1, H/s, W/s) and, in mixed
        supervision, ``loss_gt_mask`` of the masked ones, the box terms then covering the
        box-only ones (unless ``box_terms_on_masked``). A term without positives is a zero
        connected to ``logits``.

        Every positive weighs what it weighs in its pure method: a term over a group of the
        positives is the group's mean scaled by the group's share of the K positives (with every
        positive masked, ``loss_gt_mask`` is CondInst's ``loss_mask``; with none, the box terms
        are BoxInst's). A plain mean over a few masked positives would give each of them the
        weight of the whole batch."""
        if not self.mixed_supervision:
            return self.box_losses(logits, sampled, targets)
        masked = targets["has_mask"][sampled["gt_inds"]]
        masked_share = masked.to(logits.dtype).mean()
        if self.box_terms_on_masked:
            losses = self.box_losses(logits, sampled, targets)
        elif bool(masked.all()):
            losses = {name: logits.sum() * 0 for name in self.LOSS_NAMES}
        else:
            box_only = ~masked
            subset = self.box_losses(logits[box_only], {k: v[box_only] for k, v in sampled.items()}, targets)
            losses = {name: value * (1 - masked_share) for name, value in subset.items()}
        gt_masks = targets["gt_masks"][sampled["gt_inds"]]
        losses["loss_gt_mask"] = masked_dice_loss(logits.sigmoid(), gt_masks, masked) * masked_share
        return losses

    def colour_pair_weights(self, sampled: dict[str, torch.Tensor], targets: dict) -> PairWeights:
        """The colour-pairwise term's weighting of the sampled instances: each image's colour
        similarities, inside each instance's box."""
        return PairWeights(targets["pair_weights"], sampled["im_inds"], targets["box_masks"][sampled["gt_inds"]])

    def box_losses(
        self,
        logits: torch.Tensor,
        sampled: dict[str, torch.Tensor],
        targets: dict,
        pairwise_sums: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Projection and colour-pairwise terms of K instances' mask logits (K, 1, H/s, W/s);
        ``pairwise_sums``: the (K,) loss and weight sums of the colour weighting when already
        computed (see ``pairwise_losses``)."""
        box_masks = targets["box_masks"][sampled["gt_inds"]].unsqueeze(1)
        if pairwise_sums is None:
            pairwise_sums = pairwise_loss(logits, *self.colour_pair_weights(sampled, targets), self.pairwise_offsets)
        loss_sums, weight_sums = pairwise_sums
        warmup = (self.mask_head._iter / self.pairwise_warmup_iters).clamp(max=1.0)
        return {
            "loss_prj": projection_loss(logits.sigmoid(), box_masks),
            "loss_pairwise": loss_sums.sum() / weight_sums.sum().clamp(min=1.0) * warmup.squeeze(),
        }
