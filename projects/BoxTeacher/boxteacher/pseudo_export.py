"""Pseudo masks for the boxes of a COCO file: a trained teacher labels every box with the mask of
the detection assigned to it through ``BoxTeacher.pseudo_label``, the path of a training step, at
the image's own resolution.

The output is the input COCO dict with, in every non-crowd annotation:

* ``pseudo_mask_score``: the pseudo-mask weight of training, sqrt(sqrt(c) * m) for the assigned
  detection of FCOS score c and mean foreground probability m (``mask_scores`` of the teacher
  protocol); 0 when no detection was assigned;
* ``pseudo_mask_matched``: whether the box got a mask: a detection was assigned, its binarised
  mask is not empty and its score is at least ``ExportSettings.min_score``;
* ``segmentation``: the assigned mask as an RLE (``counts`` a str) when matched; otherwise the
  key is absent (a box-only annotation, which pycocotools and ``data.coco`` read), or with
  ``box_fallback`` the mask of the box.

Crowd annotations, every other field and every image are kept unchanged; the input's own masks
are never shown to the network.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from .data import image_io
from .data.rle import encode_rle
from .modeling.layers import boxes_to_masks

logger = logging.getLogger(__name__)

# After this many images in a row that cannot be read, the image folder is probably wrong.
MAX_CONSECUTIVE_UNREADABLE = 10
# How many annotation ids a summary warning lists.
_LISTED_IDS = 5


@dataclass(frozen=True)
class ExportSettings:
    """What the export keeps of the pseudo labels of training.

    mask_threshold: binarises pseudo masks given as probabilities (soft pseudo masks of
        training; ``MODEL.BOX_TEACHER.TEACHER_MASK_THRESHOLD``); binary ones are kept as they are.
    min_score: boxes whose pseudo-mask score is below this count as unmatched.
    box_fallback: an unmatched box gets the mask of its box instead of no mask.
    image_format: channel order the network expects ("BGR" or "RGB").
    log_period_s: a progress line at most this often.
    """

    mask_threshold: float = 0.5
    min_score: float = 0.0
    box_fallback: bool = False
    image_format: str = "BGR"
    log_period_s: float = 30.0

    @classmethod
    def from_config(
        cls, cfg: Any, min_score: float = 0.0, box_fallback: bool = False
    ) -> "ExportSettings":
        """The settings of training's pseudo labels in ``cfg`` (mask threshold, image format)."""
        return cls(
            mask_threshold=cfg.MODEL.BOX_TEACHER.TEACHER_MASK_THRESHOLD,
            min_score=min_score,
            box_fallback=box_fallback,
            image_format=cfg.INPUT.FORMAT,
        )


def box_labels(
    labels: dict[str, torch.Tensor], settings: ExportSettings
) -> dict[str, torch.Tensor]:
    """What the export writes of one image's pseudo labels (``BoxTeacher.pseudo_label``: ``masks``
    (N, h, w), ``weights`` (N,), ``assigned`` (N,)): ``masks`` bool (N, h, w) (empty where no
    detection was assigned), ``scores`` (N,) the pseudo-mask weights (0 where none) and
    ``matched`` bool (N,)."""
    masks, scores = labels["masks"], labels["weights"]
    if masks.dtype != torch.bool:
        masks = masks > settings.mask_threshold
    matched = (
        (labels["assigned"] >= 0) & masks.flatten(1).any(dim=1) & (scores >= settings.min_score)
    )
    return {"masks": masks, "scores": scores, "matched": matched}


def box_mask_rle(box_xyxy: np.ndarray, height: int, width: int) -> dict[str, Any]:
    """RLE of the pixels whose centre is inside an XYXY box (the project's box masks)."""
    mask = boxes_to_masks(torch.as_tensor(box_xyxy, dtype=torch.float64)[None], (height, width))
    return encode_rle(mask)[0]


def clipped_xyxy(bbox: list[float], height: int, width: int) -> np.ndarray:
    """COCO [x, y, w, h] -> XYXY clipped to the image (float64 (4,))."""
    x, y, w, h = (float(v) for v in bbox)
    return np.clip([x, y, x + w, y + h], 0.0, [width, height, width, height])


class BoxLabel(NamedTuple):
    """What the export writes into one box's annotation."""

    segmentation: dict | None  # RLE of the pseudo mask when matched
    score: float  # the pseudo-mask weight of training (0 without detection)
    matched: bool


UNMATCHED = BoxLabel(None, 0.0, False)


@dataclass
class ExportResult:
    """The exported COCO dict and the files of the images that could not be read."""

    data: dict[str, Any]
    unreadable_images: list[str]


