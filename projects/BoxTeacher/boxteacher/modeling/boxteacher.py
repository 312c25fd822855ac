"""BoxTeacher (Cheng et al., CVPR 2023): a teacher (the EMA of the student) predicts masks, the
best one per ground-truth box becomes its pseudo mask, weighted by a mask-aware score, and the
student learns from the boxes (BoxInst) and from these pseudo masks.

Any detector with a teacher view (``forward_teacher(batch)``, the teacher protocol of
``teacher.py``) can teach, and any detector whose training ``forward`` accepts ``pseudo_masks``
(N, H, W) and ``pseudo_weights`` (N,) in its instances can learn.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .boxinst_model import BoxInst
from .layers import full_precision, group_indices
from .losses import dice_loss
from .pairwise import PairWeights, overlap, pairwise_loss, pairwise_losses
from .pseudo_labels import PseudoLabeler
from .teacher import TeacherProtocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoMaskLosses:
    """Settings of the pseudo-mask losses (``MODEL.BOX_TEACHER.*``).

    mask_weight, affinity_weight: weights of ``loss_mask`` and ``loss_mask_affinity``.
    affinity_threshold: neighbour pairs whose pseudo-mask affinity is at least this must share
        a label; -1 weighs every pair by its affinity instead.
    warmup_iters: linear warm-up of both losses (None: none).
    fix_reduction: normalise by the number of instances with a pseudo mask (else by the sum of
        their weights).
    avg_loss_weight: weight of the optional mean-projection Dice ``loss_avg`` (0: off).
    mask_threshold: pseudo masks are binarised at this probability (None: the Dice loss
        takes the probabilities as soft targets).
    """

    mask_weight: float = 0.5
    affinity_weight: float = 0.1
    affinity_threshold: float = 0.5
    warmup_iters: int | None = 10000
    fix_reduction: bool = True
    avg_loss_weight: float = 0.0
    mask_threshold: float | None = 0.5


def pseudo_mask_affinity(
    masks: torch.Tensor, valid: torch.Tensor, offsets: list[tuple[int, int]], threshold: float
) -> torch.Tensor:
    """Affinity of every pixel with each neighbour under smoothed pseudo masks.

    q = (3x3 average of the mask (zeros outside counted) + mask) / 2;
    A[n] = q q_n + (1 - q)(1 - q_n), times the neighbour's validity, 0 outside the grid.

    masks: (N, h, w) float in [0, 1]; valid: (N, h, w) validity of each mask's image.
    Returns (N, len(offsets), h, w): ``A >= threshold`` as bool, or A itself if threshold < 0.
    """
    q = (F.avg_pool2d(masks[:, None], 3, stride=1, padding=1, count_include_pad=True)[:, 0] + masks) / 2
    n, h, w = masks.shape
    out = torch.zeros((n, len(offsets), h, w), dtype=torch.bool if threshold >= 0 else masks.dtype, device=masks.device)
    for i, (dy, dx) in enumerate(offsets):
        rows, cols, rows_n, cols_n = overlap(h, w, dy, dx)
        a, b = q[:, rows, cols], q[:, rows_n, cols_n]
        affinity = (a * b + (1 - a) * (1 - b)) * valid[:, rows_n, cols_n]
        out[:, i, rows, cols] = affinity >= threshold if threshold >= 0 else affinity
    return out


def mean_projection_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice between the mean-projections along y and along x, summed: (K, 1, h, w) -> (K,)."""
    return dice_loss(probs.mean(dim=2), targets.mean(dim=2)) + dice_loss(probs.mean(dim=3), targets.mean(dim=3))


