"""DatasetMapper and transforms: resize rule, box/mask alignment under resize and flip, label
flipping, bad images, and the record left untouched."""

from __future__ import annotations

import copy
import logging

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from boxteacher.config import ArchitectureSpec, get_cfg
from boxteacher.data import (
    DatasetMapper,
    build_flip_class_map,
    get_dataset_records,
    register_datasets_from_config,
    resized_shape,
)

# pycocotools' decode trips a NumPy 2 deprecation warning; not ours to fix.

HEIGHT, WIDTH = 60, 100


def _rle(height: int, width: int, rows: slice, cols: slice) -> dict:
    mask = np.zeros((height, width), np.uint8)
    mask[rows, cols] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


@pytest.fixture()
def record(tmp_path) -> dict:
    """A 60 x 100 image with a polygon object, an RLE object, a crowd region and a zero-width
    box."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([xs * 2, ys * 4, (xs + ys) % 256], axis=-1).astype(np.uint8)
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), image)
    return {
        "file_name": str(path),
        "image_id": 7,
        "height": HEIGHT,
        "width": WIDTH,
        "annotations": [
            {
                "bbox": [10.0, 10.0, 40.0, 30.0],
                "category_id": 0,
                "iscrowd": 0,
                "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]],
            },
            {
                "bbox": [0.0, 0.0, 100.0, 60.0],
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": _rle(HEIGHT, WIDTH, slice(0, 60), slice(0, 100)),
            },
            {
                "bbox": [60.0, 35.0, 91.0, 51.0],
                "category_id": 2,
                "iscrowd": 0,
                "segmentation": _rle(HEIGHT, WIDTH, slice(35, 51), slice(60, 91)),
            },
            {
                "bbox": [100.0, 5.0, 100.0, 9.0],
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[99, 5, 100, 5, 100, 9]],
            },
        ],
    }


def _mapper(is_train: bool = True, **kwargs) -> DatasetMapper:
    options = {
        "min_sizes": (120,),
        "max_size": 1000,
        "hflip": True,
        "image_format": "BGR",
        "flip_class_map": {0: 2, 2: 0},
    }
    options.update(kwargs)
    return DatasetMapper(is_train, **options)


def _flipped_and_not(mapper: DatasetMapper, record: dict) -> tuple[dict, dict]:
    """Outputs of ``mapper`` without and with a flip (found by trying seeds)."""
    outputs = {}
    for seed in range(20):
        out = mapper(record, np.random.default_rng(seed))
        flipped = out["instances"]["labels"][0].item() == 2
        outputs.setdefault(flipped, out)
    return outputs[False], outputs[True]


def _mask_box(mask: torch.Tensor) -> list[int]:
    ys, xs = np.nonzero(mask.numpy())
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize(
    "h, w, short, max_size, expected",
    [
        (480, 640, 800, 1333, (800, 1067)),
        (640, 480, 800, 1333, (1067, 800)),
        (100, 1000, 800, 1333, (133, 1333)),
        (861, 1024, 800, 1333, (800, 951)),
        (500, 500, 64, 1333, (64, 64)),
        (2, 5, 1, 100, (1, 3)),  # 2.5 rounds up (not to even)
    ],
)
def test_resize_rule(h, w, short, max_size, expected):
    assert resized_shape(h, w, short, max_size) == expected


def test_output_format_and_alignment(record):
    before = copy.deepcopy(record)
    plain, flipped = _flipped_and_not(_mapper(), record)
    assert record == before
    for out in (plain, flipped):
        assert (out["height"], out["width"], out["image_id"]) == (HEIGHT, WIDTH, 7)
        image, inst = out["image"], out["instances"]
        assert image.dtype == torch.uint8 and image.shape == (3, 120, 200) and image.is_contiguous()
        assert inst["boxes"].dtype == torch.float32 and inst["labels"].dtype == torch.int64
        assert inst["masks"].dtype == torch.bool and inst["masks"].shape == (2, 120, 200)
        for box, mask in zip(inst["boxes"], inst["masks"]):
            np.testing.assert_allclose(_mask_box(mask), box.numpy(), atol=1.5)
    # Crowd and degenerate annotations are gone; the polygon and the RLE object stay, scaled x2.
    expected = torch.tensor([[20.0, 20, 80, 60], [120, 70, 182, 102]])
    torch.testing.assert_close(plain["instances"]["boxes"], expected)
    assert plain["instances"]["labels"].tolist() == [0, 2]
    expected = torch.tensor([[120.0, 20, 180, 60], [18, 70, 80, 102]])
    torch.testing.assert_close(flipped["instances"]["boxes"], expected)
    assert flipped["instances"]["labels"].tolist() == [2, 0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["instances"]["masks"], plain["instances"]["masks"].flip(-1))


def test_resized_image_matches_pil_bilinear(record):
    out = _mapper(False, min_sizes=(90,), max_size=1000)(record)
    assert out["image"].shape == (3, 90, 150) and "instances" not in out
    source = Image.fromarray(cv2.imread(record["file_name"]))
    expected = np.asarray(source.resize((150, 90), Image.BILINEAR))
    assert torch.equal(out["image"], torch.from_numpy(expected.transpose(2, 0, 1).copy()))


def test_rgb_format_and_range_sampling(record):
    options = {"min_sizes": (100, 140), "size_sampling": "range", "hflip": False}
    bgr = _mapper(**options)(record, np.random.default_rng(3))
    rgb = _mapper(**options, image_format="RGB")(record, np.random.default_rng(3))
    assert torch.equal(rgb["image"], bgr["image"].flip(0))
    ranged = _mapper(**options)
    sizes = {ranged(record, np.random.default_rng(s))["image"].shape[1] for s in range(30)}
    assert min(sizes) >= 100 and max(sizes) <= 140 and len(sizes) > 5


@pytest.mark.parametrize("is_train", [True, False])
def test_transposed_image_is_an_error_and_is_never_transposed(record, tmp_path, is_train):
    """Without an EXIF orientation that rotates it, an image stored transposed to its record
    would put the boxes off the objects: an error naming the file, in training too."""
    path = tmp_path / "transposed.png"
    cv2.imwrite(str(path), cv2.imread(record["file_name"]).transpose(1, 0, 2).copy())
    with pytest.raises(
        ValueError, match=r"transposed.png.* is 60x100 .* says 100x60 .*not transposed"
    ):
        _mapper(is_train)({**record, "file_name": str(path)}, np.random.default_rng(0))
    cv2.imwrite(str(path), np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="transposed.png"):
        _mapper(is_train)({**record, "file_name": str(path)}, np.random.default_rng(0))


@pytest.mark.parametrize("content", [None, b"not an image at all"])
def test_unreadable_image(record, tmp_path, caplog, content):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    bad = {**record, "file_name": str(path)}
    with caplog.at_level(logging.WARNING, logger="boxteacher.data.mapper"):
        assert _mapper()(bad, np.random.default_rng(0)) is None
    assert "bad.jpg" in caplog.text
    with pytest.raises(OSError, match=r"bad.jpg.*image_id 7"):
        _mapper(False)(bad)


def test_missing_segmentation_is_an_error(record):
    record["annotations"][0] = {
        k: v for k, v in record["annotations"][0].items() if k != "segmentation"
    }
    with pytest.raises(ValueError, match=r"Image 7: annotation #0 has no segmentation"):
        _mapper()(record, np.random.default_rng(0))
    out = _mapper(with_masks=False)(record, np.random.default_rng(0))
    assert "masks" not in out["instances"] and len(out["instances"]["boxes"]) == 2


def test_empty_annotations(record):
    out = _mapper()({**record, "annotations": []}, np.random.default_rng(0))
    assert out["instances"]["boxes"].shape == (0, 4) and out["instances"]["masks"].shape == (
        0,
        120,
        200,
    )


def test_flip_class_map_from_names(caplog):
    classes = ["wheel", "left_door", "right_door", "left_mirror", "right_mirror"]
    assert build_flip_class_map([["left_door", "right_door"]], classes) == {1: 2, 2: 1}
    with pytest.raises(ValueError, match="'left_dor'"):
        build_flip_class_map([["left_dor", "right_door"]], classes)
    with caplog.at_level(logging.WARNING, logger="boxteacher.data.mapper"):
        assert build_flip_class_map([], classes) is None
    assert "FLIP_CLASS_PAIRS" in caplog.text and "left_door" in caplog.text


def test_carparts_flip_swaps_left_and_right(shared_data):
    CARPARTS = shared_data / "carparts"
    cfg = get_cfg()
    json_file = str(CARPARTS / "annotations" / "instances_val.json")
    cfg.DATASETS.REGISTER = [["test_mapper_carparts", json_file, str(CARPARTS / "images")]]
    cfg.DATASETS.TRAIN = ("test_mapper_carparts",)
    cfg.DATASETS.FLIP_CLASS_PAIRS = [
        ["back_left_door", "back_right_door"],
        ["left_mirror", "right_mirror"],
    ]
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    register_datasets_from_config(cfg)
    mapper = DatasetMapper.from_config(cfg, is_train=True, spec=ArchitectureSpec())
    assert mapper.flip_class_map == {2: 4, 4: 2, 13: 14, 14: 13}
    record = next(
        r
        for r in get_dataset_records("test_mapper_carparts")
        if any(a["category_id"] == 2 for a in r["annotations"])
    )
    labels = [a["category_id"] for a in record["annotations"]]
    seen = set()
    for seed in range(10):
        out = mapper(record, np.random.default_rng(seed))
        mirrored = out["instances"]["labels"].tolist()
        seen.add(tuple(mirrored))
        assert mirrored in (
            labels,
            [{2: 4, 4: 2, 13: 14, 14: 13}.get(label, label) for label in labels],
        )
    assert len(seen) == 2
    cfg.DATASETS.FLIP_CLASS_PAIRS = [["back_left_door", "rear_right_door"]]
    with pytest.raises(ValueError, match="rear_right_door"):
        DatasetMapper.from_config(cfg, is_train=True, spec=ArchitectureSpec())
