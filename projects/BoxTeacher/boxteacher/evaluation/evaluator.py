"""The evaluator protocol and the inference loop that feeds it.

An evaluator sees the model's inputs and outputs batch by batch (``process``) and turns what it
collected into metrics at the end (``evaluate``). ``inference_on_dataset`` runs a model over a test
loader in eval mode, times it and returns the evaluator's metrics: a dict
``{task: {metric: value}}`` (for example ``{"segm": {"AP": 31.2, ...}}``), empty on the non-main
processes of a distributed run.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any, Callable

import torch
from torch import nn

from ..utils import comm

logger = logging.getLogger(__name__)


class DatasetEvaluator(abc.ABC):
    """Accumulates model predictions over a dataset and computes metrics from them.

    ``encode_masks``: how the evaluator wants a model's output masks, a function from a chunk of
    bool masks (c, H, W) to c encoded masks, or None for bool tensors. ``inference_on_dataset``
    hands it to a model that has an ``encode_masks`` attribute (``CondInst``), which then never
    holds all the masks of an image at full resolution."""

    encode_masks: Callable[[torch.Tensor], list[Any]] | None = None

    def reset(self) -> None:
        """Forget everything processed so far (called before each inference run)."""

    @abc.abstractmethod
    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        """Record one batch: ``inputs`` as given to the model, ``outputs`` as it returned them."""

    @abc.abstractmethod
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics over everything processed, ``{task: {metric: value}}``.

        In a distributed run only the main process returns metrics; the others return ``{}``.
        """


@contextlib.contextmanager
def _encoding_masks(
    model: Callable[..., Any], encode: Callable[[torch.Tensor], list[Any]] | None
) -> Iterator[None]:
    """Give ``encode`` to a model that takes one (``encode_masks``) and restore its own after."""
    module = comm.unwrap_model(model) if isinstance(model, nn.Module) else model
    if encode is None or not hasattr(module, "encode_masks"):
        yield
        return
    previous = module.encode_masks
    module.encode_masks = encode
    try:
        yield
    finally:
        module.encode_masks = previous


@contextlib.contextmanager
def _eval_mode(model: Callable[..., Any]) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode and restore its previous mode on exit."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _synchronize_device() -> None:
    """Wait for queued CUDA work so that the timings measure it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _log_progress(done: int, num_batches: int | None, seconds_per_batch: float) -> None:
    if num_batches is None:
        logger.info("Inference done %d. %.4f s / batch", done, seconds_per_batch)
        return
    eta = _format_seconds(seconds_per_batch * (num_batches - done))
    logger.info(
        "Inference done %d/%d. %.4f s / batch. ETA=%s", done, num_batches, seconds_per_batch, eta
    )


def inference_on_dataset(
    model: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    data_loader: Iterable[list[dict[str, Any]]],
    evaluator: DatasetEvaluator,
    *,
    num_warmup: int = 5,
    log_period_s: float = 5.0,
) -> dict[str, dict[str, float]]:
    """Run ``model`` on every batch of ``data_loader`` and return ``evaluator``'s metrics.

    The model runs under ``torch.no_grad()`` in eval mode; a module's previous training mode is
    restored afterwards. The first ``num_warmup`` batches are left out of the reported timings
    (they pay for lazy initialisation and allocator warm-up). A progress line is logged at most
    every ``log_period_s`` seconds, with an ETA when ``data_loader`` has a length.

    Returns the evaluator's ``evaluate()`` result, ``{}`` on the non-main processes of a
    distributed run.
    """
    num_batches = len(data_loader) if isinstance(data_loader, Sized) else None
    if num_batches is not None:
        # Keep at least one timed batch.
        num_warmup = min(num_warmup, max(num_batches - 1, 0))
    logger.info(
        "Start inference on %s batches",
        "an unknown number of" if num_batches is None else num_batches,
    )
    evaluator.reset()

    loop_start = last_log = timed_start = time.perf_counter()
    compute_time = 0.0
    timed_images = 0
    with _eval_mode(model), _encoding_masks(model, evaluator.encode_masks), torch.no_grad():
        for idx, inputs in enumerate(data_loader):
            if idx == num_warmup:
                timed_start = time.perf_counter()
                compute_time, timed_images = 0.0, 0
            compute_start = time.perf_counter()
            outputs = model(inputs)
            _synchronize_device()
            compute_time += time.perf_counter() - compute_start
            evaluator.process(inputs, outputs)
            timed_images += len(inputs)

            now = time.perf_counter()
            if now - last_log >= log_period_s:
                _log_progress(idx + 1, num_batches, (now - loop_start) / (idx + 1))
                last_log = now

    total_time = time.perf_counter() - timed_start
    num_devices = comm.get_world_size()
    per_image = total_time / max(timed_images, 1)
    logger.info(
        "Total inference time: %s (%.6f s / image per device, on %d devices, %d warm-up batches "
        "excluded)",
        _format_seconds(total_time),
        per_image,
        num_devices,
        num_warmup,
    )
    logger.info(
        "Total inference pure compute time: %s (%.6f s / image per device, on %d devices)",
        _format_seconds(compute_time),
        compute_time / max(timed_images, 1),
        num_devices,
    )
    return evaluator.evaluate()


def flatten_results_dict(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"segm": {"AP": 31.2}}`` -> ``{"segm/AP": 31.2}`` (any nesting depth)."""
    flat: dict[str, Any] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_results_dict(value, name))
        else:
            flat[name] = value
    return flat


def print_csv_format(results: Mapping[str, Mapping[str, float]]) -> None:
    """Log the summary metrics of every task as ``copypaste:`` lines (comma-separated).

    Per-category entries (``AP-<class>``) are left out to keep the lines short.
    """
    for task, metrics in results.items():
        summary = {name: value for name, value in metrics.items() if "-" not in name}
        logger.info("copypaste: Task: %s", task)
        logger.info("copypaste: %s", ",".join(summary))
        logger.info("copypaste: %s", ",".join(f"{value:.4f}" for value in summary.values()))
