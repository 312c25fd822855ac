#!/usr/bin/env python
r"""Train and evaluate CondInst (masks: the upper bound), BoxInst and BoxTeacher (boxes) with the
same network, schedule, input size and seeds on one dataset; print a markdown table of mask AP,
AP50, AP75, box AP, the ratio to the mask AP of the same detector trained with masks and the wall
time (means over the seeds, mask AP with its standard deviation and the value of every seed), and
write it with the raw results to ``OUTPUT/results.json`` and ``OUTPUT/results.md``. Torchvision's
Mask R-CNN trains with masks (``maskrcnn``) or as BoxTeacher's student (``boxteacher_maskrcnn``).

    # the built-in shapes set on CPU (the quick-start network, 1000 iterations)
    python tools/benchmark_accuracy.py --dataset shapes --device cpu
    # a COCO-format dataset by path (json + images), a GPU-sized setting
    python tools/benchmark_accuracy.py --train-json a/train.json --train-images a/images \
        --test-json a/val.json --test-images a/images --depth 50 --iters 6000 --batch 8 \
        --min-size-train 480 512 544 576 608 --min-size-test 544 --max-size 1000 \
        --weights detectron2://ImageNetPretrained/MSRA/R-50.pkl [KEY VALUE ...]
    # mixed supervision: BoxInst and BoxTeacher also learn from the masks of 10 % of the images
    python tools/benchmark_accuracy.py --dataset shapes --device cpu --mask-fraction 0.1
    # Mask R-CNN from boxes and pseudo masks vs with masks vs CondInst BoxTeacher, 3 seeds
    python tools/benchmark_accuracy.py --methods maskrcnn boxteacher_maskrcnn boxteacher \
        --seeds 1 2 3
    # semi-supervised: 10 % and 30 % of the images labelled, the rest unlabelled, 3 seeds
    python tools/benchmark_accuracy.py --methods boxteacher --labeled-fractions 0.1 0.3 \
        --seeds 1 2 3 --device cpu

Every run is ``train_net.py`` on the quick-start configs of the methods
(``configs/quickstart/{condinst,boxinst,boxteacher}_shapes.yaml``,
``configs/maskrcnn/{maskrcnn,boxteacher_maskrcnn}_shapes.yaml``) with the options turned into
config overrides, in ``OUTPUT/METHOD`` (one seed) or ``OUTPUT/METHOD/seedN`` (several);
trailing ``KEY VALUE`` pairs are passed to every run (e.g.
``DATASETS.FLIP_CLASS_PAIRS`` for datasets with left/right classes). The warm-ups that the
configs scale with the schedule (LR 10 %, BoxInst pairwise 20 %, BoxTeacher pseudo losses 40 %,
LR drop at 80 %, BoxTeacher EMA horizon 10 %) follow ``--iters``. With ``--mask-fraction F`` the
box-supervised methods run with ``MODEL.BOXINST.GT_MASKS fraction`` (the masks of a seeded
fraction F of the training images); CondInst, the reference, keeps every mask.

With ``--labeled-fractions F ...`` (semi-supervised, Guided Distillation's setting), the training
json is split as ``tools/split_dataset.py`` splits it (``--split-seed``, the jsons in
``OUTPUT/splits``), and besides each method on all the training images every method trains on the
labelled F alone (``METHOD_<P>pct``); BoxTeacher then also trains on the labelled F plus the rest
without labels (``semi_boxteacher_<P>pct``): its labelled-only run of the same seed is the
pre-trained teacher (``MODEL.SEMI.TEACHER_WEIGHTS``), kept for half the schedule
(``MODEL.SEMI.BURN_IN_ITERS``). A second table gives, per fraction, the gain over the
labelled-only run and the share of the gap to all images labelled that it closes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from boxteacher.data import get_dataset_records, get_metadata
from boxteacher.data.split import split_coco, split_file_names
from boxteacher.engine import atomic_open, default_argument_parser, setup_tool_logging
from boxteacher.evaluation.seed_summary import seed_table, semi_supervised_table, summarise_seeds

REPO = Path(__file__).resolve().parents[1]
# name, supervision, config, and the method of the same detector trained with masks
# (the ratio's reference)
METHODS = {
    "condinst": ("CondInst", "masks", "configs/quickstart/condinst_shapes.yaml", "condinst"),
    "boxinst": ("BoxInst", "boxes", "configs/quickstart/boxinst_shapes.yaml", "condinst"),
    "boxteacher": ("BoxTeacher", "boxes", "configs/quickstart/boxteacher_shapes.yaml", "condinst"),
    "maskrcnn": ("Mask R-CNN", "masks", "configs/maskrcnn/maskrcnn_shapes.yaml", "maskrcnn"),
    "boxteacher_maskrcnn": (
        "BoxTeacher, Mask R-CNN student",
        "boxes",
        "configs/maskrcnn/boxteacher_maskrcnn_shapes.yaml",
        "maskrcnn",
    ),
}
DEFAULT_METHODS = ["condinst", "boxinst", "boxteacher"]
logger = logging.getLogger("boxteacher.benchmark_accuracy")


def dataset_overrides(args: argparse.Namespace) -> list[str]:
    """DATASETS.* (and the number of classes of a dataset given by path)."""
    if args.train_json:
        with open(args.train_json, "rb") as f:  # bytes: json detects a UTF-8 BOM
            num_classes = len(json.load(f)["categories"])
        register = [
            ["benchmark_train", args.train_json, args.train_images],
            ["benchmark_test", args.test_json, args.test_images],
        ]
        return [
            "DATASETS.REGISTER",
            repr(register),
            "DATASETS.TRAIN",
            "('benchmark_train',)",
            "DATASETS.TEST",
            "('benchmark_test',)",
            "MODEL.FCOS.NUM_CLASSES",
            str(num_classes),
        ]
    if args.dataset == "shapes":
        return []
    return [
        "DATASETS.TRAIN",
        f"('{args.dataset}_train',)",
        "DATASETS.TEST",
        f"('{args.dataset}_val',)",
    ]


def schedule_overrides(args: argparse.Namespace) -> list[str]:
    n = args.iters
    opts = [
        "SOLVER.MAX_ITER",
        str(n),
        "SOLVER.STEPS",
        f"({int(0.8 * n)},)",
        "SOLVER.WARMUP_ITERS",
        str(max(1, n // 10)),
        "SOLVER.CHECKPOINT_PERIOD",
        str(n),
        "SOLVER.IMS_PER_BATCH",
        str(args.batch),
        "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS",
        str(max(1, n // 5)),
        "MODEL.RESNETS.DEPTH",
        str(args.depth),
        "MODEL.WEIGHTS",
        args.weights,
        "MODEL.DEVICE",
        args.device,
    ]
    if args.depth != 18 or args.weights:  # standard widths instead of the quick start's narrow R-18
        res2 = 256 if args.depth >= 50 else 64
        opts += [
            "MODEL.RESNETS.STEM_OUT_CHANNELS",
            "64",
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            str(res2),
        ]
    if args.min_size_train:
        opts += ["INPUT.MIN_SIZE_TRAIN", str(tuple(args.min_size_train))]
    if args.min_size_test:
        opts += ["INPUT.MIN_SIZE_TEST", str(args.min_size_test)]
    if args.max_size:
        opts += [
            "INPUT.MAX_SIZE_TRAIN",
            str(args.max_size),
            "INPUT.MAX_SIZE_TEST",
            str(args.max_size),
        ]
    return opts


def method_overrides(method: str, args: argparse.Namespace) -> list[str]:
    opts = []
    if method in ("boxteacher", "boxteacher_maskrcnn"):
        opts += ["MODEL.BOX_TEACHER.WARMUP_ITERS", str(max(1, int(0.4 * args.iters)))]
    if args.mask_fraction is not None and METHODS[method][1] == "boxes":
        opts += [
            "MODEL.BOXINST.GT_MASKS",
            "fraction",
            "MODEL.BOXINST.GT_MASK_FRACTION",
            str(args.mask_fraction),
        ]
    return opts


def supervision(method: str, args: argparse.Namespace) -> str:
    """The table's supervision column: "masks", "boxes" or e.g. "boxes + 10% masks"."""
    kind = METHODS[method][1]
    if args.mask_fraction is None or kind == "masks":
        return kind
    return f"{kind} + {args.mask_fraction:.0%} masks"


