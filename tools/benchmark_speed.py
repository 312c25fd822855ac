#!/usr/bin/env python
"""Training-step time, inference throughput and peak memory of one or more models at the same
input size and batch, and where a training step spends its time. Prints markdown tables.

    python tools/benchmark_speed.py --config-file configs/CondInst/MS_R_50_1x.yaml \
        configs/BoxInst/MS_R_50_1x.yaml configs/coco/boxteacher_r50_1x.yaml \
        --batch-size 2 --short-side 512 --iters 10 [--with-data] [--amp] MODEL.DEVICE cpu

Training steps run on a fixed synthetic batch (data loading excluded); ``--with-data`` also
times steps that read the config's training set through the real data loader (the input size
is then the config's). ``--amp`` uses mixed precision (``SOLVER.AMP``). The breakdown times the
forward parts of the network being trained (for BoxTeacher the student): backbone (ResNet +
FPN), heads (FCOS head, mask branch, controller), mask targets (box masks, LAB colour
similarity, pseudo-mask targets), mask head and mask losses, and for BoxTeacher the teacher
pass; "backward + optimizer" includes BoxTeacher's EMA update. Peak memory is the CUDA
allocator's peak, or on CPU the process's peak RSS (which only grows from one model to the next).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import statistics
import time
from collections import defaultdict
from typing import Callable, Iterator

import torch
from tabulate import tabulate
from torch import nn

from boxteacher.build import architecture_spec, build_model, method_name
from boxteacher.config import ArchitectureSpec
from boxteacher.data.build import build_train_loader
from boxteacher.engine import atomic_open, default_argument_parser, setup_config, setup_tool_logging
from boxteacher.engine.solver import build_optimizer
from boxteacher.engine.train_loop import unwrap_model
from boxteacher.engine.trainer import amp_dtype
from boxteacher.modeling.ema import ema_update

logger = logging.getLogger("boxteacher.benchmark_speed")


def synthetic_batch(
    batch_size: int,
    height: int,
    width: int,
    num_classes: int,
    generator: torch.Generator,
    student_view: bool,
) -> list[dict]:
    """Images with 5 random rectangular objects each (boxes, labels and masks) and, with
    ``student_view``, a colour-inverted second view (``aug_image``, BoxTeacher's student view)."""
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        xy = torch.rand(5, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        wh = (0.1 + 0.2 * torch.rand(5, 2, generator=generator)) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1).floor()
        masks = torch.zeros((5, height, width), dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            m[y0:y1, x0:x1] = True
        labels = torch.randint(0, num_classes, (5,), generator=generator)
        sample = {
            "image": image,
            "height": height,
            "width": width,
            "instances": {"boxes": boxes, "labels": labels, "masks": masks},
        }
        if student_view:
            sample["aug_image"] = 255 - image
        batch.append(sample)
    return batch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


class PartTimer:
    """Adds up the wall time of wrapped methods, by part name."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start

    def wrap(self, obj: object, method: str, name: str) -> None:
        original = getattr(obj, method)

        def wrapper(*args, **kwargs):
            with self.part(name):
                return original(*args, **kwargs)

        setattr(obj, method, wrapper)


def instrument(model: nn.Module, timer: PartTimer, spec: ArchitectureSpec) -> None:
    """Time the parts of the trained network's forward (the student of a teacher-student model).
    ``heads`` is measured as run_heads and the backbone is subtracted from it afterwards."""
    model = unwrap_model(model)
    network = model.student if spec.teacher_student else model
    timer.wrap(network.backbone, "forward", "backbone")
    timer.wrap(network, "run_heads", "backbone + heads")
    timer.wrap(network, "mask_targets", "mask targets")
    timer.wrap(network, "mask_logits", "mask head + mask losses")
    timer.wrap(network.supervision, "losses", "mask head + mask losses")
    if spec.teacher_student:
        timer.wrap(model.teacher_view, "forward_teacher", "teacher pass")


def breakdown(seconds: dict[str, float], step_seconds: float) -> dict[str, float]:
    """Share of the step per part (teacher pass first, then the student's parts)."""
    parts = dict(seconds)
    parts["heads"] = parts.pop("backbone + heads", 0.0) - parts.get("backbone", 0.0)
    parts["other (losses of FCOS, assignment, ...)"] = step_seconds - sum(parts.values())
    order = [
        "teacher pass",
        "backbone",
        "heads",
        "mask targets",
        "mask head + mask losses",
        "backward + optimizer",
        "other (losses of FCOS, assignment, ...)",
    ]
    return {name: parts[name] / step_seconds for name in order if name in parts}


def benchmark(config_file: str, args: argparse.Namespace) -> tuple[list, list]:
    cfg = setup_config(config_file, [*args.opts, "SOLVER.AMP.ENABLED", str(args.amp)])
    spec = architecture_spec(cfg)
    model = build_model(cfg)
    device = next(model.parameters()).device
    dtype = amp_dtype(cfg, device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    optimizer = build_optimizer(cfg, model)
    height, width = args.short_side, args.short_side * 4 // 3
    generator = torch.Generator().manual_seed(0)
    batch = synthetic_batch(
        args.batch_size, height, width, cfg.MODEL.FCOS.NUM_CLASSES, generator, spec.student_view
    )
    timer = PartTimer(device)
    instrument(model, timer, spec)

    def train_step(data: list[dict]) -> None:
        with autocast():
            losses = model(data, iteration=0)
        with timer.part("backward + optimizer"):
            optimizer.zero_grad(set_to_none=True)
            sum(v for k, v in losses.items() if k.startswith("loss")).backward()
            optimizer.step()
            if spec.teacher_student:  # the EMA update is part of every teacher-student step
                ema_update(model.teacher, model.student, 0.999)

    model.train()
    timed(lambda: train_step(batch), 2, device)
    timer.enabled = True
    train_times = timed(lambda: train_step(batch), args.iters, device)
    timer.enabled = False
    step = statistics.median(train_times)
    shares = breakdown(
        {k: v / args.iters for k, v in timer.seconds.items()}, sum(train_times) / args.iters
    )

    with_data = "-"
    if args.with_data:
        data_cfg = cfg.clone()
        data_cfg.defrost()
        data_cfg.SOLVER.IMS_PER_BATCH = args.batch_size
        loader = build_train_loader(data_cfg, spec, seed=0)
        next(loader)
        with_data = (
            f"{statistics.median(timed(lambda: train_step(next(loader)), args.iters, device)):.3f}"
        )

    model.eval()
    images = [{k: v for k, v in x.items() if k not in ("instances", "aug_image")} for x in batch]
    with torch.no_grad(), autocast():
        timed(lambda: model(images), 1, device)
        infer_times = timed(lambda: model(images), args.iters, device)

    name = method_name(cfg)
    row = [
        name,
        f"R-{cfg.MODEL.RESNETS.DEPTH}",
        str(device),
        "on" if args.amp else "off",
        f"{args.batch_size} x {height}x{width}",
        f"{step:.3f}",
        with_data,
        f"{args.batch_size / statistics.median(infer_times):.2f}",
        f"{peak_memory_mb(device):.0f}",
    ]
    share_rows = [[name, part, f"{100 * share:.1f}"] for part, share in shares.items()]
    return row, share_rows


def main() -> None:
    parser = default_argument_parser(description=__doc__, config="many", training=False)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--short-side", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (after 2 warm-up)")
    parser.add_argument(
        "--with-data", action="store_true", help="also time steps with the real data loader"
    )
    parser.add_argument(
        "--amp", action="store_true", help="mixed precision (SOLVER.AMP, PRECISION from the config)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    setup_tool_logging(logging.WARNING)

    rows, share_rows = [], []
    for config_file in args.config_file:
        row, shares = benchmark(config_file, args)
        rows.append(row)
        share_rows += shares
    step = {row[0]: float(row[5]) for row in rows}
    for row in rows:
        row.append(f"{step[row[0]] / step['BoxInst']:.2f}x" if "BoxInst" in step else "-")
    headers = [
        "model",
        "backbone",
        "device",
        "AMP",
        "batch",
        "s / train iter (synthetic batch)",
        "s / train iter (with data loading)",
        "inference img / s",
        "peak memory (MB)",
        "step vs BoxInst",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print()
    print(
        tabulate(
            share_rows,
            headers=["model", "part of the training step", "share (%)"],
            tablefmt="github",
        )
    )
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump([dict(zip(headers, row)) for row in rows], f, indent=2)


if __name__ == "__main__":
    main()
