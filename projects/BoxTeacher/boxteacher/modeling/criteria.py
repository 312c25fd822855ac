"""The mask criteria of the three methods (see ``supervision.MaskCriterion``): CondInst's Dice with
annotation masks, BoxInst's projection and colour-pairwise terms (Tian et al., CVPR 2021), and
BoxTeacher's noise-aware pixel and affinity terms with pseudo masks (Cheng et al., CVPR 2023).
Their losses are unweighted; ``supervision.MaskSupervision`` weighs them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .boxinst import color_similarity, downsampled_lab, projection_loss
from .layers import batch_images
from .losses import dice_loss
from .pairwise import PairWeights, overlap
from .supervision import TargetBatch


class DiceMaskCriterion:
    """CondInst's mask loss: the mean Dice between the positives' mask probabilities and their
    instances' annotation masks, both at the mask output stride.

    Args:
        loss_name: ``loss_mask`` (CondInst) or ``loss_gt_mask`` (the masked instances of mixed
            supervision).
        optional: a batch in which no image has masks (unlabelled images with pseudo
            instances) sits out instead of being an error.
    """

    metric_names: tuple[str, ...] = ()

    def __init__(self, loss_name: str = "loss_mask", optional: bool = False):
        self.loss_names = (loss_name,)
        self.optional = optional

    def targets(self, batch: TargetBatch) -> dict | None:
        """``masks`` (N_total, H/s, W/s) float; None for an optional criterion's batch without
        masks."""
        missing = [i for i, g in enumerate(batch.instances) if "masks" not in g]
        if self.optional and len(missing) == len(batch.instances):
            return None
        if missing:
            raise ValueError(
                f"The mask loss needs instance 'masks', which images {missing} of the batch lack."
            )
        return {"masks": batch.masks_at_stride("masks")}

    def pair_weights(self, sampled: dict[str, torch.Tensor], targets: dict) -> list[PairWeights]:
        return []

    def losses(self, logits, sampled, targets, pair_sums) -> dict[str, torch.Tensor]:
        gt_masks = targets["masks"][sampled["gt_inds"]].unsqueeze(1)
        return {self.loss_names[0]: dice_loss(logits.sigmoid(), gt_masks).mean()}


class BoxInstCriterion:
    """BoxInst's box supervision: the projection term ``loss_prj`` (Dice of the max-projections of
    the mask and of the box) and the colour-pairwise term ``loss_pairwise`` (neighbours of similar
    LAB colour inside the box share a label). Its targets are built from the clean view ``image``
    before the network runs.

    Args:
        bottom_pixels_removed: rows at the bottom of every image, in original-image pixels,
            whose colours are not trusted by the pairwise term.
        pairwise_offsets: the neighbours of the pairwise term.
        pairwise_color_thresh: pairs of at least this LAB similarity must share a label.
        input_format: channel order of ``image`` ("BGR" or "RGB").
    """

    loss_names = ("loss_prj", "loss_pairwise")
    metric_names: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        bottom_pixels_removed: int = 10,
        pairwise_offsets: list[tuple[int, int]],
        pairwise_color_thresh: float = 0.3,
        input_format: str = "BGR",
    ):
        self.bottom_pixels_removed = bottom_pixels_removed
        self.pairwise_offsets = pairwise_offsets
        self.pairwise_color_thresh = pairwise_color_thresh
        self.rgb_channels = [2, 1, 0] if input_format == "BGR" else [0, 1, 2]

    def targets(self, batch: TargetBatch) -> dict:
        """Box masks (``box_masks``: (N_total, H/s, W/s)) and per-image neighbour weights
        1[colour similarity >= threshold] (``pair_weights``: (B, neighbours, H/s, W/s) bool)."""
        raw, _ = batch_images(
            [x["image"].to(batch.device) for x in batch.inputs], batch.size_divisibility
        )
        valid = batch.valid_pixels(self.bottom_pixels_removed)
        similarity = color_similarity(
            downsampled_lab(raw, batch.stride, self.rgb_channels), valid, self.pairwise_offsets
        )
        return {
            "box_masks": batch.box_masks,
            "pair_weights": similarity >= self.pairwise_color_thresh,
        }

    def pair_weights(self, sampled: dict[str, torch.Tensor], targets: dict) -> list[PairWeights]:
        """Each image's colour similarities, inside each positive's box."""
        return [
            PairWeights(
                targets["pair_weights"],
                sampled["im_inds"],
                targets["box_masks"][sampled["gt_inds"]],
            )
        ]

    def losses(self, logits, sampled, targets, pair_sums) -> dict[str, torch.Tensor]:
        box_masks = targets["box_masks"][sampled["gt_inds"]].unsqueeze(1)
        loss_sums, weight_sums = pair_sums[0]
        return {
            "loss_prj": projection_loss(logits.sigmoid(), box_masks),
            "loss_pairwise": loss_sums.sum() / weight_sums.sum().clamp(min=1.0),
        }


def pseudo_mask_affinity(
    masks: torch.Tensor, valid: torch.Tensor, offsets: list[tuple[int, int]], threshold: float
) -> torch.Tensor:
    """Affinity of every pixel with each neighbour under smoothed pseudo masks.

    q = (3x3 average of the mask (zeros outside counted) + mask) / 2;
    A[n] = q q_n + (1 - q)(1 - q_n), times the neighbour's validity, 0 outside the grid.

    masks: (N, h, w) float in [0, 1]; valid: (N, h, w) validity of each mask's image.
    Returns (N, len(offsets), h, w): ``A >= threshold`` as bool, or A itself if threshold < 0.
    """
    q = (
        F.avg_pool2d(masks[:, None], 3, stride=1, padding=1, count_include_pad=True)[:, 0] + masks
    ) / 2
    n, h, w = masks.shape
    out = torch.zeros(
        (n, len(offsets), h, w),
        dtype=torch.bool if threshold >= 0 else masks.dtype,
        device=masks.device,
    )
    for i, (dy, dx) in enumerate(offsets):
        rows, cols, rows_n, cols_n = overlap(h, w, dy, dx)
        a, b = q[:, rows, cols], q[:, rows_n, cols_n]
        affinity = (a * b + (1 - a) * (1 - b)) * valid[:, rows_n, cols_n]
        out[:, i, rows, cols] = affinity >= threshold if threshold >= 0 else affinity
    return out


def mean_projection_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice between the mean-projections along y and along x, summed: (K, 1, h, w) -> (K,)."""
    return dice_loss(probs.mean(dim=2), targets.mean(dim=2)) + dice_loss(
        probs.mean(dim=3), targets.mean(dim=3)
    )