class PseudoMaskBoxInst(BoxInst):
    """BoxInst that also learns from weighted pseudo masks (BoxTeacher's student).

    Instances may carry ``pseudo_masks`` (N, H, W) (bool, or float probabilities) at the input
    resolution and ``pseudo_weights`` (N,); instances of weight 0 have no pseudo mask. Besides
    ``loss_prj`` and ``loss_pairwise`` the losses are the noise-aware pixel loss ``loss_mask``
    (weighted Dice with the box-constrained pseudo mask, binarised unless ``mask_threshold`` is
    None), the noise-reduced affinity loss ``loss_mask_affinity`` (the pairwise term on
    neighbour pairs the smoothed pseudo mask puts on the same side), optionally ``loss_avg``,
    and the metric ``num_pseudo_masks``. In mixed supervision (see ``BoxInst``) the metric
    ``num_teacher_masks`` also counts the instances whose pseudo mask comes from the teacher.

    Args:
        pseudo_losses: their settings.
        **kwargs: the arguments of ``BoxInst``.
    """

    def __init__(self, *, pseudo_losses: PseudoMaskLosses = PseudoMaskLosses(), **kwargs):
        super().__init__(**kwargs)
        self.pseudo_losses = pseudo_losses

    def mask_targets(self, batched_inputs, gt, padded_size, image_sizes) -> dict:
        """BoxInst's targets plus, when the instances carry pseudo masks: ``pseudo_masks``
        (N_total, H/s, W/s) bool, ``pseudo_pair_weights`` (N_total, neighbours, H/s, W/s) and
        ``pseudo_weights`` (N_total,)."""
        targets = super().mask_targets(batched_inputs, gt, padded_size, image_sizes)
        if not all("pseudo_masks" in g for g in gt):
            return targets
        settings = self.pseudo_losses
        masks = torch.cat([self._masks_at_output_stride(g["pseudo_masks"], padded_size) for g in gt])
        masks = masks * targets["box_masks"]
        valid = targets["valid"][group_indices([g["boxes"].shape[0] for g in gt]).to(masks.device)]
        targets["pseudo_pair_weights"] = pseudo_mask_affinity(
            masks, valid, self.pairwise_offsets, settings.affinity_threshold
        )
        targets["pseudo_masks"] = masks if settings.mask_threshold is None else masks > settings.mask_threshold
        targets["pseudo_weights"] = torch.cat([g["pseudo_weights"].to(masks.dtype) for g in gt])
        return targets

    def mask_losses(self, mask_feats, sampled, targets) -> dict[str, torch.Tensor]:
        if "pseudo_masks" not in targets:
            return super().mask_losses(mask_feats, sampled, targets)
        names = self.loss_names() + ("loss_mask", "loss_mask_affinity") + (
            ("loss_avg",) if self.pseudo_losses.avg_loss_weight > 0 else ()
        )
        if sampled["gt_inds"].numel() == 0:
            zero = self.zero_loss(mask_feats, sampled)
            losses = {name: zero.clone() for name in names} | {"num_pseudo_masks": zero.detach()}
        else:
            logits = self.mask_logits(mask_feats, sampled, "top_feats")
            affinity = self.affinity_pair_weights(sampled, targets)
            if self.mixed_supervision:  # the box terms may cover a subset of the instances
                losses = self.box_and_mask_losses(logits, sampled, targets)
                affinity_sums = pairwise_loss(logits, *affinity, self.pairwise_offsets)
            else:  # both pairwise terms in one pass
                colour_sums, affinity_sums = pairwise_losses(
                    logits, [self.colour_pair_weights(sampled, targets), affinity], self.pairwise_offsets
                )
                losses = self.box_losses(logits, sampled, targets, colour_sums)
            losses.update(self.pseudo_mask_losses(logits, sampled, targets, affinity_sums))
        return losses | self.supervision_counts(targets)

    def affinity_pair_weights(self, sampled: dict[str, torch.Tensor], targets: dict) -> PairWeights:
        """The affinity term's weighting of the sampled instances: the pairs their pseudo mask
        puts on the same side, inside their box."""
        gt_inds = sampled["gt_inds"]
        return PairWeights(targets["pseudo_pair_weights"], gt_inds, targets["box_masks"][gt_inds])

    def supervision_counts(self, targets: dict) -> dict[str, torch.Tensor]:
        """BoxInst's counts, the instances without an annotation mask split into those with a
        teacher mask (``num_teacher_masks``) and those with boxes alone (``num_box_only``)."""
        counts = super().supervision_counts(targets)
        if counts and "pseudo_weights" in targets:
            teacher = (targets["pseudo_weights"] > 0) & ~targets["has_mask"]
            counts["num_teacher_masks"] = teacher.sum().float()
            counts["num_box_only"] = counts["num_box_only"] - counts["num_teacher_masks"]
        return counts

    def pseudo_mask_losses(self, logits, sampled, targets, affinity_sums) -> dict[str, torch.Tensor]:
        """The pseudo-mask terms of K instances' mask logits (K, 1, H/s, W/s), with the (K,)
        loss and weight sums of the affinity weighting (``affinity_pair_weights``)."""
        settings = self.pseudo_losses
        gt_inds = sampled["gt_inds"]
        weights = targets["pseudo_weights"][gt_inds]
        if settings.fix_reduction:
            num_masks = (weights > 0).sum().to(weights.dtype).clamp(min=1.0)
        else:
            num_masks = weights.sum() + 1e-6
        warmup = logits.new_ones(())
        if settings.warmup_iters:
            warmup = (self.mask_head._iter / settings.warmup_iters).clamp(max=1.0).squeeze()
        probs = logits.sigmoid()
        pseudo = targets["pseudo_masks"][gt_inds].unsqueeze(1)
        sums, pair_counts = affinity_sums
        affinity = (weights * sums / pair_counts.clamp(min=1.0)).sum() / num_masks
        losses = {
            "loss_mask": (weights * dice_loss(probs, pseudo)).sum() / num_masks * settings.mask_weight * warmup,
            "loss_mask_affinity": affinity * warmup * settings.affinity_weight,
            "num_pseudo_masks": num_masks.detach(),
        }
        if settings.avg_loss_weight > 0:
            average = (weights * mean_projection_loss(probs, pseudo.to(probs.dtype))).sum() / num_masks
            losses["loss_avg"] = average * settings.avg_loss_weight * warmup
        return losses


