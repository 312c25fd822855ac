"""The kind of supervision a config asks for: ``MODEL.BOXINST.GT_MASKS`` and its fraction."""
from __future__ import annotations

GT_MASK_MODES = ("ignore", "present", "fraction")


def is_box_supervised(cfg) -> bool:
    """BoxInst (``MODEL.BOXINST.ENABLED``) or BoxTeacher: trained from boxes."""
    return bool(cfg.MODEL.BOXINST.ENABLED) or cfg.MODEL.META_ARCHITECTURE == "BoxTeacher"


def gt_mask_mode(cfg) -> str:
    """``MODEL.BOXINST.GT_MASKS``, checked together with ``MODEL.BOXINST.GT_MASK_FRACTION``.

    Raises ValueError naming the key for an unknown mode, a fraction outside [0, 1], or a mode
    other than "ignore" for a mask-supervised model (CondInst already uses every mask).
    """
    b = cfg.MODEL.BOXINST
    mode, fraction = b.GT_MASKS, b.GT_MASK_FRACTION
    if mode not in GT_MASK_MODES:
        raise ValueError(f"MODEL.BOXINST.GT_MASKS must be one of {GT_MASK_MODES}, not {mode!r}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"MODEL.BOXINST.GT_MASK_FRACTION must be in [0, 1], not {fraction!r}.")
    if mode != "ignore" and not is_box_supervised(cfg):
        raise ValueError(
            f"MODEL.BOXINST.GT_MASKS {mode!r} mixes masks into box supervision; it needs "
            "MODEL.BOXINST.ENABLED True or MODEL.META_ARCHITECTURE BoxTeacher (CondInst uses every mask)."
        )
    return mode
