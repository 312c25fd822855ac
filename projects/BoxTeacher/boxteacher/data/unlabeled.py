"""Datasets of unlabelled images (semi-supervised training): a COCO json whose images are used
without their annotations, or a folder of images.

Records have the usual fields (``data/catalog.py``) and no annotations; the dataset's metadata
has ``unlabeled=True``. Registration reads no file: a missing file, an entry without a size or a
dataset without images is an error naming it when the dataset is first used.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial

from PIL import Image, UnidentifiedImageError

from .catalog import register_dataset
from .coco import parse_image_entries
from .image_io import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

# Unreadable files of a folder listed in the warning.
_LISTED_FILES = 5


def register_unlabeled_images(name: str, source: str, image_root: str = "") -> None:
    """Register the images of ``source`` under ``name`` as unlabelled: a COCO json (its
    ``images``; ``file_name`` relative to ``image_root``; its annotations, if any, are ignored
    with one warning) or a folder (its image files, sorted, not recursive; ``image_root``
    unused)."""
    register_dataset(
        name,
        partial(load_unlabeled_images, source, image_root, name),
        unlabeled=True,
        source=source,
        image_root=image_root,
    )


def load_unlabeled_images(source: str, image_root: str = "", name: str = "") -> list[dict]:
    """The records (no annotations) of the images of ``source``, see
    ``register_unlabeled_images``. Raises ``FileNotFoundError`` for a missing source and
    ``ValueError`` for a malformed json or a source without images."""
    if os.path.isdir(source):
        records = _folder_records(source)
    elif os.path.isfile(source):
        records = _json_records(source, image_root)
    else:
        raise FileNotFoundError(
            f"Unlabelled images '{source}' (dataset '{name}') is neither a COCO json nor a folder."
        )
    if not records:
        raise ValueError(
            f"Unlabelled dataset '{name}' ({source}) has no images: expected a COCO json with "
            "'images' entries or a folder of image files."
        )
    return records


def _json_records(json_file: str, image_root: str) -> list[dict]:
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"'{json_file}' is not a JSON file ({e}); expected a COCO json.") from e
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)):
        raise ValueError(
            f"'{json_file}' is not a COCO json: expected a JSON object with a list 'images'."
        )
    annotations = data.get("annotations") or []
    if annotations:
        logger.warning(
            "'%s' holds %d annotations; as unlabelled images they are ignored.",
            json_file,
            len(annotations),
        )
    records, _, _ = parse_image_entries(data["images"], json_file, image_root)
    return records


def _folder_records(folder: str) -> list[dict]:
    """Records of the image files of ``folder`` (ids 1..N in sorted name order); sizes from
    the file headers. Files that cannot be identified as images are left out with a warning."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    records, unreadable = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError):
            unreadable.append(path)
            continue
        records.append(
            {
                "file_name": path,
                "image_id": len(records) + 1,
                "height": height,
                "width": width,
                "annotations": [],
            }
        )
    if unreadable:
        logger.warning(
            "%d files of '%s' are not readable images and are left out: %s%s",
            len(unreadable),
            folder,
            unreadable[:_LISTED_FILES],
            " ..." if len(unreadable) > _LISTED_FILES else "",
        )
    return records
