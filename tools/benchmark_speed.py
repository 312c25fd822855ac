#!/usr/bin/env python
"""Training-step time, inference throughput and peak memory of a model, on synthetic batches
(data loading excluded). Prints a markdown table.

    python tools/benchmark_speed.py --config-file configs/CondInst/MS_R_50_1x.yaml \
        --batch-size 2 --short-side 512 --iters 10 MODEL.DEVICE cpu
"""
from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time

import torch
from tabulate import tabulate

from boxteacher.build import build_model
from boxteacher.config import load_config
from boxteacher.engine.solver import build_optimizer
from boxteacher.modeling.ema import ema_update

logger = logging.getLogger("boxteacher.benchmark_speed")


def synthetic_batch(
    batch_size: int, height: int, width: int, num_classes: int, generator: torch.Generator, student_view: bool
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
        sample = {"image": image, "height": height, "width": width,
                  "instances": {"boxes": boxes, "labels": labels, "masks": masks}}
        if student_view:
            sample["aug_image"] = 255 - image
        batch.append(sample)
    return batch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn, iters: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--short-side", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (after 2 warm-up)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    cfg = load_config(args.config_file, args.opts)
    model = build_model(cfg)
    device = next(model.parameters()).device
    optimizer = build_optimizer(cfg, model)
    height, width = args.short_side, args.short_side * 4 // 3
    generator = torch.Generator().manual_seed(0)
    batch = synthetic_batch(args.batch_size, height, width, cfg.MODEL.FCOS.NUM_CLASSES, generator,
                            student_view=cfg.MODEL.META_ARCHITECTURE == "BoxTeacher")

    def train_step():
        if hasattr(model, "teacher"):  # BoxTeacher: the EMA update is part of every step
            ema_update(model.teacher, model.student, 0.999)
        losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(v for k, v in losses.items() if k.startswith("loss")).backward()
        optimizer.step()

    model.train()
    timed(train_step, 2, device)
    train_times = timed(train_step, args.iters, device)
    model.eval()
    images = [{k: v for k, v in x.items() if k not in ("instances", "aug_image")} for x in batch]
    with torch.no_grad():
        timed(lambda: model(images), 1, device)
        infer_times = timed(lambda: model(images), args.iters, device)

    name = "BoxInst" if cfg.MODEL.META_ARCHITECTURE == "CondInst" and cfg.MODEL.BOXINST.ENABLED else cfg.MODEL.META_ARCHITECTURE
    rows = [[
        name, f"R-{cfg.MODEL.RESNETS.DEPTH}", str(device),
        f"{args.batch_size} x {height}x{width}",
        f"{statistics.median(train_times):.3f}",
        f"{args.batch_size / statistics.median(infer_times):.2f}",
        f"{peak_memory_mb(device):.0f}",
    ]]
    headers = ["model", "backbone", "device", "batch", "s / train iter (median)", "inference img / s", "peak memory (MB)"]
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
