"""Hooks of the training loop. Order used by the trainer: ``IterationTimer``, ``LRScheduler``,
``PeriodicCheckpointer``, ``EvalHook``, ``PeriodicWriter`` (writers last, so they see the
evaluation results of the same iteration)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from collections import Counter
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from fvcore.common.checkpoint import PeriodicCheckpointer as _FvcorePeriodicCheckpointer
from fvcore.common.timer import Timer
from torch.profiler import record_function

from ..evaluation.evaluator import flatten_results_dict
from ..modeling.ema import (
    copy_student_to_teacher,
    ema_update,
    mean_parameter_distance,
    teacher_momentum,
)
from ..utils import comm
from ..utils.env import get_rng_state, set_rng_state
from .checkpoint import Checkpointer
from .events import EventWriter
from .train_loop import HookBase, unwrap_model

__all__ = [
    "EMAHook",
    "IterationTimer",
    "LRScheduler",
    "PeriodicCheckpointer",
    "EvalHook",
    "PeriodicWriter",
]

logger = logging.getLogger(__name__)


class IterationTimer(HookBase):
    """Puts the duration of each step ("time") into the storage and logs the total at the end.

    Registered first, so the time of the ``after_step`` of the other hooks is not counted.
    """

    def __init__(self) -> None:
        self._step_timer = Timer()
        self._train_timer = Timer()  # runs only during steps: training time without hooks
        self._start = 0.0

    def before_train(self) -> None:
        self._start = time.perf_counter()
        self._train_timer.reset()
        self._train_timer.pause()

    def before_step(self) -> None:
        self._step_timer.reset()
        self._train_timer.resume()

    def after_step(self) -> None:
        self.trainer.storage.put_scalar("time", self._step_timer.seconds())
        self._train_timer.pause()

    def after_train(self) -> None:
        total = time.perf_counter() - self._start
        steps = self._train_timer.seconds()
        num_iter = self.trainer.iter - self.trainer.start_iter
        if num_iter > 0:
            logger.info(
                "Overall training speed: %d iterations in %s (%.4f s / it)",
                num_iter,
                _duration(steps),
                steps / num_iter,
            )
        logger.info(
            "Total training time: %s (%s on hooks)", _duration(total), _duration(total - steps)
        )


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class LRScheduler(HookBase):
    """Steps the LR scheduler after every iteration and logs "lr".

    The logged LR is that of the param group with the most parameters (the most common LR
    when all groups hold a single parameter). ``state_dict`` is the scheduler's, so the hook
    can be given to the ``Checkpointer`` in place of the scheduler.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> None:
        self._optimizer = optimizer
        self.scheduler = scheduler
        self._group = _main_param_group(optimizer)

    def after_step(self) -> None:
        lr = self._optimizer.param_groups[self._group]["lr"]
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(dict(state_dict))


def _main_param_group(optimizer: torch.optim.Optimizer) -> int:
    groups = optimizer.param_groups
    largest = max(len(g["params"]) for g in groups)
    if largest > 1:
        return next(i for i, g in enumerate(groups) if len(g["params"]) == largest)
    most_common_lr = Counter(g["lr"] for g in groups).most_common(1)[0][0]
    return next(i for i, g in enumerate(groups) if g["lr"] == most_common_lr)