class BoxTeacher(nn.Module):
    """A teacher and a student of the same architecture. Training: the teacher (no gradient)
    labels every ground-truth box of the clean view with its best-matching mask
    (``pseudo_label``), and the student learns from the boxes and these pseudo masks.
    Evaluation: the teacher (default) or the student. The teacher's weights are the EMA of the
    student's (``EMAHook``).

    Args:
        student, teacher: the two networks; the teacher's parameters get no gradient.
        teacher_view: the teacher seen through the teacher protocol (``forward_teacher``, see
            ``teacher.py``), e.g. ``TeacherView(teacher, settings)``.
        labeler: how the teacher's detections become pseudo labels (assignment thresholds,
            binarisation, guided-filter refinement).
        teacher_eval_mode: run the teacher pass in eval mode. The original runs it in train
            mode (mask-branch BN with batch statistics), the default here too.
        use_teacher_inference: evaluate with the teacher.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        teacher_view: TeacherProtocol,
        labeler: PseudoLabeler = PseudoLabeler(),
        teacher_eval_mode: bool = False,
        use_teacher_inference: bool = True,
    ):
        super().__init__()
        self.teacher = teacher
        self.student = student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher_view = teacher_view
        self.labeler = labeler
        self.teacher_eval_mode = teacher_eval_mode
        self.use_teacher_inference = use_teacher_inference

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def forward(self, batched_inputs: list[dict]):
        if not self.training:
            return (self.teacher if self.use_teacher_inference else self.student)(batched_inputs)
        labels = self.pseudo_label(batched_inputs)
        with record_function("student"):
            return self.student(with_pseudo_labels(batched_inputs, labels))

    @torch.no_grad()
    def pseudo_label(self, batched_inputs: list[dict]) -> list[dict[str, torch.Tensor]]:
        """The pseudo label of every instance of every sample, as training uses them: the teacher
        (in train mode unless ``teacher_eval_mode``) sees the clean view of the whole batch,
        then ``assign``. The one path of training, the training pictures and the export."""
        self.teacher.train(not self.teacher_eval_mode)
        with record_function("teacher"):
            predictions = self.teacher_view.forward_teacher(batched_inputs)
        return self.assign(batched_inputs, predictions)

    def assign(self, batched_inputs: list[dict], predictions: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Per sample, from the teacher's ``predictions`` (see the teacher protocol): ``masks``
        (N, h, w) at the input resolution (bool, or probabilities without a mask threshold; all
        zero for a box no detection matched), ``weights`` (N,) and ``assigned`` (N,) int64 (the
        detection of each instance, -1 without), the whole batch labelled at once
        (``PseudoLabeler.label``).

        In mixed supervision (instances with ``has_mask`` (N,) and ``masks`` (N, h, w)), the
        teacher's detections are assigned to the box-only instances alone; a masked instance's
        pseudo mask is its annotation mask, with weight 1."""
        with record_function("pseudo labels"), full_precision(self.device):
            # The instances are on the host as the data loader gives them: no device sync here.
            given = [x["instances"] for x in batched_inputs]
            box_only = [None if "has_mask" not in g or not bool(g["has_mask"].any()) else torch.nonzero(~g["has_mask"])[:, 0]
                        for g in given]
            boxes = [g["boxes"] if keep is None else g["boxes"][keep] for g, keep in zip(given, box_only)]
            labels = self.labeler.label(predictions, boxes, [x["image"] for x in batched_inputs])
            return [label if keep is None else self._with_annotation_masks(g, keep, label)
                    for g, keep, label in zip(given, box_only, labels)]

    def _with_annotation_masks(self, given: dict, box_only: torch.Tensor, labels: dict) -> dict[str, torch.Tensor]:
        """The labels of an image's box-only instances ``box_only`` (K,) spread over all its N
        instances, the masked ones labelled by their annotation mask with weight 1."""
        box_only = box_only.to(self.device)
        masks = given["masks"].to(self.device).to(labels["masks"].dtype, copy=True)
        masks[box_only] = labels["masks"]
        weights = given["has_mask"].to(self.device).to(labels["weights"].dtype)
        weights[box_only] = labels["weights"]
        assigned = torch.full_like(weights, -1, dtype=torch.long)
        assigned[box_only] = labels["assigned"]
        return {"masks": masks, "weights": weights, "assigned": assigned}

    # Weights of a single network (ImageNet backbones, CondInst / BoxInst checkpoints) load into
    # the student; see ``engine.checkpoint.load_model_weights``.
    single_network_prefix = "student."

    def on_weights_loaded(self, loaded_keys: list[str]) -> None:
        """Without teacher weights in the checkpoint, the teacher starts as a copy of the
        student (so that evaluating a one-network checkpoint with the teacher works)."""
        if loaded_keys and not any(k.startswith("teacher.") for k in loaded_keys):
            logger.warning("No teacher weights were loaded: the teacher starts as a copy of the student.")
            self.teacher.load_state_dict(self.student.state_dict())


def with_pseudo_labels(batched_inputs: list[dict], labels: list[dict[str, torch.Tensor]]) -> list[dict]:
    """Copies of the samples whose instances (moved to the labels' device) carry the
    ``pseudo_masks`` (N, h, w) and ``pseudo_weights`` (N,) of ``labels`` (``BoxTeacher.assign``)."""
    out = []
    for sample, label in zip(batched_inputs, labels):
        device = label["weights"].device
        instances = {k: v.to(device) for k, v in sample["instances"].items()}
        out.append({**sample, "instances": {**instances, "pseudo_masks": label["masks"], "pseudo_weights": label["weights"]}})
    return out
