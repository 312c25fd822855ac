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
import glob
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from boxteacher.build import build_model
from boxteacher.config import CfgNode, load_config
from boxteacher.data import ResizeFlip, get_metadata, image_io, is_registered, register_datasets_from_config, resized_shape
from boxteacher.engine.checkpoint import Checkpointer, atomic_open
from boxteacher.evaluation.coco_evaluation import instances_to_coco_json
from boxteacher.utils.visualizer import draw_instances, save_png

logger = logging.getLogger("boxteacher.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RESULTS_FILE = "results.json"
CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")


@dataclass(frozen=True)
class ClassNames:
    """What the drawing and the results file call the model's contiguous labels 0..K-1."""

    names: list[str]
    json_ids: list[int]

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "ClassNames":
        """Names and json ids of ``DATASETS.TEST[0]``, else the label itself as both."""
        num_classes = cfg.MODEL.FCOS.NUM_CLASSES
        fallback = cls([str(k) for k in range(num_classes)], list(range(num_classes)))
        if not cfg.DATASETS.TEST or not is_registered(cfg.DATASETS.TEST[0]):
            return fallback
        name = cfg.DATASETS.TEST[0]
        try:
            metadata = get_metadata(name)
            names = list(metadata.thing_classes)
            to_contiguous = dict(metadata.thing_dataset_id_to_contiguous_id)
        except (OSError, AttributeError, ValueError) as e:
            logger.warning("No class names from dataset '%s' (%s): labels are drawn as numbers.", name, e)
            return fallback
        json_ids = sorted(to_contiguous, key=to_contiguous.get)
        if len(names) != num_classes or [to_contiguous[i] for i in json_ids] != list(range(num_classes)):
            logger.warning(
                "Dataset '%s' has %d classes but MODEL.FCOS.NUM_CLASSES is %d: labels are drawn as numbers.",
                name, len(names), num_classes,
            )
            return fallback
        return cls(names, json_ids)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Image paths of files, folders (their image files, sorted) and glob patterns, in order and
    without repeats. A named file is kept even if missing, so that it is reported as unreadable."""
    paths: dict[str, str] = {}  # absolute path -> path as found, in order
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name) for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, name))
            )
        elif any(char in item for char in "*?["):
            found = sorted(path for path in glob.glob(item) if os.path.isfile(path))
        else:
            found = [item]
        if not found:
            logger.warning("No image files in '%s'.", item)
        for path in found:
            paths.setdefault(os.path.abspath(path), path)
    return list(paths.values())


def unique_output_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.png`` per path; repeated stems get ``_1``, ``_2``, ... suffixes."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = f"{stem}.png", 0
        while name in taken:
            k += 1
            name = f"{stem}_{k}.png"
        taken.add(name)
        names.append(name)
    return names


def model_input(image_bgr: np.ndarray, cfg: CfgNode) -> dict:
    """The model input of one BGR uint8 (H, W, 3) image, as the test-time ``DatasetMapper``
    makes it: resized by the shortest edge, channels in ``INPUT.FORMAT``, (3, h, w) uint8."""
    height, width = image_bgr.shape[:2]
    new_size = resized_shape(height, width, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    image = image_bgr if cfg.INPUT.FORMAT == "BGR" else cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    image = ResizeFlip(height, width, *new_size).apply_image(image)
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return {"image": tensor, "height": height, "width": width}


def confident(instances: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """The detections scoring at least ``threshold``, most confident first, on the CPU. The
    selection and the order take one indexing, none when they keep every detection in place
    (the masks of a large image weigh 100 MB each)."""
    scores = instances["scores"]
    order = scores.argsort(descending=True, stable=True)
    order = order[scores[order] >= threshold]
    if torch.equal(order, torch.arange(len(scores), device=order.device)):
        return {key: value.cpu() for key, value in instances.items()}
    return {key: value[order].cpu() for key, value in instances.items()}


def draw(image_bgr: np.ndarray, instances: dict[str, torch.Tensor], classes: ClassNames) -> np.ndarray:
    """RGB uint8 (H, W, 3) picture of ``instances`` (most confident first, as ``confident``
    gives them; masks (N, H, W)) on the image; the most confident detections are drawn last, so
    that their masks and tags are on top (a reversed view of the masks, not a copy)."""
    return draw_instances(
        cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB),
        masks=instances["masks"].numpy()[::-1],
        labels=[classes.names[k] for k in instances["labels"].tolist()][::-1],
        scores=instances["scores"].tolist()[::-1],
    )


def load_model(cfg: CfgNode) -> nn.Module:
    model = build_model(cfg)
    Checkpointer(model).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    return model.eval()


def read_image(path: str) -> np.ndarray | None:
    """BGR uint8 (H, W, 3), read by the data loader's reader (``image_io.read_image``; with no
    json size, its EXIF orientation applied); None, with a warning, if unreadable or truncated."""
    try:
        return image_io.read_image(path)
    except image_io.UnreadableImageError as e:
        logger.warning("%s; skipping it.", e)
        return None


def run(cfg: CfgNode, inputs: Sequence[str], output_dir: str, threshold: float) -> tuple[int, int, int]:
    """Draw and record the predictions on every readable input image; returns the numbers of
    pictures written, detections recorded and inputs skipped."""
    paths = expand_inputs(inputs)
    if not paths:
        raise SystemExit(f"No image files found in the inputs {list(inputs)}.")
    register_datasets_from_config(cfg)
    classes = ClassNames.from_config(cfg)
    model = load_model(cfg)
    results: list[dict] = []
    pictures = 0
    for path, name in zip(paths, unique_output_names(paths)):
        image = read_image(path)
        if image is None:
            continue
        pictures += 1
        with torch.no_grad():
            instances = model([model_input(image, cfg)])[0]["instances"]
        instances = confident(instances, threshold)
        save_png(os.path.join(output_dir, name), draw(image, instances, classes))
        for result in instances_to_coco_json(instances, pictures, classes.json_ids):
            results.append({"file_name": path, **result})
        logger.info("%s: %d detections -> %s", path, len(instances["scores"]), name)
    if not pictures:
        raise SystemExit(f"None of the {len(paths)} input images could be read (see the warnings above).")
    with atomic_open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f)
    return pictures, len(results), len(paths) - pictures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a YAML config")
    parser.add_argument("--input", required=True, nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the pictures and results.json")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="smallest score of a detection to draw and record (default 0.5)")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    args = parser.parse_args(argv)
    for item in args.input:
        if CONFIG_KEY.fullmatch(item) and not os.path.exists(item):
            parser.error(f"'{item}' was read as an input image: put config overrides after --output DIR.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        raise SystemExit("MODEL.WEIGHTS is empty: name the checkpoint to run, e.g. MODEL.WEIGHTS model_final.pth.")
    pictures, detections, skipped = run(cfg, args.input, args.output, args.confidence_threshold)
    print(f"Wrote {pictures} pictures and {detections} detections ({args.output}/{RESULTS_FILE}) "
          f"to {args.output}; {skipped} inputs skipped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