class PeriodicCheckpointer(HookBase):
    """Saves ``model_{iter:07d}.pth`` every ``period`` iterations and ``model_final.pth`` after
    the last one, with the iteration and the trainer's ``data_seed``.

    The checkpoints of the last iteration (the periodic one if due, then ``model_final``) are
    written in ``after_train``, and only after a complete training: after the metrics of the
    last step were written, never after an exception (a non-finite loss included). A run
    resumed from the checkpoint of the last iteration (killed before ``model_final`` was
    written) has no step to run and writes ``model_final`` from the resumed state, which is
    the state an uninterrupted run saves.

    Runs on every process (the ``Checkpointer`` gathers the RNG states of all processes);
    only processes whose checkpointer has ``save_to_disk`` write files.

    Args:
        checkpointer: the ``Checkpointer`` of the model, optimizer, scheduler and RNG state.
        period: iterations between two checkpoints.
        max_iter: the last iteration + 1; ``None`` takes the trainer's.
        file_prefix: prefix of the file names.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        period: int,
        max_iter: int | None = None,
        file_prefix: str = "model",
    ) -> None:
        self._max_iter = max_iter
        self._file_prefix = file_prefix
        # Without max_iter fvcore writes only the periodic checkpoints; the final one is ours.
        self._periodic = _FvcorePeriodicCheckpointer(checkpointer, period, file_prefix=file_prefix)

    def _extra_state(self) -> dict[str, int]:
        return {} if self.trainer.data_seed is None else {"data_seed": int(self.trainer.data_seed)}

    def _last_iter(self) -> int:
        return (self.trainer.max_iter if self._max_iter is None else self._max_iter) - 1

    def after_step(self) -> None:
        if self.trainer.iter < self._last_iter():  # the last one is saved in after_train
            self._periodic.step(self.trainer.iter, **self._extra_state())

    def after_train(self) -> None:
        last = self._last_iter()
        if self.trainer.iter <= last:  # stopped early, by an exception or a shorter ``train``
            return
        if self.trainer.start_iter <= last:  # else resumed from the checkpoint of ``last``
            self._periodic.step(last, **self._extra_state())
        # iter - 1: the iteration of the model's state (beyond ``last`` if resumed from there).
        self._periodic.checkpointer.save(
            f"{self._file_prefix}_final", iteration=self.trainer.iter - 1, **self._extra_state()
        )


class EvalHook(HookBase):
    """Runs ``eval_function()`` every ``period`` iterations and after the last one.

    ``eval_function`` returns a nested dict of numbers (``{"segm": {"AP": 35.1}}``; an empty
    dict or ``None`` on processes other than the main one). It is flattened to
    ``"segm/AP"``-style names and put into the storage. The RNG states are restored after the
    evaluation, so evaluating does not change the random stream of training (a resumed run
    repeats an uninterrupted one exactly). ``eval_function`` is responsible for switching the
    model to eval mode and back.

    Args:
        period: iterations between evaluations; 0 evaluates only after the last iteration.
        eval_function: runs the evaluation on every process.
    """

    def __init__(self, period: int, eval_function: Callable[[], Mapping[str, Any] | None]) -> None:
        self._period = period
        self._func = eval_function

    def _do_eval(self) -> None:
        comm.synchronize()
        with _preserved_rng():
            results = self._func()
        comm.synchronize()
        if results:
            scalars = _check_scalars(flatten_results_dict(results))
            self.trainer.storage.put_scalars(smoothing_hint=False, **scalars)

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        is_last = next_iter == self.trainer.max_iter  # evaluated in after_train
        if self._period > 0 and next_iter % self._period == 0 and not is_last:
            self._do_eval()

    def after_train(self) -> None:
        # Only after a complete training (iter == max_iter), not after an exception.
        if self.trainer.iter >= self.trainer.max_iter:
            self._do_eval()


def _check_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    scalars = {}
    for name, value in results.items():
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"The evaluation must return a nested dict of numbers; got '{name}': {value!r}."
            ) from None
        if math.isfinite(number):
            scalars[name] = number
        else:  # undefined, e.g. the AP of a category without ground truth
            logger.debug("Evaluation metric %s is %s; not logged", name, number)
    return scalars


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class PeriodicWriter(HookBase):
    """Calls the writers every ``period`` iterations, after the last one, and at the end.

    Give it only to the main process (the storage of the others holds no metrics).
    """

    def __init__(self, writers: Sequence[EventWriter], period: int = 20) -> None:
        self._writers = list(writers)
        self._period = period

    def after_step(self) -> None:
        itr = self.trainer.iter
        if (itr + 1) % self._period == 0 or itr == self.trainer.max_iter - 1:
            for writer in self._writers:
                writer.write()

    def after_train(self) -> None:
        for writer in self._writers:
            writer.write()
            writer.close()


class EMAHook(HookBase):
    """Keeps a model's ``teacher`` the exponential moving average of its ``student``.

    Before training from iteration 0 the teacher becomes a copy of the student (after the
    pre-trained weights were loaded into the student); a resumed run keeps the teacher of its
    checkpoint. Before every iteration t the teacher's parameters are averaged with momentum
    min(max_momentum, t / (t + 1)); with ``norm_stats`` the BatchNorm running statistics too
    (for a teacher run in eval mode, see ``ema_update``). Logs ``ema_momentum`` every
    iteration and ``param_diff`` (mean L2 distance of teacher and student tensors) every
    ``log_period`` iterations.

    With ``burn_in_iters`` > 0 (a pre-trained teacher, see ``modeling.ema.teacher_momentum``)
    the teacher keeps its loaded weights until that iteration, is then replaced by the student
    and averaged from there on.
    """

    def __init__(
        self,
        max_momentum: float,
        log_period: int = 20,
        norm_stats: bool = False,
        burn_in_iters: int = 0,
    ) -> None:
        self._max_momentum = max_momentum
        self._log_period = log_period
        self._norm_stats = norm_stats
        self._burn_in = burn_in_iters

    def _networks(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        model = unwrap_model(self.trainer.model)
        return model.teacher, model.student

    def before_train(self) -> None:
        if self.trainer.start_iter < self._burn_in:
            logger.info(
                "Stage 2 (guided burn-in): the pre-trained teacher stays as loaded until "
                "iteration %d, then the student is copied into it and averaged.",
                self._burn_in,
            )
        elif self.trainer.start_iter == 0:
            copy_student_to_teacher(*self._networks())
            logger.info("The teacher starts as a copy of the student.")

    def before_step(self) -> None:
        teacher, student = self._networks()
        momentum = teacher_momentum(self.trainer.iter, self._max_momentum, self._burn_in)
        if self._burn_in and self.trainer.iter == self._burn_in:
            logger.info(
                "Stage 3, iteration %d: the student is copied into the teacher, which is its "
                "EMA from here.",
                self._burn_in,
            )
        if momentum < 1.0:
            with record_function("ema"):
                ema_update(teacher, student, momentum, self._norm_stats)
        storage = self.trainer.storage
        storage.put_scalar("ema_momentum", momentum, smoothing_hint=False)
        if (self.trainer.iter + 1) % self._log_period == 0:
            storage.put_scalar(
                "param_diff", mean_parameter_distance(teacher, student), smoothing_hint=False
            )