class PseudoMaskCriterion:
    """BoxTeacher's pseudo-mask supervision. Instances carry ``pseudo_masks`` (N, H, W) (bool, or
    float probabilities) at the input resolution and ``pseudo_weights`` (N,); weight 0 means no
    pseudo mask. The losses are the noise-aware pixel loss ``loss_mask`` (weighted Dice with the
    box-constrained pseudo mask, binarised unless ``mask_threshold`` is None), the noise-reduced
    affinity loss ``loss_mask_affinity`` (the pairwise term on the neighbour pairs the smoothed
    pseudo mask puts on the same side) and optionally ``loss_avg``, each normalised by the number
    of positives with a pseudo mask (or by the sum of their weights), and the metric
    ``num_pseudo_masks``. A batch without pseudo masks (the instances carry none) sits out.

    Args:
        pairwise_offsets, bottom_pixels_removed: as BoxInst's (the affinity term is its pairwise
            term with other pair weights).
        affinity_threshold: neighbour pairs whose pseudo-mask affinity is at least this must
            share a label; -1 weighs every pair by its affinity instead.
        fix_reduction: normalise by the number of positives with a pseudo mask (else by the sum
            of their weights).
        mean_projection: add the mean-projection Dice ``loss_avg``.
        mask_threshold: pseudo masks are binarised at this probability (None: the Dice loss
            takes the probabilities as soft targets).
    """

    metric_names = ("num_pseudo_masks",)

    def __init__(
        self,
        *,
        pairwise_offsets: list[tuple[int, int]],
        bottom_pixels_removed: int = 10,
        affinity_threshold: float = 0.5,
        fix_reduction: bool = True,
        mean_projection: bool = False,
        mask_threshold: float | None = 0.5,
    ):
        self.pairwise_offsets = pairwise_offsets
        self.bottom_pixels_removed = bottom_pixels_removed
        self.affinity_threshold = affinity_threshold
        self.fix_reduction = fix_reduction
        self.mask_threshold = mask_threshold
        self.loss_names = ("loss_mask", "loss_mask_affinity") + (
            ("loss_avg",) if mean_projection else ()
        )

    def targets(self, batch: TargetBatch) -> dict | None:
        """``pseudo_masks`` (N_total, H/s, W/s) inside their box (bool, or float when soft),
        ``pseudo_pair_weights`` (N_total, neighbours, H/s, W/s), ``pseudo_weights`` (N_total,)
        and the ``box_masks``; None without pseudo masks."""
        if not all("pseudo_masks" in g for g in batch.instances):
            return None
        box_masks = batch.box_masks
        masks = batch.masks_at_stride("pseudo_masks") * box_masks
        valid = batch.valid_pixels(self.bottom_pixels_removed)[batch.instance_images()]
        return {
            "box_masks": box_masks,
            "pseudo_pair_weights": pseudo_mask_affinity(
                masks, valid, self.pairwise_offsets, self.affinity_threshold
            ),
            "pseudo_masks": masks if self.mask_threshold is None else masks > self.mask_threshold,
            "pseudo_weights": torch.cat(
                [g["pseudo_weights"].to(masks.dtype) for g in batch.instances]
            ),
        }

    def pair_weights(self, sampled: dict[str, torch.Tensor], targets: dict) -> list[PairWeights]:
        """The pairs each positive's pseudo mask puts on the same side, inside its box."""
        gt_inds = sampled["gt_inds"]
        return [PairWeights(targets["pseudo_pair_weights"], gt_inds, targets["box_masks"][gt_inds])]

    def losses(self, logits, sampled, targets, pair_sums) -> dict[str, torch.Tensor]:
        gt_inds = sampled["gt_inds"]
        weights = targets["pseudo_weights"][gt_inds]
        if self.fix_reduction:
            num_masks = (weights > 0).sum().to(weights.dtype).clamp(min=1.0)
        else:
            num_masks = weights.sum() + 1e-6
        probs = logits.sigmoid()
        pseudo = targets["pseudo_masks"][gt_inds].unsqueeze(1)
        sums, pair_counts = pair_sums[0]
        losses = {
            "loss_mask": (weights * dice_loss(probs, pseudo)).sum() / num_masks,
            "loss_mask_affinity": (weights * sums / pair_counts.clamp(min=1.0)).sum() / num_masks,
            "num_pseudo_masks": num_masks.detach(),
        }
        if "loss_avg" in self.loss_names:
            losses["loss_avg"] = (
                weights * mean_projection_loss(probs, pseudo.to(probs.dtype))
            ).sum() / num_masks
        return losses
