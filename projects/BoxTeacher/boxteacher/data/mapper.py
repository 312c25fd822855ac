"""Dataset record -> model input (the data contract of ``modeling/meta_arch.py``).

Output of ``DatasetMapper(record, rng)``::

    {"file_name", "image_id", "height", "width" (the ORIGINAL size, from the record),
     "image": uint8 tensor [3, H, W] (resized, maybe flipped, channel order = image_format),
     "aug_image" (training with a student view): the same image with perturbed colours only,
     "instances" (training only): {"boxes": float32 [N, 4] XYXY absolute in the resized frame,
                                   "labels": int64 [N] (0..K-1),
                                   "masks": bool [N, H, W] (only if with_masks),
                                   "has_mask": bool [N] (only if masks_optional)}}
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ..config.architecture import ArchitectureSpec
from ..config.supervision import gt_mask_mode
from ..geometry import resized_shape
from .catalog import get_metadata
from .coco_segmentation import segmentation_to_mask
from .color_augment import AUG_TYPES, perturb_colors
from .image_io import UnreadableImageError, read_image
from .transforms import ResizeFlip, clip_boxes, sample_short_edge

logger = logging.getLogger(__name__)

# Boxes whose width or height is at most this (after transform and clipping) are dropped.
_MIN_BOX_SIDE = 1e-5


class DatasetMapper:
    """Reads, resizes and (in training) flips one image and transforms its annotations.

    Training drops crowd annotations and degenerate boxes; on a flip, labels are swapped
    through ``flip_class_map`` (left/right classes). With ``student_aug`` (a student view), the
    geometric transform is shared by two views: ``image`` and its colour-perturbed copy
    ``aug_image`` (or, without ``student_aug_separate``, the perturbed view replaces ``image``).
    All randomness comes from the ``rng`` argument, so a record and a generator state give one
    output. The record is not modified.

    With ``with_masks`` every instance needs a segmentation; with ``masks_optional`` too
    (mixed supervision), an instance without one gets an all-False mask row (no mask is made
    from its box) and ``has_mask`` tells which rows hold a non-empty annotation mask.
    """

    def __init__(
        self,
        is_train: bool,
        *,
        min_sizes: Sequence[int],
        max_size: int,
        size_sampling: str = "choice",
        hflip: bool = True,
        image_format: str = "BGR",
        with_masks: bool = True,
        masks_optional: bool = False,
        flip_class_map: dict[int, int] | None = None,
        student_aug: str = "none",
        student_aug_separate: bool = True,
    ) -> None:
        if size_sampling not in ("choice", "range"):
            raise ValueError(f"size_sampling must be 'choice' or 'range', not '{size_sampling}'.")
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', not '{image_format}'.")
        if not min_sizes:
            raise ValueError("min_sizes must hold at least one size.")
        self.is_train = is_train
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)
        self.size_sampling = size_sampling
        self.hflip = hflip and is_train
        self.image_format = image_format
        if masks_optional and not with_masks:
            raise ValueError("masks_optional needs with_masks: optional masks are still masks.")
        self.with_masks = with_masks
        self.masks_optional = masks_optional
        self.flip_class_map = dict(flip_class_map or {})
        if student_aug not in AUG_TYPES:
            raise ValueError(
                f"Unknown INPUT.AUG_TYPE '{student_aug}'; expected one of {AUG_TYPES}."
            )
        self.student_aug = student_aug if is_train else "none"
        self.student_aug_separate = student_aug_separate

    @classmethod
    def from_config(
        cls,
        cfg,
        is_train: bool,
        dataset_names: Sequence[str] | None = None,
        spec: ArchitectureSpec | None = None,
    ) -> "DatasetMapper":
        """The mapper of ``cfg.INPUT``; the flip class map is read from the classes of
        ``dataset_names`` (default ``cfg.DATASETS.TRAIN``). Training needs the ``spec`` of the
        architecture (``boxteacher.build.architecture_spec``): it says whether masks are loaded
        (mask supervision, or a mixed mode of box supervision) and whether the student view
        ``aug_image`` is added."""
        if not is_train:
            return cls(
                False,
                min_sizes=(cfg.INPUT.MIN_SIZE_TEST,),
                max_size=cfg.INPUT.MAX_SIZE_TEST,
                hflip=False,
                image_format=cfg.INPUT.FORMAT,
            )
        if spec is None:
            raise ValueError(
                "A training DatasetMapper needs the architecture's spec (architecture_spec(cfg))."
            )
        names = list(cfg.DATASETS.TRAIN if dataset_names is None else dataset_names)
        flip_class_map = None
        if cfg.INPUT.HFLIP_TRAIN:
            if not names and cfg.DATASETS.FLIP_CLASS_PAIRS:
                raise ValueError(
                    "DATASETS.FLIP_CLASS_PAIRS is set but there is no training "
                    "dataset to look the class names up in."
                )
            thing_classes = get_metadata(names[0]).thing_classes if names else []
            flip_class_map = build_flip_class_map(cfg.DATASETS.FLIP_CLASS_PAIRS, thing_classes)
        mixed = gt_mask_mode(cfg, spec) != "ignore"
        return cls(
            True,
            min_sizes=tuple(cfg.INPUT.MIN_SIZE_TRAIN),
            max_size=cfg.INPUT.MAX_SIZE_TRAIN,
            size_sampling=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
            hflip=cfg.INPUT.HFLIP_TRAIN,
            image_format=cfg.INPUT.FORMAT,
            with_masks=not spec.box_supervised or mixed,
            masks_optional=mixed,
            flip_class_map=flip_class_map,
            student_aug=cfg.INPUT.AUG_TYPE if spec.student_view else "none",
            student_aug_separate=cfg.INPUT.AUG_EXTRA,
        )

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict | None:
        """Map one record. Training needs ``rng`` and returns None (after a warning) if the image
        cannot be read; nothing is drawn from ``rng`` before the image is read. Test mode
        ignores ``rng`` and raises on an unreadable image."""
        if self.is_train and rng is None:
            raise ValueError("A training DatasetMapper needs an rng (numpy.random.Generator).")
        image = self._read_image(record)
        if image is None:
            return None
        height, width = record["height"], record["width"]
        if self.is_train:
            short_edge = sample_short_edge(self.min_sizes, self.size_sampling, rng)
            flip = self.hflip and bool(rng.random() < 0.5)
        else:
            short_edge, flip = self.min_sizes[0], False
        new_size = resized_shape(height, width, short_edge, self.max_size)
        transform = ResizeFlip(height, width, *new_size, flip)
        image = transform.apply_image(image)
        out = {
            "file_name": record["file_name"],
            "image_id": record["image_id"],
            "height": height,
            "width": width,
            "image": _to_tensor(image),
        }
        if self.student_aug != "none":
            student_view = _to_tensor(
                perturb_colors(image, self.student_aug, rng, self.image_format)
            )
            out["aug_image" if self.student_aug_separate else "image"] = student_view
        if self.is_train:
            out["instances"] = self._instances(record, transform)
        return out

    def map_image(self, image: np.ndarray) -> dict:
        """The test-time model input of an image in memory, uint8 (H, W, 3) in
        ``image_format``: ``{"image": uint8 (3, h, w) resized as ``__call__`` resizes,
        "height": H, "width": W}``."""
        if self.is_train:
            raise ValueError(
                "map_image is test-time mapping; this DatasetMapper is a training one."
            )
        height, width = image.shape[:2]
        new_size = resized_shape(height, width, self.min_sizes[0], self.max_size)
        resized = ResizeFlip(height, width, *new_size).apply_image(image)
        return {"image": _to_tensor(resized), "height": height, "width": width}

    def _read_image(self, record: dict) -> np.ndarray | None:
        """uint8 [height, width, 3] in ``image_format``, in the frame of the record
        (``image_io.read_image``). An unreadable image (missing, truncated, undecodable) is None
        after a warning in training and an error naming the image id in test mode; an image of
        another size is an error."""
        expected = (record["height"], record["width"])
        try:
            return read_image(record["file_name"], expected, self.image_format)
        except UnreadableImageError as e:
            if self.is_train:
                logger.warning("%s; another image takes its place.", e)
                return None
            raise UnreadableImageError(f"{e} (image_id {record['image_id']}).") from e

    def _instances(self, record: dict, transform: ResizeFlip) -> dict[str, torch.Tensor]:
        indexed = [(i, a) for i, a in enumerate(record["annotations"]) if not a.get("iscrowd", 0)]
        if self.with_masks and not self.masks_optional:
            for i, ann in indexed:
                if "segmentation" not in ann:
                    raise ValueError(
                        f"Image {record['image_id']}: annotation #{i} has no segmentation, but "
                        "masks are required (mask supervision; set MODEL.BOXINST.ENABLED True to "
                        "train from boxes)."
                    )
        new_h, new_w = transform.new_height, transform.new_width
        boxes = np.array([a["bbox"] for _, a in indexed], dtype=np.float64).reshape(-1, 4)
        boxes = clip_boxes(transform.apply_boxes(boxes), new_h, new_w)
        labels = [a["category_id"] for _, a in indexed]
        if transform.flip and self.flip_class_map:
            labels = [self.flip_class_map.get(label, label) for label in labels]
        labels = np.array(labels, dtype=np.int64)
        sides = boxes[:, 2:] - boxes[:, :2]
        keep = np.flatnonzero((sides > _MIN_BOX_SIDE).all(axis=1))
        instances = {
            "boxes": torch.from_numpy(boxes[keep].astype(np.float32)),
            "labels": torch.from_numpy(labels[keep]),
        }
        if self.with_masks:
            masks = [
                _transformed_mask(record, *indexed[k], transform)
                if indexed[k][1].get("segmentation")
                else np.zeros((new_h, new_w), dtype=bool)
                for k in keep
            ]
            stacked = np.stack(masks) if masks else np.zeros((0, new_h, new_w), dtype=bool)
            instances["masks"] = torch.from_numpy(np.ascontiguousarray(stacked))
            if self.masks_optional:
                instances["has_mask"] = instances["masks"].flatten(1).any(dim=1)
        return instances


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> contiguous (3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _transformed_mask(record: dict, index: int, ann: dict, transform: ResizeFlip) -> np.ndarray:
    """bool [new_height, new_width]: polygons are transformed as coordinates and rasterised at
    the new size; an RLE is decoded at the original size and then resized."""
    segmentation = ann["segmentation"]
    if isinstance(segmentation, dict):
        size = list(segmentation["size"])
        if size != [record["height"], record["width"]]:
            raise ValueError(
                f"Image {record['image_id']}: the RLE of annotation #{index} has size {size}, "
                f"but the image is {[record['height'], record['width']]} (height, width)."
            )
        return transform.apply_mask(segmentation_to_mask(segmentation, *size))
    polygons = [transform.apply_polygon(p).tolist() for p in segmentation]
    return segmentation_to_mask(polygons, transform.new_height, transform.new_width)


def build_flip_class_map(
    pairs: Sequence[Sequence[str]], thing_classes: Sequence[str]
) -> dict[int, int] | None:
    """Contiguous id -> id of its mirror class for ``[name_a, name_b]`` pairs; None if no pairs.

    Without pairs, class names that come as a "left"/"right" couple cause a warning, since a
    flip would then give such objects the wrong label.
    """
    index = {name: i for i, name in enumerate(thing_classes)}
    flip_map: dict[int, int] = {}
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"DATASETS.FLIP_CLASS_PAIRS entry {pair!r} is not [class_a, class_b].")
        for name in pair:
            if name not in index:
                raise ValueError(
                    f"DATASETS.FLIP_CLASS_PAIRS names class '{name}', which the training dataset "
                    f"does not have. Its classes: {list(thing_classes)}."
                )
            if index[name] in flip_map:
                raise ValueError(f"DATASETS.FLIP_CLASS_PAIRS names class '{name}' more than once.")
        a, b = index[pair[0]], index[pair[1]]
        flip_map[a], flip_map[b] = b, a
    if not pairs:
        _warn_left_right(thing_classes)
    return flip_map or None


def _warn_left_right(thing_classes: Sequence[str]) -> None:
    lowered = {name.lower() for name in thing_classes}
    couples = [
        name
        for name in thing_classes
        if "left" in name.lower() and name.lower().replace("left", "right") in lowered
    ]
    if couples:
        logger.warning(
            "Classes such as %s have a 'right' counterpart, but DATASETS.FLIP_CLASS_PAIRS is empty "
            "while INPUT.HFLIP_TRAIN is on: flipped images keep unflipped labels. Declare the "
            "pairs in DATASETS.FLIP_CLASS_PAIRS or set INPUT.HFLIP_TRAIN False.",
            couples[:3],
        )
