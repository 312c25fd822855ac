"""Evaluation ground truth goes through the training loader's validation: a corpus of odd but
valid datasets scores AP 100 with the ground truth as predictions, and bad input is an error naming
file, annotation and field, or a logged skip, as in training."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from boxteacher.data import register_coco_instances
from boxteacher.data.catalog import get_metadata
from boxteacher.data.coco import load_coco_ground_truth, load_coco_json
from boxteacher.evaluation import COCOEvaluator

HEIGHT, WIDTH = 48, 64
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------- helpers
def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ann(ann_id, image_id: int, category_id: int, bbox: list, **extra) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": 0,
        "area": bbox[2] * bbox[3],
        **extra,
    }


def _box_ann(
    ann_id, image_id: int, category_id: int, x: float, y: float, w: float, h: float, **extra
) -> dict:
    """An annotation whose mask is its box as a polygon."""
    return _ann(
        ann_id,
        image_id,
        category_id,
        [x, y, w, h],
        segmentation=[_rect(x, y, x + w, y + h)],
        **extra,
    )


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def _blob(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[y0:y1, x0:x1] = True
    mask[y0, x0] = False  # not a rectangle
    return mask


def _dataset(annotations: list[dict], *, image_ids=(1, 2), categories=None) -> dict:
    return {
        "images": [
            {"id": i, "file_name": f"{i}.jpg", "height": HEIGHT, "width": WIDTH} for i in image_ids
        ],
        "categories": categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": annotations,
    }


def _write(path: Path, data: dict, *, bom: bool = False) -> Path:
    text = json.dumps(data)
    path.write_bytes(("\ufeff" + text if bom else text).encode("utf-8"))
    return path


def _register(name: str, json_file: Path) -> None:
    register_coco_instances(name, str(json_file), str(json_file.parent))


def _gt_predictions(name: str, json_file: Path):
    """(inputs, outputs) per image: the validated non-crowd ground truth as predictions (score 1);
    an object without a mask predicts its box as its mask."""
    gt = COCO()
    gt.dataset = load_coco_ground_truth(str(json_file))
    gt.createIndex()
    id_map = get_metadata(name).thing_dataset_id_to_contiguous_id
    for image_id, info in gt.imgs.items():
        anns = [a for a in gt.imgToAnns[image_id] if not a["iscrowd"]]
        boxes, masks = [], []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            boxes.append([x, y, x + w, y + h])
            if "segmentation" in ann:
                masks.append(gt.annToMask(ann).astype(bool))
            else:
                rle = mask_util.frPyObjects([_rect(x, y, x + w, y + h)], HEIGHT, WIDTH)
                masks.append(mask_util.decode(rle)[..., 0].astype(bool))
        instances = {
            "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([id_map[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": (
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros(0, info["height"], info["width"], dtype=torch.bool)
            ),
        }
        yield [{"image_id": image_id}], [{"instances": instances}]


def _evaluate(name: str, json_file: Path) -> dict:
    _register(name, json_file)
    evaluator = COCOEvaluator(name, distributed=False)
    for inputs, outputs in _gt_predictions(name, json_file):
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def _assert_perfect(metrics: dict, task: str) -> None:
    assert metrics["AP"] == pytest.approx(100.0, abs=1e-6), task
    for name, value in metrics.items():
        if name in SUMMARY or name.startswith("AP-"):
            assert math.isnan(value) or value == pytest.approx(100.0, abs=1e-6), (task, name)


# ----------------------------------------------------------------------------- the corpus
def _crowds() -> dict:
    return _dataset(
        [
            _box_ann(1, 1, 1, 4, 4, 20, 16),
            _ann(
                2,
                1,
                1,
                [40, 30, 22, 16],
                iscrowd=1,
                segmentation=_uncompressed_rle(_blob(30, 46, 40, 62)),
            ),
            _box_ann(3, 2, 2, 30, 2, 20, 20, iscrowd=1),  # crowd polygon
            _box_ann(4, 2, 2, 2, 20, 20, 20),
        ]
    )


def _non_contiguous_categories() -> dict:
    categories = [{"id": 42, "name": "z"}, {"id": 3, "name": "c"}, {"id": 10, "name": "j"}]
    return _dataset(
        [
            _box_ann(1, 1, 42, 4, 4, 20, 16),
            _box_ann(2, 1, 3, 30, 6, 10, 30),
            _box_ann(3, 2, 10, 10, 12, 24, 20),
            _box_ann(4, 2, 42, 2, 30, 30, 12),
        ],
        categories=categories,
    )


def _images_without_annotations() -> dict:
    return _dataset([_box_ann(1, 5, 1, 4, 4, 20, 16)], image_ids=(0, 5, 7, 9))


def _multi_part_polygons() -> dict:
    return _dataset(
        [
            _ann(1, 1, 1, [4, 4, 40, 16], segmentation=[_rect(4, 4, 14, 20), _rect(30, 6, 44, 12)]),
            _ann(
                2,
                2,
                2,
                [0, 0, 60, 44],
                segmentation=[_rect(0, 0, 10, 10), [30, 20, 60, 20, 45, 44], _rect(12, 30, 20, 40)],
            ),
        ]
    )


def _rle_masks() -> dict:
    return _dataset(
        [
            _ann(1, 1, 1, [10, 5, 20, 25], segmentation=_uncompressed_rle(_blob(5, 30, 10, 30))),
            _ann(2, 1, 2, [0, 0, 8, 8], segmentation=_uncompressed_rle(_blob(0, 8, 0, 8))),
            _ann(3, 2, 1, [30, 10, 30, 30], segmentation=_compressed_rle(_blob(10, 40, 30, 60))),
        ]
    )


def _boxes_partly_outside() -> dict:
    return _dataset(
        [
            _box_ann(1, 1, 1, -6, 4, 20, 16),
            _box_ann(2, 1, 2, 50, 40, 30, 30),
            _box_ann(3, 2, 1, 10, -10, 10, 20),
        ]
    )


def _skipped_boxes_and_masks() -> dict:
    """Boxes without area, non-finite or outside the image are skipped; polygons with fewer than
    3 points, an empty segmentation and RLEs of the wrong size or counts leave boxes only."""
    return _dataset(
        [
            _box_ann(1, 1, 1, 4, 4, 20, 16),
            _ann(2, 1, 1, [5, 5, 0, 10]),
            _ann(3, 1, 2, [float("nan"), 5, 10, 10]),
            _ann(4, 1, 2, [300, 5, 10, 10]),
            _ann(5, 1, 2, [30, 6, 10, 30], segmentation=[[30, 6, 40, 6]]),
            _ann(6, 2, 1, [2, 2, 10, 10], segmentation=[]),
            _ann(
                7,
                2,
                2,
                [20, 2, 10, 10],
                segmentation={"size": [WIDTH, HEIGHT], "counts": [0, 3072]},
            ),
            _ann(
                8, 2, 1, [40, 20, 10, 10], segmentation={"size": [HEIGHT, WIDTH], "counts": [5, 15]}
            ),
            _box_ann(9, 2, 2, 10, 30, 20, 15),
        ]
    )


def _odd_ids_and_no_area() -> dict:
    anns = [
        _box_ann(0, 1, 1, 4, 4, 20, 16),
        _box_ann(7, 1, 2, 30, 6, 10, 30),
        _box_ann(7, 2, 1, 10, 12, 24, 20),
        _box_ann(-1, 2, 2, 2, 30, 30, 12),
        _box_ann(None, 2, 2, 40, 2, 20, 10),
        _box_ann(8, 1, 1, 44, 30, 16, 16),
    ]
    del anns[5]["area"]
    anns[4].pop("id")
    return _dataset(anns)


def _box_only() -> dict:
    return _dataset(
        [
            _ann(1, 1, 1, [4, 4, 20, 16]),
            _ann(2, 2, 2, [30, 6, 10, 30]),
            _ann(3, 2, 1, [-5, 20, 20, 50]),
        ]
    )


CORPUS = {
    "crowds": _crowds,
    "non_contiguous_categories": _non_contiguous_categories,
    "images_without_annotations": _images_without_annotations,
    "multi_part_polygons": _multi_part_polygons,
    "rle_masks": _rle_masks,
    "boxes_partly_outside": _boxes_partly_outside,
    "skipped_boxes_and_masks": _skipped_boxes_and_masks,
    "odd_ids_and_no_area": _odd_ids_and_no_area,
    "box_only": _box_only,
}


@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_gt_as_predictions_gives_ap_100(kind, bom, tmp_path):
    json_file = _write(tmp_path / f"{kind}.json", CORPUS[kind](), bom=bom)
    results = _evaluate(f"gt_corpus_{kind}_{bom}", json_file)
    assert set(results) == ({"bbox"} if kind == "box_only" else {"bbox", "segm"})
    for task, metrics in results.items():
        _assert_perfect(metrics, task)


# ----------------------------------------------------------------------------- rules
def test_duplicate_ids_are_renumbered_with_a_warning(tmp_path, caplog):
    json_file = _write(tmp_path / "ids.json", _odd_ids_and_no_area())
    with caplog.at_level(logging.WARNING, logger="boxteacher.data.coco"):
        gt = load_coco_ground_truth(str(json_file))
    ids = [a["id"] for a in gt["annotations"]]
    assert ids == [9, 7, 10, 11, 12, 8]
    message = [r.getMessage() for r in caplog.records if "re-numbered" in r.getMessage()]
    assert len(message) == 1 and "ids.json: 4 annotation(s)" in message[0]
    assert "annotation ids 0, 7, -1, None" in message[0]
    assert gt["annotations"][5]["area"] == 256.0  # missing area: the mask's


def test_ground_truth_is_validated_and_clipped(tmp_path):
    json_file = _write(tmp_path / "clip.json", _skipped_boxes_and_masks())
    anns = load_coco_ground_truth(str(json_file))["annotations"]
    assert [a["id"] for a in anns] == [1, 5, 6, 7, 8, 9]
    assert [("segmentation" in a) for a in anns] == [True, False, False, False, False, True]
    boxes = load_coco_ground_truth(str(_write(tmp_path / "out.json", _boxes_partly_outside())))
    assert [a["bbox"] for a in boxes["annotations"]] == [
        [0, 4, 14, 16],
        [50, 40, 14, 8],
        [10, 0, 10, 10],
    ]


def test_box_only_ground_truth_skips_segm_with_a_warning(tmp_path, caplog):
    json_file = _write(tmp_path / "boxes.json", _box_only())
    with caplog.at_level(logging.WARNING):
        results = _evaluate("gt_box_only", json_file)
    assert set(results) == {"bbox"}
    assert "mask AP needs masks" in caplog.text and "boxes.json" in caplog.text


def test_bad_rle_does_not_hang_and_is_ignored_in_mask_ap(tmp_path, caplog):
    """Counts adding up to more than height x width used to send computeIoU spinning."""
    data = _dataset(
        [
            _box_ann(1, 1, 1, 4, 4, 20, 16),
            _ann(
                2,
                1,
                2,
                [30, 6, 10, 30],
                segmentation={"size": [HEIGHT, WIDTH], "counts": [200, 10, 10**7]},
            ),
        ]
    )
    json_file = _write(tmp_path / "rle.json", data)
    with caplog.at_level(logging.WARNING):
        results = _evaluate("gt_bad_rle", json_file)
    assert "counts do not add up" in caplog.text and "annotation ids 2" in caplog.text
    assert "1 annotation(s) have no mask" in caplog.text
    _assert_perfect(results["segm"], "segm")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("segmentation", [[1, 2, 3, float("nan"), 5, 6]], "non-finite coordinates in segmentation"),
        ("segmentation", [1, 2, 3, 4, 5, 6], "segmentation polygon #0 1;"),
        ("segmentation", ["1 2 3 4 5 6"], "segmentation polygon #0 '1 2 3 4 5 6'"),
        ("segmentation", [[[1, 2, 3, 4, 5, 6]]], "segmentation polygon #0"),
        ("segmentation", {"counts": [1, 2]}, "RLE segmentation with size None"),
        ("segmentation", {"size": [48, 64], "counts": 5}, "RLE segmentation with counts 5"),
        ("bbox", [[4, 4, 20, 16]], r"bbox \[\[4, 4, 20, 16\]\]"),
        ("iscrowd", "no", "iscrowd 'no'"),
    ],
)
def test_malformed_annotation_is_an_error_naming_file_annotation_and_field(
    field, value, message, tmp_path
):
    ann = _box_ann(17, 1, 1, 4, 4, 20, 16)
    ann[field] = value
    json_file = _write(tmp_path / "bad.json", _dataset([_box_ann(1, 1, 1, 30, 6, 10, 30), ann]))
    _register("gt_malformed", json_file)
    pattern = rf"bad.json'?: annotation 17 .*{message}"
    with pytest.raises(ValueError, match=pattern):
        COCOEvaluator("gt_malformed", distributed=False).coco_gt
    with pytest.raises(ValueError, match=pattern):
        load_coco_json(str(json_file), str(tmp_path))
