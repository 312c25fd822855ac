"""Datasets of unlabelled images (``boxteacher.data.unlabeled``): by COCO json or by folder."""

import json
import logging

import cv2
import numpy as np
import pytest

from boxteacher.config import ArchitectureSpec, get_cfg
from boxteacher.data import (
    DatasetMapper,
    get_dataset_records,
    get_metadata,
    register_datasets_from_config,
)
from boxteacher.data.unlabeled import load_unlabeled_images, register_unlabeled_images


def write_images(folder, sizes):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_a_folder_of_images_by_path(tmp_path, caplog):
    write_images(tmp_path / "pile", {"b.png": (20, 30), "a.jpg": (16, 12)})
    (tmp_path / "pile/notes.txt").write_text("not an image")
    (tmp_path / "pile/broken.png").write_bytes(b"garbage")
    register_unlabeled_images("test_unlabeled_folder", str(tmp_path / "pile"))
    assert get_metadata("test_unlabeled_folder").unlabeled
    with caplog.at_level(logging.WARNING):
        records = get_dataset_records("test_unlabeled_folder")
    assert [(r["file_name"], r["image_id"], r["height"], r["width"]) for r in records] == [
        (str(tmp_path / "pile/a.jpg"), 1, 16, 12),
        (str(tmp_path / "pile/b.png"), 2, 20, 30),
    ]
    assert all(r["annotations"] == [] for r in records)
    assert "broken.png" in caplog.text and "not readable images" in caplog.text


def test_a_coco_json_is_read_without_its_annotations_and_one_warning(tmp_path, caplog):
    write_images(tmp_path, {"x.png": (20, 30)})
    data = {
        "images": [{"id": 7, "file_name": "x.png", "height": 20, "width": 30}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5]}] * 3,
    }
    (tmp_path / "u.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        records = load_unlabeled_images(str(tmp_path / "u.json"), str(tmp_path), "u")
    assert records == [
        {
            "file_name": str(tmp_path / "x.png"),
            "image_id": 7,
            "height": 20,
            "width": 30,
            "annotations": [],
        }
    ]
    assert len(caplog.records) == 1 and "3 annotations" in caplog.text and "ignored" in caplog.text


def test_bad_unlabelled_sources_are_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*neither a COCO json nor a folder"):
        load_unlabeled_images(str(tmp_path / "nowhere"), name="n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="'e'.*has no images"):
        load_unlabeled_images(str(tmp_path / "empty"), name="e")
    (tmp_path / "none.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="has no images"):
        load_unlabeled_images(str(tmp_path / "none.json"), name="none")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="list.json' is not a COCO json"):
        load_unlabeled_images(str(tmp_path / "list.json"))
    (tmp_path / "sizeless.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.png"}]})
    )
    with pytest.raises(ValueError, match="sizeless.json': image entry #0 needs"):
        load_unlabeled_images(str(tmp_path / "sizeless.json"))


def test_the_training_mapper_maps_an_unlabelled_record_to_no_instances(tmp_path):
    write_images(tmp_path / "pile", {"a.png": (40, 60)})
    (record,) = load_unlabeled_images(str(tmp_path / "pile"))
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    mapper = DatasetMapper.from_config(
        cfg, is_train=True, dataset_names=[], spec=ArchitectureSpec(box_supervised=True)
    )
    out = mapper(record, np.random.default_rng(0))
    assert tuple(out["image"].shape) == (3, 32, 48)
    assert out["instances"]["boxes"].shape == (0, 4) and out["instances"]["labels"].shape == (0,)


def test_the_config_registers_unlabelled_images_by_path_and_names_bad_entries(tmp_path):
    write_images(tmp_path / "pile", {"a.png": (10, 12)})
    cfg = get_cfg()
    cfg.DATASETS.REGISTER_UNLABELED = [["test_unlabeled_cfg", str(tmp_path / "pile")]]
    register_datasets_from_config(cfg)
    assert (
        get_metadata("test_unlabeled_cfg").unlabeled
        and len(get_dataset_records("test_unlabeled_cfg")) == 1
    )
    for bad in (["only_a_name"], ["n", ""], ["n", "a", "b", "c"]):
        cfg.DATASETS.REGISTER_UNLABELED = [bad]
        with pytest.raises(ValueError, match="DATASETS.REGISTER_UNLABELED entry"):
            register_datasets_from_config(cfg)
