"""Pictures and COCO results of a model's predictions on image files (``tools/demo.py``).

Each input is an image file, a folder (its image files, not recursive) or a glob pattern. Every
image is read with its EXIF orientation applied (``data.image_io.read_image``) and given to a
``Predictor`` alone (resized to the config's test size as the evaluation does). The detections
scoring at least the threshold are drawn (mask fill, outline, "class score" tag; class names
come from the metadata of ``DATASETS.TEST[0]``) into ``OUTPUT/<input stem>.png``, and written in
COCO results format to ``OUTPUT/results.json``: one dict per detection with ``file_name``,
``image_id`` (1-based position among the pictures), ``category_id`` (the dataset's id),
``bbox`` (XYWH), ``score`` and ``segmentation`` (RLE). Unreadable images are skipped with a
warning.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from .config import CfgNode
from .data import get_metadata, is_registered
from .data.image_io import IMAGE_EXTENSIONS, read_image_or_warn
from .engine.checkpoint import atomic_open
from .engine.predictor import Predictor
from .evaluation.coco_evaluation import instances_to_coco_json
from .utils.visualizer import draw_instances, save_png

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


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
            logger.warning(
                "No class names from dataset '%s' (%s): labels are drawn as numbers.", name, e
            )
            return fallback
        json_ids = sorted(to_contiguous, key=to_contiguous.get)
        if len(names) != num_classes or [to_contiguous[i] for i in json_ids] != list(
            range(num_classes)
        ):
            logger.warning(
                "Dataset '%s' has %d classes but MODEL.FCOS.NUM_CLASSES is %d: labels are drawn "
                "as numbers.",
                name,
                len(names),
                num_classes,
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
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(item, name))
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


def draw(
    image_bgr: np.ndarray, instances: dict[str, torch.Tensor], classes: ClassNames
) -> np.ndarray:
    """RGB uint8 (H, W, 3) picture of ``instances`` (most confident first, as ``confident``
    gives them; masks (N, H, W)) on the image; the most confident detections are drawn last, so
    that their masks and tags are on top (a reversed view of the masks, not a copy)."""
    return draw_instances(
        cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB),
        masks=instances["masks"].numpy()[::-1],
        labels=[classes.names[k] for k in instances["labels"].tolist()][::-1],
        scores=instances["scores"].tolist()[::-1],
    )


def run_demo(
    predictor: Predictor, inputs: Sequence[str], output_dir: str, threshold: float
) -> tuple[int, int, int]:
    """Draw and record the predictions of ``predictor`` on every readable input image (see the
    module docstring); returns the numbers of pictures written, detections recorded and inputs
    skipped. Raises ``FileNotFoundError`` when no input names an image file or none can be read."""
    paths = expand_inputs(inputs)
    if not paths:
        raise FileNotFoundError(f"No image files found in the inputs {list(inputs)}.")
    classes = ClassNames.from_config(predictor.cfg)
    results: list[dict] = []
    pictures = 0
    for path, name in zip(paths, unique_output_names(paths)):
        image = read_image_or_warn(path)
        if image is None:
            continue
        pictures += 1
        instances = confident(predictor(image), threshold)
        save_png(os.path.join(output_dir, name), draw(image, instances, classes))
        for result in instances_to_coco_json(instances, pictures, classes.json_ids):
            results.append({"file_name": path, **result})
        logger.info("%s: %d detections -> %s", path, len(instances["scores"]), name)
    if not pictures:
        raise FileNotFoundError(
            f"None of the {len(paths)} input images could be read (see the warnings above)."
        )
    with atomic_open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f)
    return pictures, len(results), len(paths) - pictures
