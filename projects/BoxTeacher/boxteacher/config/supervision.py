"""The kind of supervision a config asks for: ``MODEL.BOXINST.GT_MASKS`` and its fraction."""

from __future__ import annotations

from .architecture import ArchitectureSpec

GT_MASK_MODES = ("ignore", "present", "fraction")


def gt_mask_mode(cfg, spec: ArchitectureSpec) -> str:
    """``MODEL.BOXINST.GT_MASKS``, checked together with ``MODEL.BOXINST.GT_MASK_FRACTION`` and
    the architecture's ``spec``.

    Raises ValueError naming the key for an unknown mode, a fraction outside [0, 1], or a mode
    other than "ignore" for a mask-supervised architecture (it already uses every mask).
    """
    b = cfg.MODEL.BOXINST
    mode, fraction = b.GT_MASKS, b.GT_MASK_FRACTION
    if mode not in GT_MASK_MODES:
        raise ValueError(f"MODEL.BOXINST.GT_MASKS must be one of {GT_MASK_MODES}, not {mode!r}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"MODEL.BOXINST.GT_MASK_FRACTION must be in [0, 1], not {fraction!r}.")
    if mode != "ignore" and not spec.box_supervised:
        raise ValueError(
            f"MODEL.BOXINST.GT_MASKS {mode!r} mixes masks into box supervision; it needs a "
            "box-supervised architecture (MODEL.BOXINST.ENABLED True, or BoxTeacher); a "
            "mask-supervised one (CondInst) already uses every mask."
        )
    return mode
