#!/usr/bin/env python
"""Time and peak memory of BoxInst's pairwise term: the fused Triton kernels (CUDA only) and the
packed PyTorch version (the pixels within reach of each instance's box, each pair of neighbours
once, hand-written backward) against the original ``unfold`` formulation with per-instance
copies. Forward + backward, on CPU and on CUDA when available. Prints a table.

    python tools/benchmark_pairwise.py                      # 64 instances, 200 x 336 (stride 4)
    python tools/benchmark_pairwise.py --instances 16 64 --size 100 168 --size 200 336

Centre weights (``--centre``): "boxes", as in training, where each instance's centre weights are
its ground-truth box (8 boxes per image, sides 10-60 % of the map's, about 12 % of its area on
average; on carparts at batch 8 the boxes cover 11 % of the map with the margin of the
neighbours) and the colour similarities of its image are the pair weights; "dense", a random
half of every map (the worst case of the packed version: nothing to leave out).

On CPU, peak memory is the growth of the peak resident set (Linux VmHWM) while one forward and
backward run, measured in a fresh process per case; on CUDA it is ``max_memory_allocated``
above what the inputs occupy.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time

import torch
from tabulate import tabulate

from boxteacher.engine import atomic_open, default_argument_parser
from boxteacher.modeling.pairwise import neighbour_offsets, pairwise_loss, pairwise_loss_reference

VARIANTS = {"cpu": ("packed", "unfold"), "cuda": ("fused", "packed", "unfold")}
IMAGES = 2
BOXES_PER_IMAGE = 8


def box_masks(
    instances: int, h: int, w: int, pair_index: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """(instances, 1, h, w) the box of each instance: one of its image's boxes."""
    sides = (0.1 + 0.5 * torch.rand(IMAGES * BOXES_PER_IMAGE, 2, generator=g)) * torch.tensor(
        [h, w]
    )
    starts = torch.rand(IMAGES * BOXES_PER_IMAGE, 2, generator=g) * (torch.tensor([h, w]) - sides)
    box = pair_index * BOXES_PER_IMAGE + torch.randint(
        0, BOXES_PER_IMAGE, (instances,), generator=g
    )
    top, left = starts[box].long().unbind(1)
    bottom, right = (starts[box] + sides[box]).long().unbind(1)
    rows, cols = torch.arange(h), torch.arange(w)
    inside_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < right[:, None])
    return (inside_rows[:, :, None] & inside_cols[:, None, :]).float()[:, None]


def make_inputs(
    instances: int, h: int, w: int, device: str, centre_weights: str = "boxes"
) -> tuple:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(instances, 1, h, w, generator=g) * 3).to(device).requires_grad_()
    pair_weights = (torch.rand(IMAGES, 8, h, w, generator=g) > 0.3).to(device)
    pair_index = torch.randint(0, IMAGES, (instances,), generator=g)
    if centre_weights == "boxes":
        centre = box_masks(instances, h, w, pair_index, g)
    else:
        centre = (torch.rand(instances, 1, h, w, generator=g) > 0.5).float()
    return logits, pair_weights, pair_index.to(device), centre.to(device)


def run_once(variant: str, inputs: tuple) -> None:
    logits, pair_weights, pair_index, centre = inputs
    if variant != "unfold":
        sums, weights = pairwise_loss(
            logits, pair_weights, pair_index, centre, neighbour_offsets(3, 2), variant
        )
    else:
        sums, weights = pairwise_loss_reference(logits, pair_weights, pair_index, centre, 3, 2)
    (sums.sum() / weights.sum().clamp(min=1)).backward()
    logits.grad = None


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_time(
    variant: str, instances: int, h: int, w: int, device: str, centre: str, repeats: int
) -> float:
    """Median seconds of forward + backward."""
    inputs = make_inputs(instances, h, w, device, centre)
    run_once(variant, inputs)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run_once(variant, inputs)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_mb() -> float:
    """Peak resident set of this process (Linux VmHWM, which starts afresh in a new process;
    ``ru_maxrss`` would carry the parent's peak over fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(
        "VmHWM not found in /proc/self/status (peak memory is measured on Linux only)"
    )


def _cpu_peak_worker(
    variant: str, instances: int, h: int, w: int, centre: str, queue: mp.Queue
) -> None:
    torch.set_num_threads(1)
    inputs = make_inputs(instances, h, w, "cpu", centre)
    before = _peak_rss_mb()
    run_once(variant, inputs)
    queue.put(_peak_rss_mb() - before)


def measure_peak_mb(
    variant: str, instances: int, h: int, w: int, device: str, centre: str
) -> float:
    if device == "cuda":
        inputs = make_inputs(instances, h, w, device, centre)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(variant, inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_cpu_peak_worker, args=(variant, instances, h, w, centre, queue)
    )
    process.start()
    peak = queue.get()
    process.join()
    return peak


def main() -> None:
    parser = default_argument_parser(
        description=__doc__, config="none", overrides=False, training=False
    )
    parser.add_argument("--instances", type=int, nargs="+", default=[64])
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        action="append",
        metavar=("H", "W"),
        help="stride-4 map size (default 200 336, i.e. an 800 x 1344 input)",
    )
    parser.add_argument(
        "--centre",
        nargs="+",
        choices=["boxes", "dense"],
        default=["boxes", "dense"],
        help="centre weights: instances' boxes (as in training) and/or a random half of the map",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    sizes = args.size or [[200, 336]]

    rows = []
    for device in args.devices:
        for centre in args.centre:
            for instances in args.instances:
                for h, w in sizes:
                    results = {
                        v: (
                            measure_time(v, instances, h, w, device, centre, args.repeats),
                            measure_peak_mb(v, instances, h, w, device, centre),
                        )
                        for v in VARIANTS[device]
                    }
                    for variant in VARIANTS[device]:
                        seconds, peak = results[variant]
                        rows.append(
                            [
                                device,
                                centre,
                                instances,
                                f"{h} x {w}",
                                variant,
                                f"{seconds * 1000:.1f}",
                                f"{peak:.0f}",
                                f"{results['unfold'][0] / seconds:.2f}x",
                                f"{results['unfold'][1] / max(peak, 1e-9):.1f}x",
                            ]
                        )
    headers = [
        "device",
        "centre weights",
        "instances",
        "map (stride 4)",
        "version",
        "fwd+bwd (ms)",
        "peak memory (MB)",
        "speed-up vs unfold",
        "memory saving vs unfold",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump([dict(zip(headers, row)) for row in rows], f, indent=2)


if __name__ == "__main__":
    main()
