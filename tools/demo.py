#!/usr/bin/env python
r"""Run a trained model on images and draw its predictions.

    python tools/demo.py --config-file configs/quickstart/boxteacher_shapes.yaml \
        --input photo.jpg more_photos/ "shots/*.png" --output demo_out \
        [--confidence-threshold 0.5] MODEL.WEIGHTS output/quickstart_boxteacher/model_final.pth

Each input is an image file, a folder (its image files, not recursive) or a glob pattern. Every
image is read with OpenCV, resized to the config's test size (``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``) as the evaluation does, and given to the model alone; BoxTeacher predicts
with the network it evaluates with (the teacher unless ``MODEL.BOX_TEACHER.USE_TEACHER_INFERENCE``
is False). The detections scoring at least ``--confidence-threshold`` are drawn (mask fill,
outline, "class score" tag; class names come from the metadata of ``DATASETS.TEST[0]``) into
``OUTPUT/<input stem>.png``, and written in COCO results format to ``OUTPUT/results.json``: one
dict per detection with ``file_name``, ``image_id`` (1-based position among the pictures),
``category_id`` (the dataset's id), ``bbox`` (XYWH), ``score`` and ``segmentation`` (RLE).
Unreadable images are skipped with a warning; the tool fails if none could be read.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

from boxteacher.demo import RESULTS_FILE, run_demo
from boxteacher.engine import Predictor, default_argument_parser, setup_config, setup_tool_logging

CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = default_argument_parser(description=__doc__, config="required", training=False)
    parser.add_argument(
        "--input", required=True, nargs="+", help="image files, folders or glob patterns"
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder for the pictures and results.json"
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="smallest score of a detection to draw and record (default 0.5)",
    )
    args = parser.parse_args(argv)
    for item in args.input:
        if CONFIG_KEY.fullmatch(item) and not os.path.exists(item):
            parser.error(
                f"'{item}' was read as an input image: put config overrides after --output DIR."
            )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_tool_logging()
    cfg = setup_config(args.config_file, args.opts)
    try:
        predictor = Predictor(cfg)
        pictures, detections, skipped = run_demo(
            predictor, args.input, args.output, args.confidence_threshold
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from e
    print(
        f"Wrote {pictures} pictures and {detections} detections ({args.output}/{RESULTS_FILE}) "
        f"to {args.output}; {skipped} inputs skipped."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
