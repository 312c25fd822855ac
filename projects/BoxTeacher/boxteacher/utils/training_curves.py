"""Training curves of a run from its ``metrics.json`` (PNG files, matplotlib's object API; no
pyplot state): ``tools/plot_metrics.py``.

``metrics.json`` holds one JSON object per logged iteration (``{"iteration": t, name: value,
...}``, see ``engine.events.JSONWriter``). ``write_plots`` writes:

* ``losses.png``: every ``loss_*`` and ``total_loss``;
* ``lr.png``: the learning rate;
* ``eval_ap.png``: AP, AP50 and AP75 of every evaluated task (``bbox``, ``segm``), if any;
* ``boxteacher.png``: ``num_pseudo_masks``, ``ema_momentum``, ``param_diff``, if present;

or, given keys (names or shell-style patterns), only ``selected_keys.png``, one panel per
matching scalar. A resumed or restarted run appends to the same file: its records replace the
earlier ones from the iteration it starts at. Malformed lines are skipped with a warning.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from typing import Iterable, Mapping, Sequence

from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

Record = Mapping[str, float]
BOXTEACHER_KEYS = ("num_pseudo_masks", "ema_momentum", "param_diff")
AP_METRICS = ("AP", "AP50", "AP75")


class MetricsError(Exception):
    """The metrics file is missing or holds nothing to plot."""


def read_metrics(path: str) -> list[dict[str, float]]:
    """The records of ``path`` in iteration order, each ``{"iteration": int, name: float}``.

    Lines that are not a JSON object with an integer "iteration" are skipped with a warning
    naming the line; non-numeric values are dropped. A record whose iteration is not after the
    previous one starts a resumed or restarted run: earlier records from that iteration on go.
    """
    if not os.path.isfile(path):
        raise MetricsError(
            f"No metrics file '{path}' (a training run writes OUTPUT_DIR/metrics.json)."
        )
    records: list[dict[str, float]] = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse_line(line, f"{path}:{line_number}")
            if record is None:
                continue
            iteration = record["iteration"]
            if records and iteration <= records[-1]["iteration"]:
                logger.info(
                    "%s:%d: iteration %d after %d: a resumed or restarted run; its records replace "
                    "the earlier ones from iteration %d on.",
                    path,
                    line_number,
                    iteration,
                    records[-1]["iteration"],
                    iteration,
                )
                records = [r for r in records if r["iteration"] < iteration]
            records.append(record)
    if not records:
        raise MetricsError(f"'{path}' holds no metrics records.")
    return records


def _parse_line(line: str, where: str) -> dict[str, float] | None:
    """One record, or None (with a warning) if the line is malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        logger.warning("%s: skipped, not JSON (%s).", where, e.msg)
        return None
    if not isinstance(obj, dict):
        logger.warning("%s: skipped, a JSON %s instead of an object.", where, type(obj).__name__)
        return None
    iteration = obj.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int):
        logger.warning("%s: skipped, no integer 'iteration' (got %r).", where, iteration)
        return None
    numbers = {
        k: float(v)
        for k, v in obj.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    return numbers | {"iteration": iteration}


def series(records: Sequence[Record], key: str) -> tuple[list[int], list[float]]:
    """Iterations and values of the records that hold ``key``."""
    points = [(int(r["iteration"]), r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def scalar_names(records: Iterable[Record]) -> list[str]:
    """Every scalar name of the records except "iteration", sorted."""
    return sorted({k for r in records for k in r} - {"iteration"})


def save_figure(figure: Figure, path: str) -> None:
    """Write ``figure`` as PNG atomically (temporary file, then rename)."""
    tmp_path = path + ".tmp"
    try:
        figure.savefig(tmp_path, format="png")
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _axes_grid(count: int, title: str):
    """A figure with ``count`` panels side by side (wrapping after three) and its axes."""
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows + 0.4), layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes[:count]


def _panel(
    ax, records: Sequence[Record], keys: Sequence[str], title: str, last_value: bool = False
) -> None:
    """Lines of ``keys`` over the iterations of the whole run (with markers when a line has few
    points); ``last_value`` writes each line's last value into the legend."""
    for key in keys:
        iterations, values = series(records, key)
        style = {"color": "black", "linewidth": 2.0} if key == "total_loss" else {"linewidth": 1.2}
        label = f"{key} ({values[-1]:.4g})" if last_value else key
        marker = "o" if len(iterations) < 10 else None
        ax.plot(iterations, values, label=label, marker=marker, markersize=4, **style)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_xlim(0, max(1, records[-1]["iteration"]) * 1.03)
    ax.grid(True, alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize="small")


def plot_losses(records: Sequence[Record]) -> Figure | None:
    keys = [k for k in scalar_names(records) if k.startswith("loss")]
    if not keys:
        return None
    if any("total_loss" in r for r in records):
        keys.append("total_loss")
    figure = Figure(figsize=(9, 5), layout="constrained")
    _panel(figure.subplots(), records, keys, "losses (median of the last 20 iterations)")
    return figure


def plot_lr(records: Sequence[Record]) -> Figure | None:
    if not any("lr" in r for r in records):
        return None
    figure = Figure(figsize=(7, 4), layout="constrained")
    _panel(figure.subplots(), records, ["lr"], "learning rate")
    return figure


def evaluation_tasks(records: Sequence[Record]) -> list[str]:
    """Prefixes of the evaluation results, e.g. ["bbox", "segm"] or ["val/bbox", ...]."""
    return sorted(
        {name.rsplit("/", 1)[0] for name in scalar_names(records) if name.endswith("/AP")}
    )


def plot_eval(records: Sequence[Record]) -> Figure | None:
    tasks = evaluation_tasks(records)
    if not tasks:
        return None
    figure, axes = _axes_grid(len(tasks), "evaluation")
    for ax, task in zip(axes, tasks):
        keys = [f"{task}/{m}" for m in AP_METRICS if any(f"{task}/{m}" in r for r in records)]
        _panel(ax, records, keys, task, last_value=True)
    return figure


def plot_boxteacher(records: Sequence[Record]) -> Figure | None:
    keys = [k for k in BOXTEACHER_KEYS if any(k in r for r in records)]
    if not keys:
        return None
    figure, axes = _axes_grid(len(keys), "BoxTeacher")
    for ax, key in zip(axes, keys):
        _panel(ax, records, [key], key)
    return figure


def plot_selected(records: Sequence[Record], patterns: Sequence[str]) -> Figure:
    """One panel per scalar matching one of ``patterns`` (shell-style)."""
    names = scalar_names(records)
    keys = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not keys:
        raise MetricsError(
            f"No scalar matches {list(patterns)}; the scalars are: {', '.join(names)}."
        )
    figure, axes = _axes_grid(len(keys), "selected scalars")
    for ax, key in zip(axes, keys):
        _panel(ax, records, [key], key)
    return figure


def write_plots(
    records: Sequence[Record], output_dir: str, keys: Sequence[str] | None = None
) -> list[str]:
    """Write the PNG files into ``output_dir`` (created); returns their paths."""
    if keys:
        figures = {"selected_keys.png": plot_selected(records, keys)}
    else:
        figures = {
            "losses.png": plot_losses(records),
            "lr.png": plot_lr(records),
            "eval_ap.png": plot_eval(records),
            "boxteacher.png": plot_boxteacher(records),
        }
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        if figure is not None:
            path = os.path.join(output_dir, name)
            save_figure(figure, path)
            paths.append(path)
    return paths
