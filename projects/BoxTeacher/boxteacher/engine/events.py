"""Event storage (scalars and images produced during training) and the writers that output it.

Engine code (trainer, hooks) reads the storage of the running training with
``get_event_storage()``; models never do: they return their metrics in the loss dict.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections import defaultdict
from typing import Any

import torch
from fvcore.common.history_buffer import HistoryBuffer

__all__ = [
    "EventStorage",
    "get_event_storage",
    "EventWriter",
    "CommonMetricPrinter",
    "JSONWriter",
    "TensorboardXWriter",
]

logger = logging.getLogger(__name__)

_CURRENT_STORAGE_STACK: list["EventStorage"] = []


def get_event_storage() -> "EventStorage":
    """The storage of the innermost ``with EventStorage(...)`` block."""
    if not _CURRENT_STORAGE_STACK:
        raise RuntimeError(
            "get_event_storage() has to be called inside a 'with EventStorage(...)' block."
        )
    return _CURRENT_STORAGE_STACK[-1]


class EventStorage:
    """Scalars (with their history) and images, each tagged with the iteration that produced it."""

    def __init__(self, start_iter: int = 0) -> None:
        self.iter = start_iter
        self._history: defaultdict[str, HistoryBuffer] = defaultdict(HistoryBuffer)
        self._smoothing_hints: dict[str, bool] = {}
        self._latest_scalars: dict[str, tuple[float, int]] = {}
        self._images: list[tuple[str, torch.Tensor, int]] = []

    def __enter__(self) -> "EventStorage":
        _CURRENT_STORAGE_STACK.append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        assert _CURRENT_STORAGE_STACK[-1] is self, "EventStorage blocks must be nested properly"
        _CURRENT_STORAGE_STACK.pop()

    def put_scalar(self, name: str, value: float, smoothing_hint: bool = True) -> None:
        """Record ``value`` for ``name`` at the current iteration.

        ``smoothing_hint``: whether writers should smooth it (median over a window) or write
        the raw latest value. It must stay the same for a given name.
        """
        value = float(value)
        self._history[name].update(value, self.iter)
        self._latest_scalars[name] = (value, self.iter)
        previous = self._smoothing_hints.setdefault(name, smoothing_hint)
        if previous != smoothing_hint:
            raise ValueError(f"Scalar '{name}' was put with different smoothing hints.")

    def put_scalars(self, *, smoothing_hint: bool = True, **scalars: float) -> None:
        """``put_scalar`` for each keyword argument."""
        for name, value in scalars.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint)

    def put_image(self, name: str, image: torch.Tensor) -> None:
        """Record an image for visualisation: CHW float in [0, 1], or HWC uint8.

        Stored as CHW float in [0, 1] on the CPU until a writer consumes it.
        """
        if image.ndim != 3:
            raise ValueError(
                f"Image '{name}' must have 3 dimensions; got shape {tuple(image.shape)}."
            )
        if image.dtype == torch.uint8:
            image = image.permute(2, 0, 1).float() / 255.0
        elif not image.is_floating_point():
            raise ValueError(f"Image '{name}' must be float CHW or uint8 HWC; got {image.dtype}.")
        self._images.append((name, image.detach().cpu(), self.iter))

    def history(self, name: str) -> HistoryBuffer:
        """All values of one scalar, as a fvcore ``HistoryBuffer``."""
        if name not in self._history:
            raise KeyError(f"No history for scalar '{name}'.")
        return self._history[name]

    def histories(self) -> dict[str, HistoryBuffer]:
        return dict(self._history)

    def latest(self) -> dict[str, tuple[float, int]]:
        """``{name: (latest value, iteration it was put at)}``."""
        return dict(self._latest_scalars)

    def latest_with_smoothing_hint(self, window: int = 20) -> dict[str, tuple[float, int]]:
        """Like ``latest`` but scalars with a smoothing hint give their median over ``window``."""
        return {
            name: (
                float(self._history[name].median(window)) if self._smoothing_hints[name] else value,
                itr,
            )
            for name, (value, itr) in self._latest_scalars.items()
        }

    def images(self) -> list[tuple[str, torch.Tensor, int]]:
        """``[(name, CHW float image, iteration)]`` put since the last ``clear_images``."""
        return list(self._images)

    def clear_images(self) -> None:
        self._images = []

    def step(self) -> None:
        """Advance the iteration counter by one."""
        self.iter += 1


class EventWriter:
    """Writes the content of the current event storage somewhere."""

    def write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _new_scalars(
    storage: EventStorage, window: int, last_written: dict[str, int]
) -> dict[int, dict[str, float]]:
    """Scalars put after their last write, grouped by iteration; updates ``last_written``."""
    by_iter: dict[int, dict[str, float]] = defaultdict(dict)
    for name, (value, itr) in storage.latest_with_smoothing_hint(window).items():
        if itr > last_written.get(name, -1):
            by_iter[itr][name] = value
            last_written[name] = itr
    return dict(sorted(by_iter.items()))


class JSONWriter(EventWriter):
    """Appends one JSON object per iteration (``{"iteration": t, name: value, ...}``) to a file.

    The file is opened in append mode so that a resumed run keeps the earlier history, and it is
    flushed after every write. Each scalar is written once per new value.
    """

    def __init__(self, path: str, window: int = 20) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        self._window = window
        self._last_written: dict[str, int] = {}

    def write(self) -> None:
        storage = get_event_storage()
        for itr, scalars in _new_scalars(storage, self._window, self._last_written).items():
            self._file.write(json.dumps({"iteration": itr, **scalars}, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorboardXWriter(EventWriter):
    """Writes new scalars and the pending images to TensorBoard."""

    def __init__(self, log_dir: str, window: int = 20, **kwargs: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import, only when used

        self._writer = SummaryWriter(log_dir, **kwargs)
        self._window = window
        self._last_written: dict[str, int] = {}

    def write(self) -> None:
        storage = get_event_storage()
        for itr, scalars in _new_scalars(storage, self._window, self._last_written).items():
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, itr)
        for name, image, itr in storage.images():
            self._writer.add_image(name, image, itr)
        storage.clear_images()

    def close(self) -> None:
        self._writer.close()


class CommonMetricPrinter(EventWriter):
    """Logs one line with the ETA, the losses, timings, the learning rate and GPU memory."""

    def __init__(self, max_iter: int, window: int = 20) -> None:
        self._max_iter = max_iter
        self._window = window

    def _eta(self, storage: EventStorage) -> str | None:
        try:
            seconds_per_iter = storage.history("time").median(1000)
        except KeyError:
            return None
        remaining = max(self._max_iter - storage.iter - 1, 0)
        return str(datetime.timedelta(seconds=int(seconds_per_iter * remaining)))

    def write(self) -> None:
        storage = get_event_storage()
        if storage.iter >= self._max_iter:
            return  # after training: there is no progress to report
        histories = storage.histories()
        parts = []
        eta = self._eta(storage)
        if eta is not None:
            parts.append(f"eta: {eta}")
        parts.append(f"iter: {storage.iter}")
        parts.extend(
            f"{name}: {histories[name].median(self._window):.4g}"
            for name in histories
            if "loss" in name
        )
        for name in ("time", "data_time"):
            if name in histories:
                parts.append(f"{name}: {histories[name].median(self._window):.4f}")
        if "lr" in histories:
            parts.append(f"lr: {histories['lr'].latest():.5g}")
        if torch.cuda.is_available():
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated() / 1024 / 1024:.0f}M")
        logger.info("  ".join(parts))
