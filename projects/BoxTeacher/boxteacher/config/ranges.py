"""The allowed values of the numeric config keys, checked when a config is loaded.

``RANGES`` maps every numeric key of ``defaults.py`` whose range is known without building the
model to a ``Range``; ``CHECKED_ELSEWHERE`` names the numeric keys left to other code, with the
reason (a test checks that every numeric default key is in one of the two). A list-valued key's
range applies to each element. Values with a special meaning outside the range (``-1``: off) are
listed in ``special`` and stay allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

Number = float


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers, plus special values, plus conditions on list values.

    Attributes:
        low, high: the bounds (None: unbounded on that side).
        low_open, high_open: the bound itself is excluded.
        special: values allowed outside the interval, with their meaning, e.g. ``((-1, "off"),)``.
        increasing: a list value must be strictly increasing.
        length: a list value must have exactly this many elements.
        non_empty: a list value must have at least one element.
        infinite: an infinite float is allowed (NaN never is).
    """

    low: Number | None = None
    high: Number | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple[tuple[Number, str], ...] = ()
    increasing: bool = False
    length: int | None = None
    non_empty: bool = False
    infinite: bool = False

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is a number in the interval or one of the special values."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if any(value == v for v, _ in self.special):
            return True
        if isinstance(value, float) and (
            math.isnan(value) or (math.isinf(value) and not self.infinite)
        ):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (
            value > self.high or (self.high_open and value == self.high)
        )

    def describe(self) -> str:
        """The interval in words: ">= 1", "in [0, 1]", "> 0, or -1 (off)"."""
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {opening}{self.low:g}, {self.high:g}{closing}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "any number"
        return text + "".join(f", or {v:g} ({meaning})" for v, meaning in self.special)


def at_least(low: Number, **kwargs: Any) -> Range:
    """The numbers >= ``low``."""
    return Range(low=low, **kwargs)


def above(low: Number, **kwargs: Any) -> Range:
    """The numbers > ``low``."""
    return Range(low=low, low_open=True, **kwargs)


def unit(**kwargs: Any) -> Range:
    """The closed interval [0, 1]: probabilities, thresholds on scores, IoUs and fractions."""
    return Range(low=0.0, high=1.0, **kwargs)


OFF = ((-1, "off"),)

RANGES: dict[str, Range] = {
    # Model
    "MODEL.PIXEL_MEAN": Range(length=3),
    "MODEL.PIXEL_STD": above(0, length=3),
    "MODEL.BACKBONE.FREEZE_AT": Range(low=0, high=5),  # 1 = stem, 2..5 = up to res2..res5
    "MODEL.RESNETS.NUM_GROUPS": at_least(1),
    "MODEL.RESNETS.WIDTH_PER_GROUP": at_least(1),
    "MODEL.RESNETS.STEM_OUT_CHANNELS": at_least(1),
    "MODEL.RESNETS.RES2_OUT_CHANNELS": at_least(1),
    "MODEL.RESNETS.DEFORM_NUM_GROUPS": at_least(1),
    "MODEL.FPN.OUT_CHANNELS": at_least(1),
    # FCOS
    "MODEL.FCOS.NUM_CLASSES": at_least(1),
    "MODEL.FCOS.FPN_STRIDES": at_least(1, increasing=True, non_empty=True),
    "MODEL.FCOS.PRIOR_PROB": Range(
        low=0.0, high=1.0, low_open=True, high_open=True
    ),  # log(p / (1 - p))
    "MODEL.FCOS.INFERENCE_TH_TEST": unit(),
    "MODEL.FCOS.PRE_NMS_TOPK_TEST": at_least(1),
    "MODEL.FCOS.NMS_TH": unit(),
    "MODEL.FCOS.POST_NMS_TOPK_TEST": at_least(1),
    "MODEL.FCOS.LOSS_ALPHA": Range(
        high=1.0
    ),  # torchvision's sigmoid_focal_loss: negative = no alpha
    "MODEL.FCOS.LOSS_GAMMA": at_least(0),
    "MODEL.FCOS.SIZES_OF_INTEREST": above(0, increasing=True),
    "MODEL.FCOS.NUM_CLS_CONVS": at_least(0),
    "MODEL.FCOS.NUM_BOX_CONVS": at_least(0),
    "MODEL.FCOS.POS_RADIUS": above(0),
    # CondInst
    "MODEL.CONDINST.MASK_OUT_STRIDE": at_least(1),
    "MODEL.CONDINST.MAX_PROPOSALS": at_least(0, special=OFF),
    "MODEL.CONDINST.TOPK_PROPOSALS_PER_IM": at_least(0, special=OFF),
    "MODEL.CONDINST.MASK_THRESHOLD": unit(),
    "MODEL.CONDINST.MASK_HEAD.CHANNELS": at_least(1),
    "MODEL.CONDINST.MASK_HEAD.NUM_LAYERS": at_least(1),
    "MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS": at_least(1),
    "MODEL.CONDINST.MASK_BRANCH.CHANNELS": at_least(1),
    "MODEL.CONDINST.MASK_BRANCH.NUM_CONVS": at_least(0),
    # BoxInst
    "MODEL.BOXINST.BOTTOM_PIXELS_REMOVED": at_least(0),
    "MODEL.BOXINST.PAIRWISE.SIZE": at_least(1),  # oddness is checked by neighbour_offsets
    "MODEL.BOXINST.PAIRWISE.DILATION": at_least(1),
    "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS": at_least(0),  # 0: no warm-up
    "MODEL.BOXINST.PAIRWISE.COLOR_THRESH": unit(),  # LAB similarity exp(-d / 2) is in (0, 1]
    # BoxTeacher
    "MODEL.BOX_TEACHER.IOU_THR": unit(),
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": at_least(1),
    "MODEL.RPN.POST_NMS_TOPK_TEST": at_least(1),
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": at_least(1),
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": unit(),
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": unit(),
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": unit(),
    "MODEL.ROI_BOX_HEAD.FC_DIM": at_least(1),
    "MODEL.ROI_MASK_HEAD.CONV_DIM": at_least(1),
    "TEST.DETECTIONS_PER_IMAGE": at_least(1),
    "MODEL.BOX_TEACHER.SCORE_THR": unit(),
    "MODEL.BOX_TEACHER.MOMENTUM": unit(),
    "MODEL.BOX_TEACHER.EMA_HORIZON": at_least(0),  # 0: off
    "MODEL.BOX_TEACHER.MASK_WEIGHT": at_least(0),
    "MODEL.BOX_TEACHER.MASK_AFFINITY_WEIGHT": at_least(0),
    "MODEL.BOX_TEACHER.MASK_AFFINITY_THRESH": unit(special=((-1, "soft weights"),)),
    "MODEL.BOX_TEACHER.WARMUP_ITERS": at_least(0),  # 0: no warm-up
    "MODEL.BOX_TEACHER.AVG_LOSS_WEIGHT": at_least(0),
    "MODEL.BOX_TEACHER.TEACHER_MASK_THRESHOLD": unit(),
    # Input and data
    "INPUT.MIN_SIZE_TRAIN": at_least(1, non_empty=True),
    "INPUT.MAX_SIZE_TRAIN": at_least(1),
    "INPUT.MIN_SIZE_TEST": at_least(1),
    "INPUT.MAX_SIZE_TEST": at_least(1),
    "DATALOADER.NUM_WORKERS": at_least(0),  # 0: load in the main process
    "DATALOADER.UNLABELED_RATIO": above(0),
    "MODEL.SEMI.SCORE_HIGH": unit(),
    "MODEL.SEMI.SCORE_LOW": unit(),
    "MODEL.SEMI.MIN_MASK_AREA": at_least(0),
    "MODEL.SEMI.UNLABELED_WEIGHT": at_least(0),
    "MODEL.SEMI.BURN_IN_ITERS": at_least(0),
    # Solver
    "SOLVER.BACKBONE_MULTIPLIER": at_least(0),
    "SOLVER.MAX_ITER": at_least(1),
    "SOLVER.BASE_LR": above(0),
    "SOLVER.MOMENTUM": Range(low=0.0, high=1.0, high_open=True),
    "SOLVER.WEIGHT_DECAY": at_least(0),
    "SOLVER.WEIGHT_DECAY_NORM": at_least(0),
    "SOLVER.BIAS_LR_FACTOR": at_least(0),
    "SOLVER.GAMMA": above(0),
    # Steps beyond MAX_ITER are allowed (ignored with a warning by the scheduler).
    "SOLVER.STEPS": at_least(1, increasing=True),
    "SOLVER.WARMUP_FACTOR": unit(),
    "SOLVER.WARMUP_ITERS": at_least(0),  # 0: no warm-up
    "SOLVER.CHECKPOINT_PERIOD": at_least(1),  # fvcore's PeriodicCheckpointer has no "off"
    "SOLVER.IMS_PER_BATCH": at_least(1),
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": above(0),
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": above(0, infinite=True),  # inf: the max-norm
    # Test and misc
    "TEST.EVAL_PERIOD": at_least(0),  # 0: only after training
    "VIS_PERIOD": at_least(0),  # 0: never
}

