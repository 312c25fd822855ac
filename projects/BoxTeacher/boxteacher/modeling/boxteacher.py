"""BoxTeacher (Cheng et al., CVPR 2023): a teacher (the EMA of the student) predicts masks, the
best one per ground-truth box becomes its pseudo mask, weighted by a mask-aware score, and the
student learns from the boxes (BoxInst) and from these pseudo masks.

Semi-supervised (after Guided Distillation, Berrada et al., WACV 2024): samples marked
``"unlabeled"`` have no boxes; the teacher's confident detections become their instances and
its uncertain ones ignore regions (``PseudoInstanceFilter``), and the student's losses on them,
computed in a pass of their own, count ``unlabeled_weight`` times.

Any detector with a teacher view (``forward_teacher(batch)``, the teacher protocol of
``teacher.py``) can teach, and any detector whose training ``forward`` accepts ``pseudo_masks``
(N, H, W) and ``pseudo_weights`` (N,) in its instances can learn.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn
from torch.profiler import record_function

from .layers import full_precision
from .pseudo_instances import PseudoInstanceFilter
from .pseudo_labels import PseudoLabeler
from .teacher import TeacherProtocol

logger = logging.getLogger(__name__)


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
        frozen_teacher: the teacher is a trained network, possibly of another architecture,
            whose weights stay as loaded (no EMA): a checkpoint of one network loads into the
            student alone.
        unlabeled: how the teacher's detections of unlabelled samples become their instances
            and ignore regions; None: every sample must be labelled.
        unlabeled_weight: the weight of the losses on unlabelled samples (lambda_u).
        unlabeled_start_iter: unlabelled samples are left out before this iteration (while the
            teacher is not yet worth learning from).
        pretrained_teacher: the teacher holds the weights of a network trained before (Guided
            Distillation's burn-in): loading a one-network checkpoint into the student leaves it.
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
        frozen_teacher: bool = False,
        unlabeled: PseudoInstanceFilter | None = None,
        unlabeled_weight: float = 2.0,
        unlabeled_start_iter: int = 0,
        pretrained_teacher: bool = False,
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
        self.frozen_teacher = frozen_teacher
        self.unlabeled = unlabeled
        self.unlabeled_weight = unlabeled_weight
        self.unlabeled_start_iter = unlabeled_start_iter
        self.pretrained_teacher = pretrained_teacher

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @property
    def inference_network(self) -> str:
        """The network that evaluation runs: "teacher" or "student"."""
        return "teacher" if self.use_teacher_inference else "student"

    @contextlib.contextmanager
    def inference_by(self, network: str) -> Iterator[None]:
        """Evaluate with ``network`` ("teacher" or "student") inside the block."""
        if network not in ("teacher", "student"):
            raise ValueError(f"network must be 'teacher' or 'student', not {network!r}")
        saved = self.use_teacher_inference
        self.use_teacher_inference = network == "teacher"
        try:
            yield
        finally:
            self.use_teacher_inference = saved

    def forward(self, batched_inputs: list[dict], iteration: int | None = None):
        """Training (``iteration``: the engine's iteration): the student's losses on the pseudo
        labels of the teacher; evaluation: the detections of the teacher (or the student)."""
        if not self.training:
            return (self.teacher if self.use_teacher_inference else self.student)(batched_inputs)
        unlabeled = [bool(x.get("unlabeled", False)) for x in batched_inputs]
        if not any(unlabeled):
            labels = self.pseudo_label(batched_inputs)
            with record_function("student"):
                return self.student(with_pseudo_labels(batched_inputs, labels), iteration=iteration)
        if self.unlabeled is None:
            raise ValueError(
                "The batch has unlabelled samples but this BoxTeacher has no pseudo-instance "
                "filter (unlabeled=None) to label them."
            )
        return self._semi_supervised_losses(batched_inputs, unlabeled, iteration)

    def _semi_supervised_losses(
        self, batched_inputs: list[dict], unlabeled: list[bool], iteration: int | None
    ) -> dict[str, torch.Tensor]:
        """One teacher pass over the whole batch; the student's losses on the labelled samples
        plus ``unlabeled_weight`` times its losses on the pseudo instances of the unlabelled
        ones (a pass of their own), with the mean numbers of pseudo instances and ignore
        regions per unlabelled image as metrics."""
        use_unlabeled = iteration is None or iteration >= self.unlabeled_start_iter
        samples = [x for x, u in zip(batched_inputs, unlabeled) if use_unlabeled or not u]
        self.teacher.train(not self.teacher_eval_mode)
        with record_function("teacher"):
            predictions = self.teacher_view.forward_teacher(samples)
        labeled = [(x, p) for x, p in zip(samples, predictions) if not x.get("unlabeled", False)]
        if not labeled:
            raise ValueError(
                "A semi-supervised batch needs labelled samples besides unlabelled ones."
            )
        labels = self.assign([x for x, _ in labeled], [p for _, p in labeled])
        with record_function("student"):
            losses = self.student(with_pseudo_labels([x for x, _ in labeled], labels), iteration)
        if not use_unlabeled:
            return losses
        pairs = [(x, p) for x, p in zip(samples, predictions) if x.get("unlabeled", False)]
        with record_function("pseudo instances"), full_precision(self.device):
            instances = [self.unlabeled(p) for _, p in pairs]
        # As in one batch of both: the classification loss of the unlabelled images is normalised
        # by at least the positives the labelled ones have per image, so that images with few or
        # no pseudo instances do not turn into an overwhelming push to the background.
        min_positives = float(losses["num_fcos_positives"]) * len(pairs) / len(labeled)
        with record_function("student: unlabelled"):
            extra = self.student(
                with_pseudo_instances([x for x, _ in pairs], instances), iteration, min_positives
            )
        for key, value in extra.items():
            if key.startswith("loss"):
                losses[key] = losses[key] + self.unlabeled_weight * value
        counts = [[len(i["labels"]), len(i["ignore_boxes"])] for i in instances]
        per_image = torch.tensor(counts, dtype=torch.float32).mean(dim=0)
        losses["num_unlabeled_instances"], losses["num_ignore_regions"] = per_image.to(self.device)
        return losses

    @torch.no_grad()
    def pseudo_label(self, batched_inputs: list[dict]) -> list[dict[str, torch.Tensor]]:
        """The pseudo label of every instance of every sample, as training uses them: the teacher
        (in train mode unless ``teacher_eval_mode``) sees the clean view of the whole batch,
        then ``assign``. The one path of training, the training pictures and the export."""
        self.teacher.train(not self.teacher_eval_mode)
        with record_function("teacher"):
            predictions = self.teacher_view.forward_teacher(batched_inputs)
        return self.assign(batched_inputs, predictions)

    def assign(
        self, batched_inputs: list[dict], predictions: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
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
            box_only = [
                None
                if "has_mask" not in g or not bool(g["has_mask"].any())
                else torch.nonzero(~g["has_mask"])[:, 0]
                for g in given
            ]
            boxes = [
                g["boxes"] if keep is None else g["boxes"][keep] for g, keep in zip(given, box_only)
            ]
            labels = self.labeler.label(predictions, boxes, [x["image"] for x in batched_inputs])
            return [
                label if keep is None else self._with_annotation_masks(g, keep, label)
                for g, keep, label in zip(given, box_only, labels)
            ]

    def _with_annotation_masks(
        self, given: dict, box_only: torch.Tensor, labels: dict
    ) -> dict[str, torch.Tensor]:
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
        student (so that evaluating a one-network checkpoint with the teacher works); a frozen
        or pre-trained teacher keeps its own."""
        if self.frozen_teacher or self.pretrained_teacher:
            return
        if loaded_keys and not any(k.startswith("teacher.") for k in loaded_keys):
            logger.warning(
                "No teacher weights were loaded: the teacher starts as a copy of the student."
            )
            self.teacher.load_state_dict(self.student.state_dict())


def with_pseudo_instances(
    batched_inputs: list[dict], instances: list[dict[str, torch.Tensor]]
) -> list[dict]:
    """Copies of unlabelled samples whose instances are their pseudo instances
    (``PseudoInstanceFilter``): ``boxes``, ``labels``, ``pseudo_masks``, ``pseudo_weights`` and
    ``ignore_boxes``."""
    return [
        {
            **sample,
            "instances": {
                "boxes": found["boxes"],
                "labels": found["labels"],
                "pseudo_masks": found["masks"],
                "pseudo_weights": found["weights"],
                "ignore_boxes": found["ignore_boxes"],
            },
        }
        for sample, found in zip(batched_inputs, instances)
    ]


def with_pseudo_labels(
    batched_inputs: list[dict], labels: list[dict[str, torch.Tensor]]
) -> list[dict]:
    """Copies of the samples whose instances (moved to the labels' device) carry the
    ``pseudo_masks`` (N, h, w) and ``pseudo_weights`` (N,) of ``labels`` (``BoxTeacher.assign``)."""
    out = []
    for sample, label in zip(batched_inputs, labels):
        device = label["weights"].device
        instances = {k: v.to(device) for k, v in sample["instances"].items()}
        out.append(
            {
                **sample,
                "instances": {
                    **instances,
                    "pseudo_masks": label["masks"],
                    "pseudo_weights": label["weights"],
                },
            }
        )
    return out
