#!/usr/bin/env python
"""What a training step pays, on real data: seconds per iteration, operator calls and host
synchronisations per step, and where they go, for one or more configs trained alike.

    # the quick-start network on carparts, BoxInst against BoxTeacher, from a trained checkpoint
    D=../shared/data/carparts
    python tools/benchmark_training.py \\
        --config-file configs/quickstart/boxinst_shapes.yaml \\
        configs/quickstart/boxteacher_shapes.yaml \\
        --train-json $D/annotations/instances_train.json --train-images $D/images \\
        --weights output/carparts_boxinst/model_final.pth --iters 20 MODEL.DEVICE cpu

Every config runs as ``train_net.py`` would train it (the ``Trainer``: real data loader with
its workers, hooks, EMA), from ``--weights`` (BoxTeacher's teacher starts as a copy of the
student, so it detects what the checkpoint detects). Without ``--weights`` the first config is
trained for ``--pretrain-iters`` iterations first and its final weights are used. All configs
see the same batches (same data seed).

Per config: the median seconds per iteration over ``--iters`` iterations after ``--warmup``
(data loading included), and over ``--profile-iters`` further iterations under
``torch.profiler``: operator calls per step (ATen operators called from Python or autograd, not
their internal sub-calls) and host synchronisations per step. On CUDA the latter are counted by
``torch.cuda.set_sync_debug_mode``; on a CPU, where nothing waits, the proxy counts the
operators that read values back to the host (``aten::_local_scalar_dense``, i.e. ``item()``
and ``bool()``, and ``aten::nonzero``, i.e. boolean indexing) and ``tolist()`` / ``numpy()``
calls; it also counts reads of host tensors, which a GPU step does not wait for. The parts are
the ``record_function`` ranges of the engine and the models (``forward`` > ``teacher`` >
``teacher: network`` ...): their host time per step (inclusive), the device time of their
kernels on CUDA, and the operators and synchronisations they call themselves (not inside a
nested part).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tabulate import tabulate
from torch.overrides import TorchFunctionMode

from boxteacher.build import method_name
from boxteacher.engine import (
    atomic_open,
    default_argument_parser,
    hooks,
    setup_config,
    setup_tool_logging,
)
from boxteacher.engine.trainer import Trainer

logger = logging.getLogger("boxteacher.benchmark_training")
REPO = Path(__file__).resolve().parents[1]
SYNC_OPERATORS = ("aten::_local_scalar_dense", "aten::nonzero")
HOST_READS = ("tolist", "numpy")
# The ranges in the order of a step; parts not listed come after, by name.
PART_ORDER = (
    "data",
    "forward",
    "teacher",
    "teacher: network",
    "teacher: detections",
    "teacher: mask head",
    "teacher: post-processing",
    "pseudo labels",
    "pseudo labels: assignment",
    "pseudo labels: refinement",
    "student",
    "student: targets",
    "student: network",
    "student: FCOS losses",
    "student: mask losses",
    "backward",
    "optimizer",
    "ema",
)


class HostReadCounter(TorchFunctionMode):
    """Counts ``Tensor.tolist()`` and ``Tensor.numpy()`` calls (host reads no ATen operator
    shows)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class StepMeter(hooks.HookBase):
    """Times iterations (from one ``before_step`` to the next, synchronised) and profiles the
    last ``profile_iters`` of them. Registered first, so that it brackets the other hooks."""

    def __init__(self, warmup: int, timed: int, profiled: int, device: torch.device):
        self.warmup, self.timed, self.profiled, self.device = warmup, timed, profiled, device
        self.seconds: list[float] = []
        self.profile: torch.profiler.profile | None = None
        self.host_reads = HostReadCounter()
        self.sync_warnings = 0
        self._start: float | None = None
        self._warnings: warnings.catch_warnings | None = None
        self._recorded: list | None = None

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self) -> None:
        self._synchronize()
        now = time.perf_counter()
        step = self.trainer.iter
        if self._start is not None and self.warmup < step <= self.warmup + self.timed:
            self.seconds.append(now - self._start)
        self._start = now
        if step == self.warmup + self.timed:
            self._start_profile()

    def after_train(self) -> None:
        self._synchronize()
        if self.profile is not None:
            self._stop_profile()

    def _start_profile(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._warnings = warnings.catch_warnings(record=True)
            self._recorded = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.profile = torch.profiler.profile(activities=activities)
        self.profile.__enter__()
        self.host_reads.__enter__()

    def _stop_profile(self) -> None:
        self.host_reads.__exit__(None, None, None)
        self.profile.__exit__(None, None, None)
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.sync_warnings = sum("synchroniz" in str(w.message) for w in self._recorded)
            self._warnings.__exit__(None, None, None)


def innermost_range(event, ranges: list) -> str | None:
    """The name of the innermost user range whose interval holds the event's start."""
    start = event.time_range.start
    holding = [r for r in ranges if r.time_range.start <= start <= r.time_range.end]
    return max(holding, key=lambda r: r.time_range.start).name if holding else None


def profile_summary(meter: StepMeter) -> dict:
    """Operator calls, synchronisations and per-part figures per profiled step."""
    events = list(meter.profile.events())
    ranges = [e for e in events if e.is_user_annotation]
    steps = meter.profiled
    ops: Counter = Counter()
    syncs: Counter = Counter()
    device_us: defaultdict = defaultdict(float)
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        part = innermost_range(event, ranges) or "(outside the parts)"
        if event.name in SYNC_OPERATORS:
            syncs[part] += 1
        parent = event.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            ops[part] += 1
            device_us[part] += event.device_time_total
    host_ms: defaultdict = defaultdict(float)
    for r in ranges:
        host_ms[r.name] += r.cpu_time_total / 1000
    names = [n for n in PART_ORDER if n in host_ms] + sorted(set(host_ms) - set(PART_ORDER))
    parts = [
        {
            "part": name,
            "host_ms": host_ms[name] / steps,
            "device_ms": device_us[name] / 1000 / steps,
            "ops": ops[name] / steps,
            "syncs": syncs[name] / steps,
        }
        for name in names + ["(outside the parts)"]
    ]
    cpu_syncs = sum(syncs.values()) + meter.host_reads.count
    return {
        "ops_per_step": sum(ops.values()) / steps,
        "syncs_per_step": (meter.sync_warnings if meter.device.type == "cuda" else cpu_syncs)
        / steps,
        "parts": parts,
    }


def dataset_overrides(args: argparse.Namespace) -> list[str]:
    if not args.train_json:
        return []
    with open(args.train_json, "rb") as f:  # bytes: json detects a UTF-8 BOM
        num_classes = len(json.load(f)["categories"])
    register = [["benchmark_train", args.train_json, args.train_images]]
    return [
        "DATASETS.REGISTER",
        repr(register),
        "DATASETS.TRAIN",
        "('benchmark_train',)",
        "MODEL.FCOS.NUM_CLASSES",
        str(num_classes),
    ]


def config(config_file: str, args: argparse.Namespace, output_dir: str, extra: list[str]):
    opts = dataset_overrides(args) + [
        "OUTPUT_DIR",
        output_dir,
        "SEED",
        str(args.seed),
        "DATASETS.TEST",
        "()",
        "SOLVER.CHECKPOINT_PERIOD",
        "1000000",
        "VIS_PERIOD",
        "0",
    ]
    if args.amp:
        opts += ["SOLVER.AMP.ENABLED", "True"]
    return setup_config(config_file, opts + list(args.opts) + extra)


def pretrain(config_file: str, args: argparse.Namespace, output_dir: str) -> str:
    """Train ``config_file`` for ``--pretrain-iters`` iterations; the path of its weights."""
    logger.info(
        "No --weights: training %s for %d iterations first", config_file, args.pretrain_iters
    )
    cfg = config(
        config_file,
        args,
        output_dir,
        ["SOLVER.MAX_ITER", str(args.pretrain_iters), "MODEL.WEIGHTS", ""],
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return os.path.join(output_dir, "model_final.pth")


def measure(config_file: str, weights: str, args: argparse.Namespace, output_dir: str) -> dict:
    total = args.warmup + args.iters + args.profile_iters
    cfg = config(
        config_file, args, output_dir, ["SOLVER.MAX_ITER", str(total), "MODEL.WEIGHTS", weights]
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    device = next(trainer.model.parameters()).device
    meter = StepMeter(args.warmup, args.iters, args.profile_iters, device)
    meter.trainer = trainer
    trainer._hooks.insert(0, meter)
    trainer.train()
    summary = profile_summary(meter)
    return {
        "config": config_file,
        "model": method_name(cfg),
        "device": str(device),
        "amp": args.amp,
        "seconds_per_iter": statistics.median(meter.seconds),
        **summary,
    }


def tables(results: list[dict]) -> str:
    reference = next((r for r in results if r["model"] == "BoxInst"), results[0])
    rows = [
        [
            r["model"],
            r["device"],
            "on" if r["amp"] else "off",
            f"{r['seconds_per_iter']:.3f}",
            f"{r['seconds_per_iter'] / reference['seconds_per_iter']:.2f}x",
            f"{r['ops_per_step']:.0f}",
            f"{r['ops_per_step'] / reference['ops_per_step']:.2f}x",
            f"{r['syncs_per_step']:.0f}",
        ]
        for r in results
    ]
    headers = [
        "model",
        "device",
        "AMP",
        "s / iter",
        f"vs {reference['model']}",
        "operator calls / step",
        f"vs {reference['model']}",
        "host syncs / step",
    ]
    text = [tabulate(rows, headers=headers, tablefmt="github")]
    device_times = any(r["device"].startswith("cuda") for r in results)
    for r in results:
        part_rows = [
            [
                p["part"],
                f"{p['host_ms']:.1f}",
                *([f"{p['device_ms']:.1f}"] if device_times else []),
                f"{p['ops']:.0f}",
                f"{p['syncs']:.0f}",
            ]
            for p in r["parts"]
        ]
        part_headers = [
            "part",
            "host ms / step",
            *(["device ms / step"] if device_times else []),
            "operator calls",
            "syncs",
        ]
        text += [
            "",
            f"{r['model']} ({r['config']}):",
            tabulate(part_rows, headers=part_headers, tablefmt="github"),
        ]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = default_argument_parser(description=__doc__, config="many", training=False)
    parser.add_argument(
        "--train-json", help="a COCO json to train on instead of the configs' DATASETS.TRAIN"
    )
    parser.add_argument("--train-images", help="the image folder of --train-json")
    parser.add_argument(
        "--weights", help="MODEL.WEIGHTS of every config (a checkpoint whose network detects)"
    )
    parser.add_argument(
        "--pretrain-iters",
        type=int,
        default=300,
        help="without --weights: iterations of the first config trained to get them",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument(
        "--profile-iters", type=int, default=2, help="profiled iterations, after the timed ones"
    )
    parser.add_argument("--amp", action="store_true", help="SOLVER.AMP.ENABLED")
    parser.add_argument("--seed", type=int, default=1, help="SEED (the data seed of every config)")
    parser.add_argument("--output-dir", help="where the runs write (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if bool(args.train_json) != bool(args.train_images):
        parser.error("--train-json and --train-images go together")
    if min(args.iters, args.profile_iters) < 1 or args.warmup < 1:
        parser.error("--warmup, --iters and --profile-iters must be at least 1")
    setup_tool_logging(logging.WARNING)

    with tempfile.TemporaryDirectory() as scratch:
        root = args.output_dir or scratch
        weights = args.weights or pretrain(
            args.config_file[0], args, os.path.join(root, "pretrain")
        )
        results = [
            measure(c, weights, args, os.path.join(root, f"run{i}"))
            for i, c in enumerate(args.config_file)
        ]
    text = tables(results)
    print(text)
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