# Numeric keys without an entry in RANGES, and why.
CHECKED_ELSEWHERE: dict[str, str] = {
    "MODEL.RESNETS.DEPTH": "one of 18, 34, 50, 101: checked by the ResNet builder",
    "MODEL.FCOS.TOP_LEVELS": "0 or 2: checked by the FPN builder",
    "MODEL.BOXINST.GT_MASK_FRACTION": "[0, 1]: checked with GT_MASKS in config/supervision.py",
    "MODEL.BOX_TEACHER.REFINE_RADIUS": ">= 0: checked in build.py with REFINE_EPS",
    "MODEL.BOX_TEACHER.REFINE_EPS": "> 0: checked in build.py with REFINE_RADIUS",
    "MODEL.MASK_RCNN.VERSION": "1 or 2: checked by the Mask R-CNN builder",
    "SEED": "any integer: negative means drawn at random",
}


def range_errors(cfg: Any) -> list[str]:
    """One message per key of ``RANGES`` whose value in ``cfg`` is outside its range."""
    errors = []
    for key, allowed in RANGES.items():
        problem = _value_problem(_lookup(cfg, key), allowed)
        if problem:
            errors.append(f"{key} {problem}")
    return errors


def _lookup(cfg: Any, key: str) -> Any:
    """The value of the dotted ``key`` in ``cfg``."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _value_problem(value: Any, allowed: Range) -> str | None:
    """What is wrong with ``value`` (a number or a list of numbers), or None."""
    if not isinstance(value, (list, tuple)):
        return None if allowed.allows(value) else f"must be {allowed.describe()}, got {value!r}."
    values = list(value)
    if allowed.length is not None and len(values) != allowed.length:
        return f"must have {allowed.length} values, got {len(values)}: {values}."
    if allowed.non_empty and not values:
        return "must not be empty."
    bad = [v for v in values if not allowed.allows(v)]
    if bad:
        return f"must hold values {allowed.describe()}, got {values} (bad: {bad})."
    if allowed.increasing and not _strictly_increasing(values):
        return f"must be strictly increasing, got {values}."
    return None


def _strictly_increasing(values: Iterable[Number]) -> bool:
    """Whether each value is larger than the one before."""
    values = list(values)
    return all(a < b for a, b in zip(values, values[1:]))
