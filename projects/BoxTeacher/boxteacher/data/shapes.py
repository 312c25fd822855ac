"""A small synthetic COCO-format dataset of filled circles, triangles and squares.

It is the quick-start dataset: easy enough that a small CondInst trained from scratch on a CPU
learns it in minutes. Layout under ``<root>/shapes/``: ``train/`` and ``val/`` (PNG images) and
``annotations/instances_{train,val}.json``. Category ids are deliberately not contiguous.
Each annotation is the object's visible region: its polygon when nothing covers it, else an RLE
of what remains visible. Every object is painted exactly on the pixels of its annotation mask.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import cv2
import numpy as np
import pycocotools.mask as mask_util

from .coco_segmentation import segmentation_to_mask
from .rle import encode_rle

logger = logging.getLogger(__name__)

SHAPES_CATEGORIES = {1: "circle", 3: "triangle", 7: "square"}
_SPLITS = ("train", "val")
_IMAGE_SIDES = (96, 160)
_OBJECT_SIZES = (15.0, 60.0)
_MAX_OBJECTS = 4
# A placement may leave no earlier object with less than this fraction of its area visible.
_MIN_VISIBLE = 0.5
_PLACEMENT_TRIES = 20
# Smallest colour distances (RGB, Euclidean) of an object to the background under it and to the
# other objects of its image.
_MIN_CONTRAST = 100.0
_MIN_OBJECT_CONTRAST = 60.0
_CIRCLE_VERTICES = 32


def shapes_paths(root: str, split: str) -> tuple[str, str]:
    """(annotation json, image folder) of ``split`` ("train" or "val") under ``root``."""
    folder = os.path.join(root, "shapes")
    json_file = os.path.join(folder, "annotations", f"instances_{split}.json")
    return json_file, os.path.join(folder, split)


def ensure_shapes_dataset(root: str, num_train: int = 300, num_val: int = 60, seed: int = 0) -> str:
    """Generate the dataset under ``<root>/shapes`` unless it is there; returns that folder.

    Safe to call from several processes at once: each builds a private copy and the first to
    finish moves it into place.
    """
    target = os.path.join(root, "shapes")
    if _is_complete(root):
        return target
    if os.path.exists(target):
        raise RuntimeError(
            f"'{target}' exists but is incomplete (no {shapes_paths(root, 'val')[0]}): delete it."
        )
    try:
        generate_shapes_dataset(root, num_train, num_val, seed)
    except FileExistsError:
        if not _is_complete(root):
            raise
    return target


def generate_shapes_dataset(
    root: str, num_train: int = 300, num_val: int = 60, seed: int = 0
) -> str:
    """Write the dataset (deterministic for ``seed``) into ``<root>/shapes``; returns that folder.

    The files are written to a temporary folder in ``root`` that is then renamed, so the
    dataset is either complete or absent. Raises FileExistsError if ``<root>/shapes`` exists.
    """
    target = os.path.join(root, "shapes")
    if os.path.exists(target):
        raise FileExistsError(f"'{target}' already exists.")
    os.makedirs(root, exist_ok=True)
    logger.info(
        "Generating the synthetic shapes dataset (%d train, %d val images) in %s.",
        num_train,
        num_val,
        target,
    )
    staging = tempfile.mkdtemp(prefix=".shapes-tmp-", dir=root)
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private to this user
        os.makedirs(os.path.join(staging, "annotations"))
        for split_index, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
            rng = np.random.default_rng([seed, split_index])
            coco = _write_split(os.path.join(staging, split), count, rng)
            with open(os.path.join(staging, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(coco, f, separators=(",", ":"))
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_complete(root):
                raise
            raise FileExistsError(f"'{target}' was made by another process meanwhile.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Shapes dataset ready in %s.", target)
    return target


def _is_complete(root: str) -> bool:
    return os.path.isfile(shapes_paths(root, "val")[0])


def _write_split(folder: str, num_images: int, rng: np.random.Generator) -> dict:
    """Draw and save ``num_images`` images into ``folder``; returns the COCO dict."""
    os.makedirs(folder)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, objects = _draw_image(rng)
        file_name = f"{image_id:06d}.png"
        cv2.imwrite(os.path.join(folder, file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        height, width = image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
    return {
        "info": {"description": "BoxTeacher synthetic shapes"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": n, "supercategory": "shape"} for i, n in SHAPES_CATEGORIES.items()
        ],
    }


def _draw_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """An RGB uint8 image [H, W, 3] and its annotations (without ids)."""
    height, width = (int(v) for v in rng.integers(_IMAGE_SIDES[0], _IMAGE_SIDES[1] + 1, size=2))
    background = _background(rng, height, width)
    image = background.copy()
    objects, colours = [], []
    for category, polygon, full, visible in _place_shapes(rng, height, width):
        if np.array_equal(full, visible):
            segmentation = [polygon]
        else:
            segmentation = encode_rle(visible[None])[0]
        mask = segmentation_to_mask(segmentation, height, width)
        colours.append(_colour(rng, background[mask].mean(axis=0), colours))
        image[mask] = colours[-1]
        objects.append(
            {
                "category_id": category,
                "segmentation": segmentation,
                "bbox": mask_util.toBbox(encode_rle(mask[None])).tolist()[0],
                "area": int(mask.sum()),
                "iscrowd": 0,
            }
        )
    return image, objects


def _place_shapes(
    rng: np.random.Generator, height: int, width: int
) -> list[tuple[int, list[float], np.ndarray, np.ndarray]]:
    """1.._MAX_OBJECTS shapes as (category id, polygon, full mask, visible mask), in drawing
    order; a placement that would hide too much of an earlier shape is drawn again."""
    placed: list[tuple[int, list[float], np.ndarray, np.ndarray]] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        for _ in range(_PLACEMENT_TRIES):
            category = int(rng.choice(list(SHAPES_CATEGORIES)))
            polygon = _polygon(rng, category, height, width)
            full = segmentation_to_mask([polygon], height, width)
            if all(
                (visible & ~full).sum() >= _MIN_VISIBLE * old.sum() for _, _, old, visible in placed
            ):
                for _, _, _, visible in placed:
                    visible &= ~full
                placed.append((category, polygon, full, full.copy()))
                break
    return placed


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear gradient between two random colours in a random direction, plus mild noise."""
    start, end = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = xs * np.cos(angle) + ys * np.sin(angle)
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    image = start + t[..., None] * (end - start) + rng.normal(0, 4, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _colour(
    rng: np.random.Generator, background_mean: np.ndarray, others: list[np.ndarray]
) -> np.ndarray:
    """A random colour that stands out from ``background_mean`` and from the ``others`` (objects
    painted before), or the one of a few candidates that stands out most."""
    candidates = rng.integers(0, 256, size=(32, 3))
    contrast = np.linalg.norm(candidates - background_mean, axis=1) / _MIN_CONTRAST
    for other in others:
        distance = np.linalg.norm(candidates - other, axis=1)
        contrast = np.minimum(contrast, distance / _MIN_OBJECT_CONTRAST)
    good = np.flatnonzero(contrast >= 1)
    return candidates[good[0] if len(good) else int(contrast.argmax())].astype(np.uint8)


def _polygon(rng: np.random.Generator, category: int, height: int, width: int) -> list[float]:
    """Vertices [x0, y0, x1, y1, ...] of a shape that lies inside the image."""
    radius = rng.uniform(*_OBJECT_SIZES) / 2
    radius = min(radius, (min(height, width) - 2) / 2)
    centre = rng.uniform([radius + 1, radius + 1], [width - radius - 1, height - radius - 1])
    name = SHAPES_CATEGORIES[category]
    vertices = {"circle": _CIRCLE_VERTICES, "triangle": 3, "square": 4}[name]
    rotation = 0.0 if name == "circle" else rng.uniform(0, 2 * np.pi)
    angles = rotation + np.arange(vertices) * (2 * np.pi / vertices)
    points = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return [round(float(v), 2) for v in points.ravel()]
