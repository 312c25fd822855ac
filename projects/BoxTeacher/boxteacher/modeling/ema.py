"""Exponential moving average of a network's parameters (BoxTeacher's teacher)."""

from __future__ import annotations

import torch
from torch import nn


def ema_momentum(step: int, max_momentum: float) -> float:
    """min(max_momentum, step / (step + 1)): 0 at step 0, 0.5 at step 1, ... so that early on
    the average follows the student closely."""
    return min(max_momentum, step / (step + 1.0))


def teacher_momentum(step: int, max_momentum: float, burn_in: int = 0) -> float:
    """The EMA momentum before iteration ``step``. Without a burn-in, ``ema_momentum``. With one
    (a pre-trained teacher, Guided Distillation's schedule): 1 before ``burn_in`` (the teacher
    stays as loaded while a fresh student learns from it), 0 at ``burn_in`` (the student is
    copied into the teacher), then ``ema_momentum`` counted from there."""
    if step < burn_in:
        return 1.0
    return ema_momentum(step - burn_in, max_momentum)


def momentum_for_horizon(horizon: int) -> float:
    """The momentum whose average has a time constant of ``horizon`` updates (1 - 1/horizon);
    BoxTeacher's 0.999 is a horizon of 1000 iterations."""
    return 1.0 - 1.0 / max(horizon, 1)


def _check_same_layout(teacher: nn.Module, student: nn.Module) -> None:
    t, s = teacher.state_dict(), student.state_dict()
    if list(t) != list(s) or any(t[k].shape != s[k].shape for k in t):
        raise ValueError("The teacher and the student must have the same parameters and buffers.")


@torch.no_grad()
def copy_student_to_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher := student, parameters and buffers."""
    _check_same_layout(teacher, student)
    teacher.load_state_dict(student.state_dict())


def norm_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The running mean and variance of every BatchNorm / SyncBatchNorm layer, in module order."""
    return [
        buffer
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        for buffer in (m.running_mean, m.running_var)
    ]


@torch.no_grad()
def ema_update(
    teacher: nn.Module, student: nn.Module, momentum: float, norm_stats: bool = False
) -> None:
    """teacher_param := momentum * teacher_param + (1 - momentum) * student_param.

    BoxTeacher averages the parameters only: frozen BN statistics are constant, and a teacher
    run in train mode keeps its BN running statistics up to date itself. A teacher run in eval
    mode never updates them, so ``norm_stats`` averages the running statistics of its BatchNorm
    layers too (without it they would stay those of the iteration-0 copy).
    """
    teacher_tensors = list(teacher.parameters())
    student_tensors = list(student.parameters())
    if norm_stats:
        teacher_tensors += norm_statistics(teacher)
        student_tensors += norm_statistics(student)
    if len(teacher_tensors) != len(student_tensors):
        raise ValueError("The teacher and the student must have the same parameters.")
    torch._foreach_mul_(teacher_tensors, momentum)
    torch._foreach_add_(teacher_tensors, student_tensors, alpha=1.0 - momentum)


@torch.no_grad()
def mean_parameter_distance(teacher: nn.Module, student: nn.Module) -> float:
    """Mean over parameter tensors of the L2 distance between teacher and student (buffers such
    as BatchNorm statistics, which each network keeps for itself in train mode, are left out)."""
    pairs = list(zip(teacher.parameters(), student.parameters()))
    if not pairs:
        return 0.0
    norms = torch._foreach_norm([t.detach() - s.detach() for t, s in pairs])
    return float(torch.stack(norms).mean())