class PseudoMaskExporter:
    """Runs ``model.pseudo_label`` on the images of a COCO dict, each at its original resolution
    with its non-crowd boxes as ``instances``, and writes the assigned masks into the annotations
    (see the module docstring).

    Args:
        model: a BoxTeacher (``build.build_pseudo_labelling_model``: its teacher labels, with the
            pseudo-label settings of training).
        settings: what the export keeps.
    """

    def __init__(self, model: nn.Module, settings: ExportSettings = ExportSettings()):
        self.model = model
        self.settings = settings

    def export(self, data: dict[str, Any], image_root: str, batch_size: int = 1) -> ExportResult:
        """The exported copy of ``data`` (a COCO instances dict whose images are in ``image_root``);
        ``data`` is not modified. ``batch_size`` images go through the network together, those
        of one size in the same batches (a batch pads its images to a common size, which changes
        the detections a little, as in any batched inference)."""
        annotations = data["annotations"]
        positions = defaultdict(list)  # image id -> positions of its non-crowd annotations
        for position, ann in enumerate(annotations):
            if not ann.get("iscrowd", 0):
                positions[ann["image_id"]].append(position)
        with_boxes = sorted(
            (image for image in data["images"] if positions[image["id"]]),
            key=lambda image: (int(image["height"]), int(image["width"])),
        )
        reader = _ImageReader(image_root, self.settings.image_format)
        labels: dict[int, BoxLabel] = {}
        without_area: list = []
        progress = _Progress(len(with_boxes), self.settings.log_period_s)
        for chunk in _chunks(with_boxes, batch_size):
            batch = []  # (sample, positions of its boxes)
            for image in chunk:
                pixels = reader.read(image)
                if pixels is None:
                    continue
                image_positions = positions[image["id"]]
                sample, kept = _sample(image, pixels, [annotations[p] for p in image_positions])
                batch.append((sample, [image_positions[k] for k in kept]))
                without_area += [
                    annotations[p].get("id", f"#{p}")
                    for k, p in enumerate(image_positions)
                    if k not in kept
                ]
            if batch:
                labels.update(self._label(batch))
            progress.step(len(chunk))
        _summary(without_area, "box(es) without area inside their image got no pseudo mask")
        images = {image["id"]: image for image in data["images"]}
        exported = [
            self._exported_annotation(ann, labels.get(position, UNMATCHED), images[ann["image_id"]])
            for position, ann in enumerate(annotations)
        ]
        return ExportResult({**data, "annotations": exported}, reader.unreadable)

    def _label(self, batch: list[tuple[dict, list[int]]]) -> Iterator[tuple[int, BoxLabel]]:
        """(annotation position, label) of every box of a batch of (sample, box positions)."""
        labels = self.model.pseudo_label([sample for sample, _ in batch])
        for (_, positions), label in zip(batch, labels):
            out = box_labels(label, self.settings)
            rles = iter(encode_rle(out["masks"][out["matched"]]))
            for position, score, matched in zip(
                positions, out["scores"].tolist(), out["matched"].tolist()
            ):
                yield (
                    position,
                    BoxLabel(next(rles) if matched else None, float(score), bool(matched)),
                )

    def _exported_annotation(self, ann: dict, label: BoxLabel, image: dict) -> dict:
        if ann.get("iscrowd", 0):
            return ann
        out = {k: v for k, v in ann.items() if k != "segmentation"}
        out["pseudo_mask_score"] = label.score
        out["pseudo_mask_matched"] = label.matched
        if label.matched:
            out["segmentation"] = label.segmentation
        elif self.settings.box_fallback:
            height, width = int(image["height"]), int(image["width"])
            out["segmentation"] = box_mask_rle(
                clipped_xyxy(ann["bbox"], height, width), height, width
            )
        return out


class _ImageReader:
    """Reads the images of COCO entries (``read_image``), keeps the paths it could not read, and
    raises after ``MAX_CONSECUTIVE_UNREADABLE`` failures in a row (a wrong image folder)."""

    def __init__(self, image_root: str, image_format: str):
        self.image_root, self.image_format = image_root, image_format
        self.unreadable: list[str] = []
        self._failures_in_a_row = 0

    def read(self, image: dict) -> np.ndarray | None:
        path = os.path.join(self.image_root, image["file_name"])
        size = (int(image["height"]), int(image["width"]))
        pixels = image_io.read_image_or_warn(
            path, size, self.image_format, "its boxes get no pseudo mask"
        )
        if pixels is not None:
            self._failures_in_a_row = 0
            return pixels
        self.unreadable.append(path)
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= MAX_CONSECUTIVE_UNREADABLE:
            raise OSError(
                f"{self._failures_in_a_row} images in a row could not be read (the last: "
                f"'{path}'); "
                f"is the image folder '{self.image_root}' right?"
            )
        return None


def _sample(image: dict, pixels: np.ndarray, annotations: list[dict]) -> tuple[dict, list[int]]:
    """The model input of one image (data contract of ``modeling/meta_arch.py``, at the original
    resolution) and the indices of ``annotations`` whose clipped box has an area."""
    height, width = int(image["height"]), int(image["width"])
    boxes = np.array([clipped_xyxy(a["bbox"], height, width) for a in annotations]).reshape(-1, 4)
    kept = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()
    sample = {
        "image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
        "height": height,
        "width": width,
        "image_id": image["id"],
        "instances": {"boxes": torch.from_numpy(boxes[kept].astype(np.float32)).reshape(-1, 4)},
    }
    return sample, kept


def _chunks(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise ValueError(f"The batch size must be at least 1, got {size}.")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _summary(ann_ids: list, what: str) -> None:
    if ann_ids:
        listed = ", ".join(str(i) for i in ann_ids[:_LISTED_IDS])
        more = ", ..." if len(ann_ids) > _LISTED_IDS else ""
        logger.warning("%d %s (annotation ids %s%s).", len(ann_ids), what, listed, more)


class _Progress:
    """Logs "done/total images, rate, ETA" at most every ``period_s`` seconds, and at the end."""

    def __init__(self, total: int, period_s: float):
        self.total, self.period_s, self.done = total, period_s, 0
        self.start = self.last_log = time.perf_counter()

    def step(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last_log < self.period_s and self.done < self.total:
            return
        self.last_log = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        logger.info(
            "Pseudo masks: %d/%d images, %.2f images/s, ETA %s",
            self.done,
            self.total,
            rate,
            datetime.timedelta(seconds=round(eta)),
        )
