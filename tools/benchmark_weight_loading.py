#!/usr/bin/env python
"""Time to load weight files into a model (reading, renaming, copying), as ``MODEL.WEIGHTS``
does. Prints a markdown table.

    python tools/benchmark_weight_loading.py --config-file configs/coco/boxteacher_r50_1x.yaml \
        [--weights FILE ...] [--repeats 3] [KEY VALUE ...]

Without ``--weights`` it writes a checkpoint of the config's own (randomly initialised) model
to a temporary folder and times loading that.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time

import torch
from tabulate import tabulate

from boxteacher.build import build_model
from boxteacher.engine import (
    Checkpointer,
    default_argument_parser,
    setup_config,
    setup_tool_logging,
)

logger = logging.getLogger("boxteacher.benchmark_weight_loading")


def time_loading(model: torch.nn.Module, path: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        Checkpointer(model).load(path, checkpointables=[])
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = default_argument_parser(description=__doc__, config="required", training=False)
    parser.add_argument(
        "--weights",
        nargs="*",
        default=[],
        help="files to load (default: a checkpoint of the model)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_tool_logging(logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = setup_config(args.config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *args.opts])
    model = build_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        files = args.weights
        if not files:
            files = [os.path.join(tmp, "model.pth")]
            torch.save({"model": model.state_dict()}, files[0])
        rows = []
        for path in files:
            times = time_loading(model, path, args.repeats)
            rows.append(
                [
                    os.path.basename(path),
                    f"{os.path.getsize(path) / 2**20:.0f}",
                    f"{statistics.median(times):.2f}",
                    f"{min(times):.2f}",
                ]
            )
    print(
        tabulate(
            rows, headers=["file", "size (MB)", "median load (s)", "best (s)"], tablefmt="github"
        )
    )


if __name__ == "__main__":
    main()
