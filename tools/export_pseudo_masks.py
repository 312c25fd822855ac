#!/usr/bin/env python
"""Label the boxes of a COCO json with the masks of a trained teacher.

    python tools/export_pseudo_masks.py --config-file C --json boxes.json --images DIR \\
        --output out.json [--score-threshold 0.0] [--box-fallback] [--batch-size 1] \\
        [KEY VALUE ...]

The model of the config (with ``MODEL.WEIGHTS``) labels every non-crowd box through
``BoxTeacher.pseudo_label``, the path of training: a BoxTeacher model with its teacher, a CondInst /
BoxInst model with the network itself (its checkpoint loads into both networks of a BoxTeacher).
Each image is read with OpenCV at its original resolution, the network
resizes it to ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, and every box gets the mask of the
detection that training's box-based assignment gives it (``MODEL.BOX_TEACHER.IOU_THR``,
``SCORE_THR``, detections ranked by the mask-aware score), refined with the guided filter when
``MODEL.BOX_TEACHER.REFINE_RADIUS`` > 0 and binarised at
``MODEL.BOX_TEACHER.TEACHER_MASK_THRESHOLD``. The network runs in eval mode (running BN
statistics, as at evaluation). ``--batch-size N`` runs N images at a time, images of one size
together; images of different sizes are padded to a common size, which changes the detections a
little (as in any batched inference), so the default is 1.

``out.json`` is the input with, in every non-crowd annotation, ``pseudo_mask_score`` (the
pseudo-mask weight of training), ``pseudo_mask_matched`` and, when matched, ``segmentation`` (RLE).
A box is unmatched when no detection is assigned to it, its mask is empty or its score is below
``--score-threshold``: its ``segmentation`` is then left out, or with ``--box-fallback`` is the
mask of the box. The input's masks are never shown to the network. An image that cannot be read
is reported with a warning and its boxes are unmatched; 10 such images in a row stop the export.

Printed and written to ``out.report.json``: the fraction of matched boxes and, where the input
has masks, the mean mask IoU of the exported masks with them, overall and per category.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from boxteacher.build import build_pseudo_labelling_model
from boxteacher.data.coco import load_coco_json
from boxteacher.engine import (
    atomic_open,
    build_trained_model,
    default_argument_parser,
    setup_config,
    setup_tool_logging,
)
from boxteacher.evaluation.pseudo_mask_iou import pseudo_mask_report, report_table
from boxteacher.pseudo_export import ExportSettings, PseudoMaskExporter


def report_path(output: str) -> str:
    """``out.json`` -> ``out.report.json``, next to it."""
    return os.path.splitext(output)[0] + ".report.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = default_argument_parser(description=__doc__, config="required", training=False)
    parser.add_argument(
        "--json", required=True, help="COCO instances json whose boxes are labelled"
    )
    parser.add_argument(
        "--images", required=True, help="folder of its images (file_name is relative to it)"
    )
    parser.add_argument("--output", required=True, help="COCO json to write")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.0,
        help="boxes whose pseudo-mask score is below this are unmatched (default 0)",
    )
    parser.add_argument(
        "--box-fallback", action="store_true", help="unmatched boxes get the mask of their box"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    args = parser.parse_args(argv)
    if os.path.realpath(args.output) == os.path.realpath(args.json):
        parser.error("--output must differ from --json (the input is kept as it is)")
    if not os.path.isdir(args.images):
        parser.error(f"--images '{args.images}' is not a folder")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_tool_logging()
    cfg = setup_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        raise SystemExit(
            "No weights: add MODEL.WEIGHTS path/to/model_final.pth to the command line."
        )
    load_coco_json(args.json, args.images)  # errors name the file and the bad entry
    with open(args.json, "rb") as f:
        data = json.load(f)

    model = build_trained_model(cfg, build_pseudo_labelling_model)
    result = PseudoMaskExporter(
        model, ExportSettings.from_config(cfg, args.score_threshold, args.box_fallback)
    ).export(data, args.images, args.batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_open(args.output, "w") as f:
        json.dump(result.data, f)

    report = {
        "json": args.json,
        "output": args.output,
        "weights": cfg.MODEL.WEIGHTS,
        "score_threshold": args.score_threshold,
        "box_fallback": args.box_fallback,
        "unreadable_images": result.unreadable_images,
        **pseudo_mask_report(data, result.data),
    }
    with atomic_open(report_path(args.output), "w") as f:
        json.dump(report, f, indent=2)
    print(report_table(report))
    print(
        f"Wrote {args.output} ({report['matched']} of {report['boxes']} boxes matched, "
        f"{len(result.unreadable_images)} unreadable images) and {report_path(args.output)}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
