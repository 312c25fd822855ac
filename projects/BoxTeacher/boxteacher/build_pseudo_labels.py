"""How a teacher labels, from config keys (``MODEL.BOX_TEACHER.*``, ``MODEL.SEMI.*``): its pass,
the assignment of its detections to boxes with the guided-filter refinement, the pseudo
instances of unlabelled images, and the weights of a pre-trained teacher. ``build.py`` builds
the models that use them."""

from __future__ import annotations

from torch import nn

from .config import CfgNode
from .modeling.guided_filter import MaskRefinement
from .modeling.pseudo_instances import PseudoInstanceFilter
from .modeling.pseudo_labels import PseudoLabeler
from .modeling.teacher import TeacherPass


def teacher_pass(cfg: CfgNode) -> TeacherPass:
    """How a network of ``cfg`` runs as a teacher (``TeacherView.forward_teacher``)."""
    t = cfg.MODEL.BOX_TEACHER
    return TeacherPass(
        min_size=cfg.INPUT.MIN_SIZE_TEST if t.TEACHER_TEST_SIZE else None,
        max_size=cfg.INPUT.MAX_SIZE_TEST if t.TEACHER_TEST_SIZE else None,
        mask_threshold=t.TEACHER_MASK_THRESHOLD,
        post_nms_topk=cfg.MODEL.FCOS.POST_NMS_TOPK_TEST,
        float_masks=t.RETURN_FLOAT_MASK,
        score_in_box=t.SCORE_IN_BOX,
        clip_masks_to_boxes=t.CLIP_MASKS_TO_BOXES,
        # The released assignment treats the first detection specially, so the teacher
        # keeps every detection for it.
        candidate_iou=None if t.LEGACY_ASSIGNMENT else t.IOU_THR,
    )


def load_pretrained_teacher(cfg: CfgNode, teacher: nn.Module) -> bool:
    """Load ``MODEL.SEMI.TEACHER_WEIGHTS`` into ``teacher`` when set; whether it was. ValueError
    naming the keys when a burn-in and the teacher weights do not come together."""
    from .engine.checkpoint import load_model_weights
    from .engine.weight_files import read_model_weights

    s = cfg.MODEL.SEMI
    if s.TRAIN_TEACHER and not s.TEACHER_WEIGHTS:
        return False  # stage 1 of train_net.py trains it (engine.trainer.train_teacher_first)
    if bool(s.TEACHER_WEIGHTS) != (s.BURN_IN_ITERS > 0):
        raise ValueError(
            "MODEL.SEMI.TEACHER_WEIGHTS and MODEL.SEMI.BURN_IN_ITERS > 0 go together (a "
            "pre-trained teacher stays as loaded during the burn-in); got "
            f"TEACHER_WEIGHTS {s.TEACHER_WEIGHTS!r} and BURN_IN_ITERS {s.BURN_IN_ITERS}."
        )
    if not s.TEACHER_WEIGHTS:
        return False
    if cfg.MODEL.BOX_TEACHER.TEACHER_CONFIG:
        raise ValueError(
            "MODEL.SEMI.TEACHER_WEIGHTS pre-trains the EMA teacher; "
            "MODEL.BOX_TEACHER.TEACHER_CONFIG sets a frozen teacher of its own: use one of them."
        )
    load_model_weights(teacher, read_model_weights(s.TEACHER_WEIGHTS), s.TEACHER_WEIGHTS)
    return True


def pseudo_instance_filter(cfg: CfgNode) -> PseudoInstanceFilter:
    """Which teacher detections of unlabelled images become instances or ignore regions
    (``MODEL.SEMI.*``); ValueError naming the keys when SCORE_LOW exceeds SCORE_HIGH."""
    s = cfg.MODEL.SEMI
    if s.SCORE_LOW > s.SCORE_HIGH:
        raise ValueError(
            f"MODEL.SEMI.SCORE_LOW ({s.SCORE_LOW}) must not exceed MODEL.SEMI.SCORE_HIGH "
            f"({s.SCORE_HIGH})."
        )
    return PseudoInstanceFilter(
        score_high=s.SCORE_HIGH,
        score_low=s.SCORE_LOW,
        mask_threshold=cfg.MODEL.BOX_TEACHER.TEACHER_MASK_THRESHOLD,
        min_mask_area=s.MIN_MASK_AREA,
    )


def pseudo_labeler(cfg: CfgNode) -> PseudoLabeler:
    """How BoxTeacher's teacher detections become pseudo labels (``MODEL.BOX_TEACHER.*``)."""
    t = cfg.MODEL.BOX_TEACHER
    return PseudoLabeler(
        iou_threshold=t.IOU_THR,
        score_threshold=t.SCORE_THR,
        legacy_first_detection_bug=t.LEGACY_ASSIGNMENT,
        mask_threshold=None
        if t.RETURN_FLOAT_MASK or t.SOFT_PSEUDO_MASKS
        else t.TEACHER_MASK_THRESHOLD,
        refinement=mask_refinement(cfg),
    )


def mask_refinement(cfg: CfgNode) -> MaskRefinement | None:
    """The guided-filter refinement of pseudo masks (``MODEL.BOX_TEACHER.REFINE_*``), None when
    off."""
    t = cfg.MODEL.BOX_TEACHER
    if t.REFINE_RADIUS < 0 or t.REFINE_EPS <= 0:
        raise ValueError(
            f"MODEL.BOX_TEACHER.REFINE_RADIUS must be >= 0 (0: off) and REFINE_EPS > 0, "
            f"got {t.REFINE_RADIUS} and {t.REFINE_EPS}."
        )
    return MaskRefinement(t.REFINE_RADIUS, t.REFINE_EPS) if t.REFINE_RADIUS > 0 else None
