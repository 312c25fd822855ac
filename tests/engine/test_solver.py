"""Optimizer param groups, gradient clipping and LR schedules (``boxteacher.engine.solver``)."""

import logging

import pytest
import torch
from torch import nn

from boxteacher.config import get_cfg
from boxteacher.engine.solver import (
    build_grad_clipper,
    build_lr_multiplier,
    build_lr_scheduler,
    build_optimizer,
)


def _schedule_cfg(**solver):
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    cfg.SOLVER.WARMUP_ITERS = 1000
    cfg.SOLVER.STEPS = (60000, 80000)
    cfg.SOLVER.MAX_ITER = 90000
    for key, value in solver.items():
        cfg.SOLVER[key] = value
    return cfg


def _optimizer(lr=0.01):
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)


@pytest.mark.parametrize(
    "iteration, expected",
    [
        (0, 1e-5),
        (999, 0.00999),
        (1000, 0.01),
        (30000, 0.01),
        (59999, 0.01),
        (60000, 0.001),
        (79999, 0.001),
        (80000, 0.0001),
        (89999, 0.0001),
    ],
)
def test_warmup_multistep_oracles(iteration, expected):
    cfg = _schedule_cfg()
    optimizer = _optimizer()
    scheduler = build_lr_scheduler(cfg, optimizer)
    # Jump to the iteration the way a resume does, then take the step that sets the LR.
    scheduler.load_state_dict({"base_lrs": [0.01], "last_epoch": iteration - 1})
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-6, rel=1e-6)


def test_scheduler_steps_match_multiplier_and_ignore_late_steps(caplog):
    cfg = _schedule_cfg(MAX_ITER=100, WARMUP_ITERS=10, STEPS=(60, 80, 150), WARMUP_FACTOR=0.1)
    optimizer = _optimizer()
    with caplog.at_level(logging.WARNING, logger="boxteacher.engine.solver"):
        scheduler = build_lr_scheduler(cfg, optimizer)
    assert "150" in caplog.text
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [
        0.01 * (0.1 + 0.9 * t / 10) if t < 10 else 0.01 * 0.1 ** ((t >= 60) + (t >= 80))
        for t in range(100)
    ]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_cosine_and_constant_warmup():
    cfg = _schedule_cfg(
        LR_SCHEDULER_NAME="WarmupCosineLR",
        MAX_ITER=1000,
        WARMUP_ITERS=100,
        WARMUP_METHOD="constant",
        STEPS=(),
    )
    multiplier = build_lr_multiplier(cfg)
    assert multiplier(0.05) == pytest.approx(0.001 * multiplier(0.1))  # constant warm-up
    assert multiplier(0.5) == pytest.approx(0.5)
    assert multiplier(0.999) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(
    "key, value",
    [("LR_SCHEDULER_NAME", "StepLR"), ("WARMUP_METHOD", "exponential")],
)
def test_unknown_schedule_names(key, value):
    cfg = _schedule_cfg(**{key: value})
    with pytest.raises(ValueError, match=f"SOLVER.{key} '{value}'.*valid values"):
        build_lr_multiplier(cfg)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4, affine=True)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 2, bias=False)
        self.tied = nn.Linear(4, 2, bias=False)
        self.tied.weight = self.head.weight  # shared parameter


def test_param_groups():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.BIAS_LR_FACTOR = 2.0
    net = _Net()
    optimizer = build_optimizer(cfg, net)
    hyper = {
        id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]
    }
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(all_params) == len(hyper) == 7  # conv w/b, bn w/b, gn w/b, shared head weight
    assert id(net.frozen.weight) not in hyper and id(net.frozen.bias) not in hyper
    assert hyper[id(net.conv.weight)] == (0.1, 1e-4)
    assert hyper[id(net.conv.bias)] == (0.2, 1e-4)
    assert hyper[id(net.bn.weight)] == (0.1, 0.0)
    assert hyper[id(net.bn.bias)] == (0.2, 0.0)
    assert hyper[id(net.gn.weight)] == (0.1, 0.0)
    assert hyper[id(net.head.weight)] == (0.1, 1e-4)
    assert optimizer.defaults["momentum"] == 0.9 and not optimizer.defaults["nesterov"]


def _grads(*values):
    params = [nn.Parameter(torch.zeros(len(v))) for v in values]
    for param, value in zip(params, values):
        param.grad = torch.tensor(value)
    return params


def _clipper(clip_type, value=1.0):
    cfg = get_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = value
    return build_grad_clipper(cfg)


def test_clip_value():
    params = _grads([3.0, -0.5], [-4.0])
    _clipper("value")(params)
    assert params[0].grad.tolist() == [1.0, -0.5] and params[1].grad.tolist() == [-1.0]


def test_clip_norm_per_parameter():
    params = _grads([3.0, 4.0], [0.0, 10.0], [0.3, 0.4])
    _clipper("norm")(params)
    assert params[0].grad.tolist() == pytest.approx([0.6, 0.8])
    assert params[1].grad.tolist() == pytest.approx([0.0, 1.0])
    assert params[2].grad.tolist() == pytest.approx([0.3, 0.4])  # below the limit


def test_clip_full_model():
    params = _grads([3.0, 4.0], [0.0, 0.0, 5.0 * 3**0.5, 5.0])  # norms 5 and 10: total sqrt(125)
    _clipper("full_model", value=2.0)(params)
    total = torch.cat([p.grad for p in params]).norm()
    assert total.item() == pytest.approx(2.0, rel=1e-5)
    assert params[1].grad.norm() / params[0].grad.norm() == pytest.approx(2.0, rel=1e-5)


def test_clip_disabled_and_unknown():
    assert build_grad_clipper(get_cfg()) is None
    with pytest.raises(ValueError, match="CLIP_TYPE 'max'.*valid values"):
        _clipper("max")
