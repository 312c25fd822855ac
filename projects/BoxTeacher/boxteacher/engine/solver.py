"""Optimizer, gradient clipping and learning-rate schedule from the ``SOLVER.*`` config keys."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from fvcore.common.config import CfgNode
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from torch import nn

__all__ = [
    "NORM_MODULE_TYPES",
    "get_default_optimizer_params",
    "build_optimizer",
    "build_grad_clipper",
    "build_lr_multiplier",
    "build_lr_scheduler",
    "LRMultiplier",
]

logger = logging.getLogger(__name__)

NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)

GradClipper = Callable[[Iterable[nn.Parameter]], None]

_CLIP_TYPES = ("value", "norm", "full_model")
_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR")
_WARMUP_METHODS = ("linear", "constant")


def get_default_optimizer_params(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    bias_lr_factor: float = 1.0,
    backbone_multiplier: float = 1.0,
) -> list[dict[str, Any]]:
    """Parameter groups in detectron2's manner.

    Only parameters with ``requires_grad``, each once (shared parameters are seen first through
    the first module that holds them). Parameters of normalisation modules get
    ``weight_decay_norm``; parameters named ``bias`` get ``base_lr * bias_lr_factor`` (a norm
    bias gets both); parameters whose full name contains "backbone" have their LR multiplied by
    ``backbone_multiplier`` (BoxTeacher's SOLVER.BACKBONE_MULTIPLIER). Parameters with equal
    hyper-parameters share one group, in model order.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_MODULE_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr = base_lr * bias_lr_factor if name == "bias" else base_lr
            if "backbone" in f"{module_name}.{name}":
                lr *= backbone_multiplier
            decay = weight_decay_norm if is_norm else weight_decay
            groups.setdefault((lr, decay), []).append(param)
    return [
        {"params": params, "lr": lr, "weight_decay": decay}
        for (lr, decay), params in groups.items()
    ]


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (``SOLVER.OPTIMIZER`` "SGD") or AdamW ("ADAMW") over
    ``get_default_optimizer_params`` (``SOLVER.*`` keys)."""
    solver = cfg.SOLVER
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        bias_lr_factor=solver.BIAS_LR_FACTOR,
        backbone_multiplier=solver.BACKBONE_MULTIPLIER,
    )
    if not params:
        raise ValueError("The model has no trainable parameter (requires_grad) to optimise.")
    if solver.OPTIMIZER == "SGD":
        return torch.optim.SGD(
            params,
            lr=solver.BASE_LR,
            momentum=solver.MOMENTUM,
            nesterov=solver.NESTEROV,
            weight_decay=solver.WEIGHT_DECAY,
        )
    if solver.OPTIMIZER == "ADAMW":
        return torch.optim.AdamW(params, lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY)
    raise ValueError(f"Unknown SOLVER.OPTIMIZER '{solver.OPTIMIZER}'; expected 'SGD' or 'ADAMW'.")


def build_grad_clipper(cfg: CfgNode) -> GradClipper | None:
    """The gradient clipping of ``SOLVER.CLIP_GRADIENTS``, or ``None`` when disabled.

    The returned function takes the trainable parameters and clips their gradients in place:
    "value" clamps each element to ``[-CLIP_VALUE, CLIP_VALUE]``; "norm" rescales each
    parameter's gradient to a ``NORM_TYPE``-norm of at most ``CLIP_VALUE``; "full_model" does
    the same with one norm over all gradients together.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    clip_type, max_value, norm_type = clip.CLIP_TYPE, float(clip.CLIP_VALUE), float(clip.NORM_TYPE)
    if clip_type == "value":

        def clip_by_value(params: Iterable[nn.Parameter]) -> None:
            torch.nn.utils.clip_grad_value_(list(params), max_value)

        return clip_by_value
    if clip_type == "norm":

        def clip_each_norm(params: Iterable[nn.Parameter]) -> None:
            for param in params:
                if param.grad is not None:
                    torch.nn.utils.clip_grad_norm_(param, max_value, norm_type)

        return clip_each_norm
    if clip_type == "full_model":

        def clip_full_norm(params: Iterable[nn.Parameter]) -> None:
            torch.nn.utils.clip_grad_norm_(list(params), max_value, norm_type)

        return clip_full_norm
    raise ValueError(
        f"Unknown SOLVER.CLIP_GRADIENTS.CLIP_TYPE '{clip_type}'; "
        f"valid values: {', '.join(_CLIP_TYPES)}."
    )


def build_lr_multiplier(cfg: CfgNode) -> ParamScheduler:
    """The LR multiplier as a function of training progress ``where = iteration / MAX_ITER``."""
    solver = cfg.SOLVER
    max_iter = solver.MAX_ITER
    name = solver.LR_SCHEDULER_NAME
    if name == "WarmupMultiStepLR":
        steps = [s for s in solver.STEPS if s <= max_iter]
        if len(steps) != len(solver.STEPS):
            logger.warning(
                "SOLVER.STEPS contains values beyond SOLVER.MAX_ITER=%d; they are ignored: %s",
                max_iter,
                [s for s in solver.STEPS if s > max_iter],
            )
        steps = [s for s in steps if s < max_iter]  # a step at MAX_ITER changes nothing
        schedule: ParamScheduler = MultiStepParamScheduler(
            values=[solver.GAMMA**k for k in range(len(steps) + 1)],
            milestones=steps,
            num_updates=max_iter,
        )
    elif name == "WarmupCosineLR":
        schedule = CosineParamScheduler(1.0, 0.0)
    else:
        raise ValueError(
            f"Unknown SOLVER.LR_SCHEDULER_NAME '{name}'; valid values: {', '.join(_SCHEDULERS)}."
        )
    return _with_warmup(
        schedule, solver.WARMUP_FACTOR, solver.WARMUP_ITERS / max_iter, solver.WARMUP_METHOD
    )


def _with_warmup(
    schedule: ParamScheduler, factor: float, length: float, method: str
) -> ParamScheduler:
    """``schedule`` whose first ``length`` fraction is replaced by a warm-up.

    "linear" goes from ``factor`` times the value at the end of the warm-up to that value;
    "constant" stays at ``factor`` times it. After the warm-up, ``schedule`` continues at the
    global progress (not rescaled).
    """
    if method not in _WARMUP_METHODS:
        raise ValueError(
            f"Unknown SOLVER.WARMUP_METHOD '{method}'; valid values: {', '.join(_WARMUP_METHODS)}."
        )
    if length <= 0:
        return schedule
    length = min(length, 1.0)
    end_value = schedule(length)
    if method == "linear":
        warmup: ParamScheduler = LinearParamScheduler(end_value * factor, end_value)
    else:
        warmup = ConstantParamScheduler(end_value * factor)
    if length == 1.0:
        return warmup
    return CompositeParamScheduler(
        [warmup, schedule], lengths=[length, 1.0 - length], interval_scaling=["rescaled", "fixed"]
    )


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """Sets the LR of every param group to its base LR times ``multiplier(iter / max_iter)``.

    Stepped once per iteration (after the optimizer step). Its state dict holds only plain
    values (``base_lrs``, ``last_epoch``), so checkpoints stay loadable with
    ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        multiplier: ParamScheduler,
        max_iter: int,
        last_iter: int = -1,
    ) -> None:
        if not isinstance(multiplier, ParamScheduler):
            raise TypeError(f"multiplier must be a fvcore ParamScheduler; got {type(multiplier)}.")
        self._multiplier = multiplier
        self._max_iter = max_iter
        super().__init__(optimizer, last_epoch=last_iter)

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def get_lr(self) -> list[float]:
        factor = self._multiplier(min(self.last_epoch / self._max_iter, 1.0))
        return [base_lr * factor for base_lr in self.base_lrs]


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """The per-iteration LR scheduler of ``SOLVER.LR_SCHEDULER_NAME`` with its warm-up."""
    return LRMultiplier(optimizer, build_lr_multiplier(cfg), cfg.SOLVER.MAX_ITER)