def final_results(output_dir: Path) -> dict[str, float]:
    """The last evaluation logged in ``metrics.json``."""
    results = {}
    with open(output_dir / "metrics.json", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "segm/AP" in record:
                results = record
    if not results:
        raise RuntimeError(f"{output_dir}/metrics.json holds no evaluation")
    return results


@dataclass(frozen=True)
class Variant:
    """A method trained on other data than all the training images: ``key`` and ``supervision``
    of its rows, ``overrides`` (datasets, teacher) after the method's own."""

    key: str
    supervision: str
    overrides: tuple[str, ...]


def run_method(
    method: str,
    seed: int,
    args: argparse.Namespace,
    common: list[str],
    variant: Variant | None = None,
) -> dict:
    """One training and evaluation; its results (rounded to 0.1) and its command."""
    name, _, config, _ = METHODS[method]
    key = variant.key if variant else method
    run_name = key if len(args.seeds) == 1 else f"{key}/seed{seed}"
    output_dir = Path(args.output_dir) / run_name
    command = [
        sys.executable,
        str(REPO / "train_net.py"),
        "--config-file",
        str(REPO / config),
        "--num-gpus",
        str(args.num_gpus),
        *common,
        *method_overrides(method, args),
        *(variant.overrides if variant else ()),
        "SEED",
        str(seed),
        "OUTPUT_DIR",
        str(output_dir),
        *args.opts,
    ]
    logger.info("%s (%s), seed %d: %s", name, key, seed, " ".join(command))
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(output_dir / "train.log", "w", encoding="utf-8") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    minutes = (time.perf_counter() - start) / 60
    metrics = final_results(output_dir)
    return {
        "key": key,
        "method": name,
        "supervision": variant.supervision if variant else supervision(method, args),
        "seed": seed,
        "wall_minutes": round(minutes, 1),
        **{key: round(metrics[f"segm/{key}"], 1) for key in ("AP", "AP50", "AP75")},
        "box_AP": round(metrics["bbox/AP"], 1),
        "reference": METHODS[method][3],
        "command": " ".join(command),
        "output_dir": str(output_dir),
    }


def split_overrides(args: argparse.Namespace) -> dict[float, tuple[list[str], list[str]]]:
    """Per labelled fraction, the overrides that train on its labelled images and those that
    add the unlabelled rest, the split written into ``OUTPUT/splits``."""
    if args.train_json:
        json_file, image_root = args.train_json, args.train_images
        registered = [
            ["benchmark_train", args.train_json, args.train_images],
            ["benchmark_test", args.test_json, args.test_images],
        ]
    else:
        train = f"{args.dataset}_train"
        get_dataset_records(train)  # a built-in set (shapes) is generated on first use
        metadata = get_metadata(train)
        json_file, image_root = metadata.json_file, metadata.image_root
        registered = []
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    with open(json_file, "rb") as f:
        data = json.load(f)
    folder = Path(args.output_dir) / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for fraction in args.labeled_fractions:
        split = split_coco(data, fraction, args.split_seed)
        paths = [str(folder / n) for n in split_file_names(json_file, fraction, args.split_seed)]
        for path, part in zip(paths, (split.labeled, split.unlabeled)):
            with atomic_open(path, "w") as f:
                json.dump(part, f)
        tag = f"{fraction * 100:g}pct"
        labeled = [
            "DATASETS.REGISTER",
            repr(registered + [[f"labeled_{tag}", paths[0], image_root]]),
            "DATASETS.TRAIN",
            f"('labeled_{tag}',)",
        ]
        unlabeled = [
            "DATASETS.REGISTER_UNLABELED",
            repr([[f"unlabeled_{tag}", paths[1], image_root]]),
            "DATASETS.UNLABELED",
            f"('unlabeled_{tag}',)",
        ]
        logger.info(
            "%g of %s: %d labelled, %d unlabelled images (seed %d)",
            fraction,
            json_file,
            len(split.labeled["images"]),
            len(split.unlabeled["images"]),
            args.split_seed,
        )
        out[fraction] = (labeled, unlabeled)
    return out


def seed_runs(
    seed: int, args: argparse.Namespace, common: list[str], splits: dict
) -> Iterator[dict]:
    """The runs of one seed: every method on all the training images, then per labelled
    fraction on the labelled part alone and (BoxTeacher) with the unlabelled rest, whose teacher
    is the labelled-only run."""
    if not args.only_fractions:
        for method in args.methods:
            yield run_method(method, seed, args, common)
    for fraction, (labeled, unlabeled) in splits.items():
        tag = f"{fraction * 100:g}pct"
        for method in args.methods:
            share = f"{supervision(method, args)}, {fraction:.0%} of the images"
            alone = Variant(f"{method}_{tag}", share, tuple(labeled))
            run = run_method(method, seed, args, common, alone)
            yield run
            if method != "boxteacher":
                continue
            teacher = [
                "MODEL.SEMI.TEACHER_WEIGHTS",
                str(Path(run["output_dir"]) / "model_final.pth"),
                "MODEL.SEMI.BURN_IN_ITERS",
                str(max(1, args.iters // 2)),
            ]
            semi = Variant(
                f"semi_{method}_{tag}",
                f"{share}, the rest unlabelled",
                tuple(labeled + unlabeled + teacher),
            )
            yield run_method(method, seed, args, common, semi)


def main(argv: list[str] | None = None) -> int:
    parser = default_argument_parser(description=__doc__, config="none", training=False)
    data = parser.add_argument_group(
        "dataset: a registered name, or a COCO json + image folder per split"
    )
    data.add_argument(
        "--dataset", default="shapes", help="name with _train / _val splits (default: shapes)"
    )
    data.add_argument("--train-json")
    data.add_argument("--train-images")
    data.add_argument("--test-json")
    data.add_argument("--test-images")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument(
        "--depth", type=int, default=18, choices=(18, 34, 50, 101), help="ResNet depth"
    )
    parser.add_argument("--weights", default="", help="MODEL.WEIGHTS (default: from scratch)")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--min-size-train", type=int, nargs="+", help="shortest-edge sizes of training"
    )
    parser.add_argument("--min-size-test", type=int)
    parser.add_argument("--max-size", type=int, help="longest-edge cap, training and test")
    parser.add_argument(
        "--seeds",
        "--seed",
        type=int,
        nargs="+",
        default=[1],
        help="SEED of the runs of every method",
    )
    parser.add_argument(
        "--mask-fraction",
        type=float,
        metavar="F",
        help="BoxInst and BoxTeacher also learn from the masks of this fraction of the "
        "training images (MODEL.BOXINST.GT_MASKS fraction); CondInst keeps all",
    )
    parser.add_argument(
        "--labeled-fractions",
        type=float,
        nargs="+",
        default=[],
        metavar="F",
        help="semi-supervised: also train on a seeded fraction F of the training images alone "
        "and (BoxTeacher) with the rest unlabelled",
    )
    parser.add_argument(
        "--split-seed", type=int, default=1, help="seed of the labelled/unlabelled split"
    )
    parser.add_argument(
        "--only-fractions",
        action="store_true",
        help="with --labeled-fractions: skip the runs on all the training images (e.g. when "
        "their figures exist)",
    )
    parser.add_argument("--device", default="auto", help="MODEL.DEVICE")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--output-dir", default="output/benchmark_accuracy")
    args = parser.parse_args(argv)
    by_path = [args.train_json, args.train_images, args.test_json, args.test_images]
    if any(by_path) and not all(by_path):
        parser.error(
            "a dataset by path needs --train-json, --train-images, --test-json and --test-images"
        )
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")
    if args.mask_fraction is not None and not 0.0 <= args.mask_fraction <= 1.0:
        parser.error(f"--mask-fraction must be in [0, 1], not {args.mask_fraction}")
    if args.only_fractions and not args.labeled_fractions:
        parser.error("--only-fractions needs --labeled-fractions")
    if not all(0.0 < f < 1.0 for f in args.labeled_fractions):
        parser.error(f"--labeled-fractions must be in (0, 1), got {args.labeled_fractions}")
    setup_tool_logging()

    os.makedirs(args.output_dir, exist_ok=True)
    common = dataset_overrides(args) + schedule_overrides(args)
    splits = split_overrides(args) if args.labeled_fractions else {}
    runs = []
    for seed in args.seeds:  # every run of a seed before the next; results written after each
        for run in seed_runs(seed, args, common, splits):
            runs.append(run)
            table = write_results(args, runs)
    print(table)
    return 0


def write_results(args: argparse.Namespace, runs: list[dict]) -> str:
    """``results.json`` (settings, summary rows, runs) and ``results.md`` (the table) of the runs so
    far; the table."""
    rows = summarise_seeds(runs)
    table = seed_table(rows)
    semi = semi_supervised_table(rows)
    if semi:
        table += "\n\n" + semi
    with atomic_open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "results": rows, "runs": runs}, f, indent=2)
    with atomic_open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
