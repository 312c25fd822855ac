#!/usr/bin/env python
"""Split a COCO instances json into a labelled fraction of its images and the unlabelled rest,
for semi-supervised training.

    python tools/split_dataset.py --json datasets/coco/annotations/instances_train2017.json \
        --fraction 0.1 --seed 1 --output-dir datasets/coco/annotations/semi

writes ``<stem>_10pct_seed1_labeled.json`` (the chosen images and their annotations) and
``<stem>_10pct_seed1_unlabeled.json`` (the other images, no annotations) into the output folder
(default: next to the input), and prints the counts. The images are drawn with the seed: the same
json, fraction and seed give the same split. The input is read as training reads it first
(errors name the file and the bad entry).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

from boxteacher.data.coco import load_coco_json
from boxteacher.data.split import split_coco, split_file_names
from boxteacher.engine import atomic_open, default_argument_parser, setup_tool_logging

logger = logging.getLogger("boxteacher.split_dataset")
# Labelled image ids shown in the log.
_LOGGED_IDS = 10


def main(argv: Sequence[str] | None = None) -> int:
    parser = default_argument_parser(
        description=__doc__, config="none", overrides=False, training=False
    )
    parser.add_argument("--json", required=True, help="COCO instances json to split")
    parser.add_argument("--fraction", type=float, required=True, help="labelled share, in (0, 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the draw (default 1)")
    parser.add_argument("--output-dir", help="folder of the two jsons (default: the input's)")
    args = parser.parse_args(argv)
    setup_tool_logging()

    load_coco_json(args.json, os.path.dirname(args.json))  # errors name the file and the entry
    with open(args.json, "rb") as f:
        data = json.load(f)
    try:
        split = split_coco(data, args.fraction, args.seed)
    except ValueError as e:
        parser.error(f"{args.json}: {e}")
    output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(output_dir, exist_ok=True)
    paths = [
        os.path.join(output_dir, name)
        for name in split_file_names(args.json, args.fraction, args.seed)
    ]
    for path, part in zip(paths, (split.labeled, split.unlabeled)):
        with atomic_open(path, "w") as f:
            json.dump(part, f)
    ids = split.labeled_image_ids
    logger.info(
        "Split %s with fraction %g and seed %d; labelled image ids: %s%s",
        args.json,
        args.fraction,
        args.seed,
        ids[:_LOGGED_IDS],
        " ..." if len(ids) > _LOGGED_IDS else "",
    )
    print(
        f"{len(split.labeled['images'])} labelled images ({len(split.labeled['annotations'])} "
        f"annotations) -> {paths[0]}\n{len(split.unlabeled['images'])} unlabelled images -> "
        f"{paths[1]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
