"""The training loop: ``TrainerBase`` (loop + hooks) and ``SimpleTrainer`` (one SGD step).

The loop is four visible steps inside an ``EventStorage``::

    before_train()
    for iter in range(start_iter, max_iter):
        before_step(); run_step(); after_step()
    after_train()

Everything else (LR schedule, checkpoints, evaluation, EMA, writers) is a hook.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.profiler import record_function

from ..utils import comm
from ..utils.comm import unwrap_model
from .events import EventStorage

__all__ = ["HookBase", "NonFiniteLossError", "TrainerBase", "SimpleTrainer", "unwrap_model"]

logger = logging.getLogger(__name__)

GradClipper = Callable[[Iterable[nn.Parameter]], None]


class HookBase:
    """A hook of the training loop. ``self.trainer`` is a weak proxy of the trainer.

    A hook with state to checkpoint overrides ``state_dict`` / ``load_state_dict`` and is
    given to the ``Checkpointer`` as a checkpointable.
    """

    trainer: "TrainerBase"

    def before_train(self) -> None:
        """Called once before the first iteration."""

    def after_train(self) -> None:
        """Called once after the last iteration, or after training stopped with an error."""

    def before_step(self) -> None:
        """Called before every iteration."""

    def after_step(self) -> None:
        """Called after every iteration."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class TrainerBase:
    """Runs hooks around ``run_step`` for iterations ``[start_iter, max_iter)``.

    Attributes:
        iter: the current iteration; ``max_iter`` after a complete training.
        start_iter, max_iter: the range of the last call to ``train``.
        storage: the ``EventStorage`` of the running training.
        data_seed: seed of the training data (saved in checkpoints; ``None`` if unused).
    """

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.storage: EventStorage
        self.data_seed: int | None = None

    def register_hooks(self, hooks: Sequence[HookBase | None]) -> None:
        """Append hooks (``None`` entries are skipped); they run in the order given."""
        for hook in hooks:
            if hook is None:
                continue
            # A weak proxy avoids a reference cycle trainer <-> hook.
            hook.trainer = weakref.proxy(self)
            self._hooks.append(hook)

    @property
    def hooks(self) -> list[HookBase]:
        return list(self._hooks)

    def train(self, start_iter: int, max_iter: int) -> None:
        """Run iterations ``start_iter .. max_iter - 1``."""
        logger.info("Starting training from iteration %d", start_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        with EventStorage(start_iter) as self.storage:
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                # After a complete training, iter == max_iter (after_train relies on it), also
                # for a run resumed from the checkpoint of the last iteration (no step to run).
                self.iter = max(start_iter, max_iter)
            except FloatingPointError as error:
                # A non-finite loss or weights: one line here; the traceback is printed once, by
                # whoever catches the exception (Python at the top of train_net.py).
                logger.error("Training stopped: %s", error)
                raise
            except Exception:
                logger.exception("Exception during training:")
                raise
            finally:
                self.after_train()

    def before_train(self) -> None:
        for hook in self._hooks:
            hook.before_train()

    def after_train(self) -> None:
        self.storage.iter = self.iter
        for hook in self._hooks:
            hook.after_train()

    def before_step(self) -> None:
        self.storage.iter = self.iter
        for hook in self._hooks:
            hook.before_step()

    def after_step(self) -> None:
        for hook in self._hooks:
            hook.after_step()

    def run_step(self) -> None:
        raise NotImplementedError


class SimpleTrainer(TrainerBase):
    """One optimisation step per iteration: data, forward, sum of losses, backward, step.

    The model's training forward returns ``dict[str, Tensor]`` of 0-dim tensors: keys starting
    with "loss" are summed into the total loss; other keys are metrics that are only logged.

    Args:
        model: the model, possibly wrapped in ``DistributedDataParallel``.
        data_loader: an iterable of per-process batches. It may be ``None`` at construction
            and assigned later (``trainer.data_loader = ...``) before ``train``: the data of
            a resumed run depends on the data seed read from the checkpoint.
        optimizer: the optimizer.
        grad_clipper: called with the trainable parameters after backward (see
            ``solver.build_grad_clipper``).
        amp_dtype: mixed precision: the forward pass runs under ``torch.autocast`` with this
            dtype on the model's device (the model keeps what needs float32 in float32);
            ``torch.float16`` also scales the loss (``GradScaler``). None: float32.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable[Any] | None,
        optimizer: torch.optim.Optimizer,
        *,
        grad_clipper: GradClipper | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        model.train()
        self.model = model
        self.optimizer = optimizer
        self.grad_clipper = grad_clipper
        self.data_loader = data_loader
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.device = self._params[0].device if self._params else torch.device("cpu")
        self.amp_dtype = amp_dtype
        self.grad_scaler = (
            torch.amp.GradScaler(self.device.type) if amp_dtype == torch.float16 else None
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of the forward pass (nothing without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def data_loader(self) -> Iterable[Any] | None:
        return self._data_loader

    @data_loader.setter
    def data_loader(self, data_loader: Iterable[Any] | None) -> None:
        self._data_loader = data_loader
        self._data_iter: Iterator[Any] | None = None

    def checkpointables(self) -> dict[str, Any]:
        """Objects owned by the trainer that a ``Checkpointer`` must save and restore."""
        objects: dict[str, Any] = {"optimizer": self.optimizer}
        if self.grad_scaler is not None:
            objects["grad_scaler"] = self.grad_scaler
        return objects

    def _next_batch(self) -> Any:
        if self._data_iter is None:
            if self._data_loader is None:
                raise RuntimeError("SimpleTrainer.data_loader must be set before training.")
            self._data_iter = iter(self._data_loader)
        return next(self._data_iter)

    def run_step(self) -> None:
        start = time.perf_counter()
        with record_function("data"):
            data = self._next_batch()
        data_time = time.perf_counter() - start

        with record_function("forward"), self.autocast():
            loss_dict = self.model(data, iteration=self.iter)
        losses = _total_loss(loss_dict)
        values = _to_floats(loss_dict)
        _check_finite(values, self.iter)

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is None:
            with record_function("backward"):
                losses.backward()
            with record_function("optimizer"):
                if self.grad_clipper is not None:
                    self.grad_clipper(self._params)
                self.optimizer.step()
        else:
            with record_function("backward"):
                self.grad_scaler.scale(losses).backward()
            with record_function("optimizer"):
                if self.grad_clipper is not None:
                    self.grad_scaler.unscale_(self.optimizer)
                    self.grad_clipper(self._params)
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()

        self._write_metrics(values, data_time)

    def _write_metrics(self, values: dict[str, float], data_time: float) -> None:
        """Average the metrics over processes and put them into the storage (main process)."""
        gathered = comm.gather({**values, "data_time": data_time})
        if not comm.is_main_process():
            return
        averaged = _mean_over_processes(gathered)
        # The slowest process sets the pace.
        averaged["data_time"] = max(m["data_time"] for m in gathered)
        total = sum(v for k, v in averaged.items() if k.startswith("loss"))
        self.storage.put_scalars(total_loss=total, **averaged)


def _total_loss(loss_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not isinstance(loss_dict, Mapping):
        raise TypeError(f"The model's training forward must return a dict; got {type(loss_dict)}.")
    for name, value in loss_dict.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(
                f"'{name}' in the model's loss dict must be a 0-dim tensor; got {value!r}."
            )
    losses = [v for k, v in loss_dict.items() if k.startswith("loss")]
    if not losses:
        raise ValueError(f"The model's loss dict has no 'loss*' key: {sorted(loss_dict)}.")
    return sum(v.reshape(()) for v in losses)


def _to_floats(loss_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """All values as python floats, with a single device-to-host copy (values that are on
    another device, e.g. metrics made on the host, join the first value's device)."""
    device = next(iter(loss_dict.values())).device
    stacked = torch.stack([v.detach().float().reshape(()).to(device) for v in loss_dict.values()])
    return dict(zip(loss_dict.keys(), stacked.cpu().tolist()))


class NonFiniteLossError(FloatingPointError):
    """A loss of the model is NaN or infinite.

    It is raised before the backward pass, so the diverging step changes no weight, and no
    checkpoint is written when training stops on it (``PeriodicCheckpointer`` writes the final
    checkpoints only after a complete training): the last checkpoint on disk holds weights from
    before the diverging step.
    """


def _check_finite(values: Mapping[str, float], iteration: int) -> None:
    """Raise ``NonFiniteLossError`` (one line: the iteration and every value) if a loss is not
    finite."""
    if not all(math.isfinite(v) for k, v in values.items() if k.startswith("loss")):
        listed = ", ".join(f"{name}={value:.6g}" for name, value in values.items())
        raise NonFiniteLossError(f"non-finite loss at iteration {iteration}: {listed}")


def _mean_over_processes(gathered: list[dict[str, float]]) -> dict[str, float]:
    names = dict.fromkeys(k for metrics in gathered for k in metrics if k != "data_time")
    means = {}
    for name in names:
        per_process = [m[name] for m in gathered if name in m]
        means[name] = sum(per_process) / len(per_process)
    return means
