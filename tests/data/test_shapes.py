"""The synthetic shapes dataset: deterministic, valid COCO, image and masks agree, safe
generation."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from boxteacher.data import (
    ensure_shapes_dataset,
    generate_shapes_dataset,
    get_dataset_records,
    get_metadata,
)
from boxteacher.data.builtin import register_builtin_datasets
from boxteacher.data.shapes import shapes_paths

# pycocotools' decode trips a NumPy 2 deprecation warning; not ours to fix.

NUM_TRAIN, NUM_VAL = 16, 4


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shapes"))
    generate_shapes_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    return root


def _files(root: str) -> dict[str, bytes]:
    base = Path(root) / "shapes"
    return {
        str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()
    }


def test_deterministic_for_a_seed(shapes_root, tmp_path):
    generate_shapes_dataset(str(tmp_path / "a"), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    generate_shapes_dataset(str(tmp_path / "b"), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=1)
    same, other = _files(str(tmp_path / "a")), _files(str(tmp_path / "b"))
    assert same == _files(shapes_root)
    assert len(same) == NUM_TRAIN + NUM_VAL + 2
    assert same["annotations/instances_train.json"] != other["annotations/instances_train.json"]


@pytest.mark.parametrize("split, count", [("train", NUM_TRAIN), ("val", NUM_VAL)])
def test_valid_coco_whose_masks_match_the_pixels(shapes_root, split, count):
    json_file, image_root = shapes_paths(shapes_root, split)
    coco = COCO(json_file)
    assert sorted(coco.getCatIds()) == [1, 3, 7]
    assert [coco.cats[i]["name"] for i in (1, 3, 7)] == ["circle", "triangle", "square"]
    assert len(coco.getImgIds()) == count
    kinds = set()
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        image = cv2.imread(os.path.join(image_root, info["file_name"]))
        assert image.shape == (info["height"], info["width"], 3)
        assert 96 <= min(image.shape[:2]) and max(image.shape[:2]) <= 160
        anns = coco.imgToAnns[image_id]
        assert 1 <= len(anns) <= 4
        covered = np.zeros(image.shape[:2], bool)
        for ann in anns:
            kinds.add(type(ann["segmentation"]).__name__)
            mask = coco.annToMask(ann).astype(bool)
            assert not (mask & covered).any(), "visible regions do not overlap"
            covered |= mask
            colours = np.unique(image[mask], axis=0)
            assert len(colours) == 1, "an object is painted in one colour exactly on its mask"
            grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            ring = grown & ~mask & ~covered
            if ring.any():
                assert (image[ring] != colours[0]).any(axis=1).mean() > 0.9
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert [x, y, x + w, y + h] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
    if split == "train":
        assert kinds == {"list", "dict"}, "unoccluded objects are polygons, occluded ones RLEs"


def test_ensure_is_safe_concurrently(tmp_path):
    root = str(tmp_path)
    os.makedirs(tmp_path / ".shapes-tmp-leftover")  # an interrupted earlier run
    with ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(lambda _: ensure_shapes_dataset(root, num_train=6, num_val=2), range(3))
        )
    assert results == [os.path.join(root, "shapes")] * 3
    assert len(json.loads(Path(shapes_paths(root, "train")[0]).read_text())["images"]) == 6
    assert sorted(os.listdir(root)) == [".shapes-tmp-leftover", "shapes"]
    ensure_shapes_dataset(root, num_train=6, num_val=2)  # present: nothing to do
    with pytest.raises(FileExistsError):
        generate_shapes_dataset(root, num_train=6, num_val=2)


def test_incomplete_folder_is_reported(tmp_path):
    os.makedirs(tmp_path / "shapes" / "train")
    with pytest.raises(RuntimeError, match="incomplete"):
        ensure_shapes_dataset(str(tmp_path))


def test_builtin_shapes_generated_on_first_use(tmp_path):
    register_builtin_datasets(str(tmp_path))
    try:
        meta = get_metadata("shapes_val")
        assert meta.thing_classes == ["circle", "triangle", "square"]
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1, 7: 2}
        assert not (tmp_path / "shapes").exists()
        assert Path(meta.json_file).is_file()  # first access of json_file generates the dataset
        records = get_dataset_records("shapes_val")
        assert len(records) == 60 and len(get_dataset_records("shapes_train")) == 300
        assert {a["category_id"] for r in records for a in r["annotations"]} == {0, 1, 2}
    finally:
        register_builtin_datasets()
