"""COCO json loading: real files (coco128, carparts), the id mapping, and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from boxteacher.config import get_cfg
from boxteacher.data import (
    get_dataset_records,
    get_metadata,
    load_coco_json,
    register_coco_instances,
    register_datasets_from_config,
    segmentation_to_mask,
)
from boxteacher.data.builtin import register_builtin_datasets

# pycocotools' decode trips a NumPy 2 deprecation warning; not ours to fix.


def _write_coco(path: Path, annotations: list[dict], images=None, categories=None) -> str:
    data = {
        "images": images
        if images is not None
        else [
            {"id": 1, "file_name": "a.jpg", "height": 100, "width": 200},
            {"id": 2, "file_name": "b.jpg", "height": 50, "width": 50},
        ],
        "annotations": annotations,
        "categories": categories or [{"id": 5, "name": "x"}, {"id": 2, "name": "y"}],
    }
    path.write_text(json.dumps(data))
    return str(path)


def _ann(ann_id: int, bbox: list[float], image_id: int = 1, category_id: int = 5, **extra) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": 0,
        **extra,
    }


def test_coco128_records_and_metadata(shared_data):
    COCO128 = shared_data / "coco128"
    json_file = str(COCO128 / "annotations" / "instances_train2017.json")
    register_coco_instances("test_coco128", json_file, str(COCO128 / "images"))
    meta = get_metadata("test_coco128")
    assert len(meta.thing_classes) == 80
    id_map = meta.thing_dataset_id_to_contiguous_id
    assert sorted(id_map.values()) == list(range(80))
    assert id_map[1] == 0 and id_map[90] == 79 and meta.thing_classes[79] == "toothbrush"
    assert meta.evaluator_type == "coco" and meta.json_file == json_file

    records = get_dataset_records("test_coco128")
    anns = [a for r in records for a in r["annotations"]]
    assert len(records) == 128 and len(anns) == 939
    assert sum(a["iscrowd"] for a in anns) == 10
    assert sum(not r["annotations"] for r in records) == 2
    assert all(0 <= a["category_id"] < 80 for a in anns)
    assert all(Path(r["file_name"]).is_file() for r in records)

    raw = json.loads(Path(json_file).read_text())
    multi = [a for a in raw["annotations"] if not a["iscrowd"] and len(a["segmentation"]) > 1]
    assert multi, "coco128 has multi-part polygons"
    image_of = {r["image_id"]: r for r in records}
    # The first multi-part annotation comes back with all its parts and an XYXY box.
    target = multi[0]
    x, y, w, h = target["bbox"]
    match = [
        a
        for a in image_of[target["image_id"]]["annotations"]
        if a["bbox"] == pytest.approx([x, y, x + w, y + h])
    ]
    assert len(match) == 1 and match[0]["segmentation"] == target["segmentation"]
    assert match[0]["category_id"] == id_map[target["category_id"]]
    crowd = [a for a in anns if a["iscrowd"]]
    assert all(isinstance(a["segmentation"], dict) for a in crowd)


@pytest.mark.parametrize("split, images, instances", [("train", 400, 3073), ("val", 100, 811)])
def test_carparts_counts(split, images, instances, shared_data):
    CARPARTS = shared_data / "carparts"
    json_file = str(CARPARTS / "annotations" / f"instances_{split}.json")
    records = load_coco_json(json_file, str(CARPARTS / "images"))
    assert len(records) == images
    assert sum(len(r["annotations"]) for r in records) == instances
    register_coco_instances(f"test_carparts_{split}", json_file, str(CARPARTS / "images"))
    classes = get_metadata(f"test_carparts_{split}").thing_classes
    assert len(classes) == 18 and classes[2] == "back_left_door" and classes[17] == "wheel"


def test_metadata_is_lazy_and_errors_name_the_file(tmp_path):
    register_coco_instances("test_lazy_missing", str(tmp_path / "nope.json"), str(tmp_path))
    assert get_metadata("test_lazy_missing").json_file == str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_metadata("test_lazy_missing").thing_classes
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_dataset_records("test_lazy_missing")


def test_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not a JSON"):
        load_coco_json(str(path), str(tmp_path))


def test_json_without_coco_keys(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"images": [], "annotations": {}}))
    with pytest.raises(ValueError, match=r"plain.json.*'annotations', 'categories'"):
        load_coco_json(str(path), str(tmp_path))


def test_unknown_category_id(tmp_path):
    anns = [_ann(1, [0, 0, 5, 5]), _ann(77, [0, 0, 5, 5], category_id=9)]
    path = _write_coco(tmp_path / "cat.json", anns)
    with pytest.raises(ValueError, match=r"cat.json.*annotation 77.*category id 9"):
        load_coco_json(path, str(tmp_path))


def test_unknown_image_id(tmp_path):
    path = _write_coco(tmp_path / "img.json", [_ann(3, [0, 0, 5, 5], image_id=42)])
    with pytest.raises(ValueError, match=r"img.json.*annotation 3.*unknown image id 42"):
        load_coco_json(path, str(tmp_path))


def test_box_rules_and_one_warning_per_kind(tmp_path, caplog):
    anns = [
        _ann(1, [10, 20, 30, 40]),  # kept as is
        _ann(2, [5, 5, 0, 10]),  # zero width
        _ann(3, [5, 5, 10, -1]),  # negative height
        _ann(4, [190, 90, 20, 30]),  # partly outside image 1 (200 x 100): clipped
        _ann(5, [-3, 10, 8, 5], image_id=2),  # partly outside image 2: clipped
        _ann(6, [300, 10, 5, 5]),  # entirely outside: skipped
        _ann(
            7, [1, 1, 4, 4], segmentation=[[1, 1, 5, 1], [1, 1, 5, 1, 5, 5]]
        ),  # one 2-point polygon
        _ann(8, [1, 1, 4, 4], segmentation=[[1, 1, 5, 1]]),  # no polygon left
        _ann(
            9, [1, 1, 4, 4], iscrowd=1, segmentation={"size": [100, 200], "counts": [5, 10, 19985]}
        ),
    ]
    path = _write_coco(tmp_path / "boxes.json", anns)
    with caplog.at_level(logging.WARNING, logger="boxteacher.data.coco"):
        records = load_coco_json(path, str(tmp_path / "imgs"))
    assert records[0]["file_name"] == str(tmp_path / "imgs" / "a.jpg")
    boxes = [a["bbox"] for r in records for a in r["annotations"]]
    assert boxes == [[10, 20, 40, 60], [190, 90, 200, 100], *[[1, 1, 5, 5]] * 3, [0, 10, 5, 15]]
    first = records[0]["annotations"]
    assert first[0]["category_id"] == 1 and "segmentation" not in first[0]  # id 5 -> 1 (ids 2, 5)
    assert first[2]["segmentation"] == [[1, 1, 5, 1, 5, 5]]
    assert "segmentation" not in first[3]
    assert first[4]["iscrowd"] == 1 and first[4]["segmentation"]["counts"] == [5, 10, 19985]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    zero = [m for m in messages if "without area" in m]
    assert (
        len(zero) == 1 and "2 box(es)" in zero[0] and "2, 3" in zero[0] and "boxes.json" in zero[0]
    )
    assert any("clipped" in m and "2 box(es)" in m and "4, 5" in m for m in messages)
    assert any("entirely outside" in m and "annotation ids 6" in m for m in messages)
    assert any("fewer than 3 points" in m and "7, 8" in m for m in messages)


def test_segmentation_to_mask_polygon_and_rle():
    square = segmentation_to_mask([[2, 2, 6, 2, 6, 6, 2, 6], [10, 0, 12, 0, 12, 3, 10, 3]], 8, 16)
    assert square.dtype == bool and square.shape == (8, 16)
    assert square[2:6, 2:6].all() and square[0:3, 10:12].all() and square.sum() == 16 + 6
    rle = segmentation_to_mask({"size": [4, 5], "counts": [6, 3, 11]}, 4, 5)
    expected = np.zeros(20, bool)
    expected[6:9] = True
    np.testing.assert_array_equal(rle, expected.reshape(5, 4).T)  # column-major counts


def test_builtin_missing_file_points_to_readme(tmp_path):
    register_builtin_datasets(str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError, match=r"instances_val2017.json.*datasets/README.md"):
            get_dataset_records("coco_2017_val")
        with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
            get_metadata("coco_2017_train").thing_classes
    finally:
        register_builtin_datasets()


def test_register_from_config(tmp_path):
    path = _write_coco(tmp_path / "own.json", [_ann(1, [0, 0, 5, 5])])
    cfg = get_cfg()
    cfg.DATASETS.REGISTER = [["test_own", path, str(tmp_path)]]
    register_datasets_from_config(cfg)
    assert len(get_dataset_records("test_own")) == 2
    assert get_metadata("test_own").thing_classes == ["y", "x"]
    cfg.DATASETS.REGISTER = [["test_bad", path]]
    with pytest.raises(ValueError, match=r"'test_bad'.*\[name, annotation_json, image_folder\]"):
        register_datasets_from_config(cfg)


def test_non_finite_boxes_have_their_own_warning(tmp_path, caplog):
    anns = [
        _ann(1, [10, 20, 30, 40]),
        _ann(2, [float("nan"), 5, 10, 10]),
        _ann(3, [5, 5, float("inf"), 10]),
        _ann(4, [5, 5, None, 10]),
        _ann(5, [5, 5, 0, 10]),
    ]
    path = _write_coco(tmp_path / "nan.json", anns)
    with caplog.at_level(logging.WARNING, logger="boxteacher.data.coco"):
        records = load_coco_json(path, str(tmp_path))
    assert [a["bbox"] for a in records[0]["annotations"]] == [[10, 20, 40, 60]]
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "3 box(es) with non-finite values (NaN or infinity)" in m and "2, 3, 4" in m
        for m in messages
    )
    assert any("1 box(es) without area" in m and "annotation ids 5)" in m for m in messages)


def test_rle_of_wrong_size_or_counts_is_dropped_with_a_warning(tmp_path, caplog):
    good = {"size": [100, 200], "counts": [5, 10, 19985]}
    anns = [
        _ann(1, [1, 1, 4, 4], segmentation=good),
        _ann(2, [1, 1, 4, 4], segmentation={"size": [200, 100], "counts": [5, 10, 19985]}),
        _ann(3, [1, 1, 4, 4], segmentation={"size": [100, 200], "counts": [5, 15]}),
        _ann(4, [1, 1, 4, 4], segmentation={"size": [100, 200], "counts": "52"}),  # 20 pixels
        _ann(5, [1, 1, 4, 4], segmentation={"size": [100, 200], "counts": [5, -10, 20005]}),
        _ann(6, [1, 1, 4, 4], segmentation=[]),
    ]
    path = _write_coco(tmp_path / "rle.json", anns)
    with caplog.at_level(logging.WARNING, logger="boxteacher.data.coco"):
        records = load_coco_json(path, str(tmp_path))
    first = records[0]["annotations"]
    assert first[0]["segmentation"] == good
    assert all("segmentation" not in a for a in first[1:]) and len(first) == 6
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert any("1 RLE mask(s) whose size is not" in m and "ids 2)" in m for m in messages)
    assert any("3 RLE mask(s) whose counts do not add up" in m and "3, 4, 5" in m for m in messages)


def test_utf8_bom_loads(tmp_path):
    path = tmp_path / "bom.json"
    _write_coco(path, [_ann(1, [0, 0, 5, 5])])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(load_coco_json(str(path), str(tmp_path))[0]["annotations"]) == 1


def test_nested_bbox_is_an_error(tmp_path):
    path = _write_coco(tmp_path / "nested.json", [_ann(1, [[0, 0, 5, 5]]), _ann(2, [[1, 1, 5, 5]])])
    with pytest.raises(
        ValueError, match=r"nested.json'?: annotation 1 has bbox \[\[0, 0, 5, 5\]\]"
    ):
        load_coco_json(path, str(tmp_path))
