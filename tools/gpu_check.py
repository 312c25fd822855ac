#!/usr/bin/env python
"""The GPU check a maintainer runs on a machine with CUDA: the CUDA tests, and the speed
figures that the CPU cannot give, against their targets, in one table.

    D=../shared/data/carparts
    python tools/gpu_check.py --train-json $D/annotations/instances_train.json \\
        --train-images $D/images \\
        --weights output/carparts_boxinst/model_final.pth --output gpu_check.json

1. ``pytest -m gpu``: a BoxTeacher step on CUDA equals the CPU step (float32 without TF32:
   losses within 1e-3 relative), mixed-precision steps (bfloat16, float16) keep their losses
   and pseudo labels in float32 and close to float32's, the AMP trainer checkpoints its loss
   scaler, the pairwise term on CUDA equals the CPU's.
2. ``benchmark_training.py`` on the dataset by path (real loader, the teacher of
   ``--weights``; the quick-start networks, batch 8, short side 320-416): BoxTeacher's step
   against BoxInst's, in float32 and with AMP (target: at most 1.35x).
3. ``benchmark_speed.py``: the R-50 recipe, 800 x 1066, batch ``--amp-batch`` (8), with and
   without AMP (target: AMP at least 1.3x faster).
4. ``benchmark_pairwise.py`` on CUDA at 16, 64 and 256 instances, centre weights of boxes and
   dense (target: at least 3x the unfold version, at most 1/3 of its memory).

Each part runs in its own process; a part that fails is reported and the others still run.
``--quick`` shrinks every part (a smoke run of the script itself, e.g. on a CPU with
``--device cpu``). Plan about 6 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from boxteacher.engine import atomic_open, default_argument_parser

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = ["configs/quickstart/boxinst_shapes.yaml", "configs/quickstart/boxteacher_shapes.yaml"]


def run(command: list[str], timeout: int) -> tuple[int, str]:
    """Exit status and the last lines of the output of one part."""
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def ratio_row(
    check: str, measured: float | None, target: str, passed: bool | None, detail: str
) -> list:
    status = "-" if passed is None else ("pass" if passed else "FAIL")
    return [check, "-" if measured is None else f"{measured:.2f}", target, status, detail]


def pytest_part(args: argparse.Namespace) -> list[list]:
    code, out = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], timeout=900)
    summary = re.findall(r"\d+ (?:passed|failed|skipped|errors?)", out)
    return [
        [
            "pytest -m gpu",
            "-",
            "all pass",
            "pass" if code == 0 else "FAIL",
            ", ".join(summary) or out[-300:],
        ]
    ]


def training_part(args: argparse.Namespace, scratch: str) -> list[list]:
    rows = []
    size = ["INPUT.MIN_SIZE_TRAIN", "(320, 352, 384, 416)", "INPUT.MAX_SIZE_TRAIN", "700"]
    if args.quick:
        size = [
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "SOLVER.IMS_PER_BATCH",
            "2",
        ]
    data = (
        ["--train-json", args.train_json, "--train-images", args.train_images]
        if args.train_json
        else []
    )
    weights = (
        ["--weights", args.weights]
        if args.weights
        else ["--pretrain-iters", "2" if args.quick else "300"]
    )
    iters = (
        ["--warmup", "1", "--iters", "1", "--profile-iters", "1"]
        if args.quick
        else ["--iters", "20"]
    )
    for amp in (False, True):
        output = os.path.join(scratch, f"training_amp{int(amp)}.json")
        command = [
            sys.executable,
            "tools/benchmark_training.py",
            "--config-file",
            *QUICKSTART,
            *data,
            *weights,
            *iters,
            "--json",
            output,
            *(["--amp"] if amp else []),
            "MODEL.DEVICE",
            args.device,
            "SOLVER.IMS_PER_BATCH",
            str(args.batch),
            *size,
            *args.opts,
        ]
        code, out = run(command, timeout=1200)
        name = f"BoxTeacher / BoxInst step ({'AMP' if amp else 'float32'}, real data)"
        if code != 0:
            rows.append([name, "-", "<= 1.35", "FAIL", out[-300:]])
            continue
        boxinst, boxteacher = json.loads(Path(output).read_text())["results"]
        ratio = boxteacher["seconds_per_iter"] / boxinst["seconds_per_iter"]
        detail = (
            f"{boxinst['seconds_per_iter']:.3f} / {boxteacher['seconds_per_iter']:.3f} s; "
            f"operator calls {boxteacher['ops_per_step'] / boxinst['ops_per_step']:.2f}x; "
            f"syncs {boxinst['syncs_per_step']:.0f} / {boxteacher['syncs_per_step']:.0f} per step"
        )
        rows.append(ratio_row(name, ratio, "<= 1.35", ratio <= 1.35, detail))
    return rows


def amp_part(args: argparse.Namespace, scratch: str) -> list[list]:
    size = (
        ["--short-side", "128", "--batch-size", "2", "--iters", "2"]
        if args.quick
        else ["--short-side", "800", "--batch-size", str(args.amp_batch), "--iters", "10"]
    )
    config = (
        "configs/quickstart/boxinst_shapes.yaml"
        if args.quick
        else "configs/coco/boxteacher_r50_1x.yaml"
    )
    seconds = {}
    for amp in (False, True):
        output = os.path.join(scratch, f"speed_amp{int(amp)}.json")
        code, out = run(
            [
                sys.executable,
                "tools/benchmark_speed.py",
                "--config-file",
                config,
                *size,
                "--json",
                output,
                *(["--amp"] if amp else []),
                "MODEL.DEVICE",
                args.device,
                "MODEL.WEIGHTS",
                "",
            ],
            timeout=900,
        )
        if code != 0:
            return [["AMP speed-up (R-50, 800 x 1066)", "-", ">= 1.3", "FAIL", out[-300:]]]
        seconds[amp] = float(
            json.loads(Path(output).read_text())[0]["s / train iter (synthetic batch)"]
        )
    speedup = seconds[False] / seconds[True]
    detail = f"float32 {seconds[False]:.3f} s, AMP {seconds[True]:.3f} s per iteration ({config})"
    return [ratio_row("AMP speed-up (synthetic batch)", speedup, ">= 1.3", speedup >= 1.3, detail)]


def pairwise_part(args: argparse.Namespace, scratch: str) -> list[list]:
    output = os.path.join(scratch, "pairwise.json")
    instances = ["16"] if args.quick else ["16", "64", "256"]
    size = ["--size", "25", "42", "--repeats", "1"] if args.quick else ["--size", "100", "168"]
    code, out = run(
        [
            sys.executable,
            "tools/benchmark_pairwise.py",
            "--instances",
            *instances,
            *size,
            "--devices",
            args.device,
            "--json",
            output,
        ],
        timeout=900,
    )
    if code != 0:
        return [["pairwise term vs unfold", "-", ">= 3x, <= 1/3 memory", "FAIL", out[-300:]]]
    rows = []
    for r in json.loads(Path(output).read_text()):
        if r["version"] != ("fused" if args.device == "cuda" else "packed"):
            continue
        speedup = float(r["speed-up vs unfold"].rstrip("x"))
        saving = float(r["memory saving vs unfold"].rstrip("x"))
        name = (
            f"pairwise term ({r['version']}), {r['centre weights']}, {r['instances']} instances, "
            f"{r['map (stride 4)']}"
        )
        rows.append(
            ratio_row(
                name,
                speedup,
                ">= 3x, memory <= 1/3",
                speedup >= 3 and saving >= 3,
                f"{r['fwd+bwd (ms)']} ms, memory 1/{saving:.1f} of unfold's",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = default_argument_parser(description=__doc__, config="none", training=False)
    parser.add_argument("--train-json", help="COCO json of the training data of the speed table")
    parser.add_argument("--train-images", help="its image folder")
    parser.add_argument(
        "--weights", help="a checkpoint whose network detects (default: trains one, 300 iterations)"
    )
    parser.add_argument("--batch", type=int, default=8, help="batch of the real-data table")
    parser.add_argument("--amp-batch", type=int, default=8, help="batch of the R-50 AMP table")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--quick", action="store_true", help="tiny settings (a smoke run of this script)"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["pytest", "training", "amp", "pairwise"]
    )
    parser.add_argument("--output", help="also write the table's rows to this JSON file")
    args = parser.parse_args(argv)
    if bool(args.train_json) != bool(args.train_images):
        parser.error("--train-json and --train-images go together")

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        if "pytest" not in args.skip:
            rows += pytest_part(args)
        if "training" not in args.skip:
            rows += training_part(args, scratch)
        if "amp" not in args.skip:
            rows += amp_part(args, scratch)
        if "pairwise" not in args.skip:
            rows += pairwise_part(args, scratch)
    headers = ["check", "measured", "target", "status", "detail"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    if args.output:
        with atomic_open(args.output, "w") as f:
            json.dump([dict(zip(headers, r)) for r in rows], f, indent=2)
    return 0 if all(r[3] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
