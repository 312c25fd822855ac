"""Exponential moving average of a network's parameters (BoxTeacher's teacher)."""
from __future__ import annotations

import torch
from torch import nn


def ema_momentum(step: int, max_momentum: float) -> float:
    """min(max_momentum, step / (step + 1)): 0 at step 0, 0.5 at step 1, ... so that early on
    the average follows the student closely."""
    return min(max_momentum, step / (step + 1.0))


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


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher_param := momentum * teacher_param + (1 - momentum) * student_param, for the
    parameters only (BoxTeacher leaves buffers alone: frozen BN statistics are constant and the
    teacher's mask-branch BN keeps its own running statistics)."""
    teacher_params = [p for p in teacher.parameters()]
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise ValueError("The teacher and the student must have the same parameters.")
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


@torch.no_grad()
def mean_parameter_distance(teacher: nn.Module, student: nn.Module) -> float:
    """Mean over state tensors of the L2 distance between teacher and student."""
    t, s = teacher.state_dict(), student.state_dict()
    floats = [k for k in t if t[k].is_floating_point()]
    if not floats:
        return 0.0
    norms = torch._foreach_norm([t[k] - s[k] for k in floats])
    return float(torch.stack(norms).mean())
