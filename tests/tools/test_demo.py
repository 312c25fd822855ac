"""The picture helpers (``boxteacher.utils.visualizer``), ``Predictor``, ``boxteacher.demo`` and
``tools/demo.py`` on tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from boxteacher.build import build_model
from boxteacher.config import load_config
from boxteacher.data import DatasetMapper
from boxteacher.demo import ClassNames, expand_inputs, run_demo, unique_output_names
from boxteacher.engine import Predictor
from boxteacher.utils.visualizer import (
    draw_instances,
    instance_colors,
    save_png,
    side_by_side,
)

from tiny_models import REPO, tiny_cfg

# Few detections at a small test size, and class names and json ids (1, 3, 7) from shapes_val,
# whose metadata needs no file.
TINY_DEMO = [
    "DATASETS.TEST",
    "('shapes_val',)",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "96",
    "MODEL.FCOS.POST_NMS_TOPK_TEST",
    "4",
    "MODEL.FCOS.PRIOR_PROB",
    "0.5",
]


# ---------------------------------------------------------------------------------------------
# Visualizer
# ---------------------------------------------------------------------------------------------
def test_instance_colors_are_distinct_and_deterministic():
    colors = instance_colors(30)
    assert colors.shape == (30, 3) and colors.dtype == np.uint8
    assert len({tuple(c) for c in colors}) == 30
    np.testing.assert_array_equal(colors, instance_colors(30))
    np.testing.assert_array_equal(colors[:5], instance_colors(5))
    # Neighbours in the list differ clearly, not by a rounding step.
    gaps = np.abs(np.diff(colors[:8].astype(int), axis=0)).sum(axis=1)
    assert gaps.min() > 100
    assert instance_colors(0).shape == (0, 3)


def test_draw_instances_colours_inside_the_mask_and_leaves_far_pixels_alone():
    image = np.full((60, 80, 3), 50, dtype=np.uint8)
    masks = np.zeros((2, 60, 80), dtype=bool)
    masks[0, 20:40, 10:30] = True
    masks[1, 30:50, 50:70] = True
    colors = np.array([[255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    out = draw_instances(image, masks, colors=colors, alpha=0.5)

    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, 50)  # input untouched
    np.testing.assert_array_equal(out[30, 20], [152, 25, 25])  # inside: half image, half red
    np.testing.assert_array_equal(out[40, 60], [25, 25, 152])
    np.testing.assert_array_equal(out[28:33, 14:26], np.broadcast_to([152, 25, 25], (5, 12, 3)))
    far = np.ones((60, 80), dtype=bool)
    far[15:45, 5:35] = False
    far[25:55, 45:75] = False
    np.testing.assert_array_equal(out[far], image[far])


def test_draw_instances_boxes_and_tags_are_drawn_near_their_instance():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    boxes = np.array([[40.0, 50.0, 90.0, 90.0]])
    out = draw_instances(
        image, boxes=boxes, labels=["cat"], scores=[0.9], colors=np.array([[0, 255, 0]])
    )
    changed = np.argwhere(out.any(axis=2))
    assert out[70, 40, 1] > 200 and out[50, 60, 1] > 200  # the rectangle's edges (anti-aliased)
    assert changed[:, 0].min() >= 50 - 20 and changed[:, 1].min() >= 38  # the tag sits on the box
    assert not out[:25].any() and not out[:, :35].any()


def test_draw_instances_without_instances_copies_the_image():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for out in (
        draw_instances(image),
        draw_instances(image, np.zeros((0, 20, 30), bool), labels=[], scores=[]),
    ):
        np.testing.assert_array_equal(out, image)
        assert out is not image


def test_draw_instances_rejects_inconsistent_inputs():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="masks must be"):
        draw_instances(image, np.zeros((1, 30, 20), bool))
    with pytest.raises(ValueError, match="differ in length"):
        draw_instances(image, np.zeros((2, 20, 30), bool), labels=["a"])
    with pytest.raises(ValueError, match="uint8"):
        draw_instances(image.astype(np.float32))


def test_side_by_side_pads_to_the_tallest_panel_and_adds_titles():
    a = np.zeros((40, 30, 3), dtype=np.uint8)
    b = np.full((25, 50, 3), 9, dtype=np.uint8)
    row = side_by_side([a, b])
    assert row.shape == (40, 80, 3)
    np.testing.assert_array_equal(row[:25, 30:], b)
    np.testing.assert_array_equal(row[:, :30], a)
    titled = side_by_side([a, b], titles=["gt", "predictions"])
    assert titled.shape[1] == 80 and titled.shape[0] > 40
    np.testing.assert_array_equal(titled[-40:], row)
    with pytest.raises(ValueError, match="titles"):
        side_by_side([a, b], titles=["one"])


def test_save_png_round_trips_and_creates_folders(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (12, 17, 3), dtype=np.uint8)
    path = tmp_path / "a" / "b" / "picture.png"
    save_png(str(path), image)
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), image)
    assert [p.name for p in path.parent.iterdir()] == ["picture.png"]


# ---------------------------------------------------------------------------------------------
# tools/demo.py
# ---------------------------------------------------------------------------------------------
def write_tiny_setup(tmp_path, *overrides):
    """A tiny config file and a checkpoint of randomly initialised weights for it."""
    cfg = tiny_cfg(*TINY_DEMO, *overrides)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(cfg.dump())
    torch.manual_seed(0)
    model = build_model(cfg)
    weights = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict()}, weights)
    return config_file, weights, model


def write_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {
        "first.png": rng.integers(0, 256, (50, 70, 3), dtype=np.uint8),
        "second.jpg": rng.integers(0, 256, (64, 48, 3), dtype=np.uint8),
    }
    for name, image in images.items():
        cv2.imwrite(str(folder / name), image)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return {name: cv2.imread(str(folder / name)) for name in images}


@pytest.mark.slow
def test_demo_draws_and_records_every_readable_image_and_skips_the_corrupt_one(tmp_path):
    config_file, weights, _ = write_tiny_setup(tmp_path)
    images = write_images(tmp_path / "images")
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/demo.py"),
            "--config-file",
            str(config_file),
            "--input",
            str(tmp_path / "images"),
            "--output",
            str(out_dir),
            "--confidence-threshold",
            "0",
            "MODEL.WEIGHTS",
            str(weights),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "broken.jpg" in proc.stderr and "could not be decoded" in proc.stderr
    assert "Wrote 2 pictures" in proc.stdout and "1 inputs skipped" in proc.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["first.png", "results.json", "second.png"]
    for name, image in images.items():
        assert cv2.imread(str(out_dir / (Path(name).stem + ".png"))).shape == image.shape

    results = json.loads((out_dir / "results.json").read_text())
    assert {r["file_name"] for r in results} == {str(tmp_path / "images" / n) for n in images}
    assert {r["category_id"] for r in results} <= {1, 3, 7}
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 50, "width": 70}, {"id": 2, "height": 64, "width": 48}],
        "categories": [{"id": i} for i in (1, 3, 7)],
        "annotations": [],
    }
    gt.createIndex()
    loaded = gt.loadRes(results)
    for ann in loaded.dataset["annotations"]:
        height, width = (50, 70) if ann["image_id"] == 1 else (64, 48)
        assert ann["segmentation"]["size"] == [height, width]
        assert mask_util.decode(ann["segmentation"]).shape == (height, width)
        assert len(ann["bbox"]) == 4 and ann["bbox"][2] >= 0 and ann["bbox"][3] >= 0
        assert isinstance(ann["segmentation"]["counts"], str)


def test_demo_with_boxteacher_predicts_with_the_teacher_at_the_test_size(tmp_path):
    config_file, weights, model = write_tiny_setup(
        tmp_path, "MODEL.META_ARCHITECTURE", "BoxTeacher", "MODEL.BOXINST.ENABLED", "True"
    )
    images = write_images(tmp_path / "images")
    out_dir = tmp_path / "out"
    path = str(tmp_path / "images" / "first.png")
    cfg = load_config(str(config_file), ["MODEL.WEIGHTS", str(weights)])
    assert run_demo(Predictor(cfg), [path], str(out_dir), 0.3)[0] == 1

    height, width = images["first.png"].shape[:2]
    record = {"file_name": path, "image_id": 1, "height": height, "width": width}
    sample = DatasetMapper.from_config(cfg, is_train=False)(record)
    model.eval()
    teacher, student = (
        net([sample])[0]["instances"]["scores"] for net in (model.teacher, model.student)
    )
    assert not torch.equal(teacher, student)
    recorded = [r["score"] for r in json.loads((out_dir / "results.json").read_text())]
    assert recorded, "the tiny model should give detections above 0.3"
    np.testing.assert_allclose(
        sorted(recorded), sorted(teacher[teacher >= 0.3].tolist()), rtol=1e-5
    )


def test_demo_draws_nothing_below_the_threshold_and_numbers_unknown_classes(tmp_path):
    config_file, weights, _ = write_tiny_setup(tmp_path, "DATASETS.TEST", "()")
    images = write_images(tmp_path / "images")
    out_dir = tmp_path / "out"
    predictor = Predictor(load_config(str(config_file), ["MODEL.WEIGHTS", str(weights)]))
    inputs = [str(tmp_path / "images/*.png"), str(tmp_path / "images/first.png")]
    assert run_demo(predictor, inputs, str(out_dir), 1.01) == (1, 0, 0)
    assert sorted(p.name for p in out_dir.iterdir()) == ["first.png", "results.json"]
    np.testing.assert_array_equal(cv2.imread(str(out_dir / "first.png")), images["first.png"])
    assert json.loads((out_dir / "results.json").read_text()) == []
    assert ClassNames.from_config(predictor.cfg) == ClassNames(["0", "1", "2"], [0, 1, 2])


def test_demo_fails_when_no_image_can_be_read(tmp_path):
    config_file, weights, _ = write_tiny_setup(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"garbage")
    predictor = Predictor(load_config(str(config_file), ["MODEL.WEIGHTS", str(weights)]))
    with pytest.raises(FileNotFoundError, match="could be read"):
        run_demo(
            predictor,
            [str(tmp_path / "broken.png"), str(tmp_path / "missing.jpg")],
            str(tmp_path / "out"),
            0.5,
        )
    assert not (tmp_path / "out" / "results.json").exists()


def test_output_names_are_unique_and_inputs_are_expanded_once(tmp_path):
    names = unique_output_names(["a/x.jpg", "b/x.png", "x.png", "y.jpg"])
    assert names == ["x.png", "x_1.png", "x_2.png", "y.png"]
    write_images(tmp_path / "images")
    folder = str(tmp_path / "images")
    expanded = expand_inputs([folder, f"{folder}/*.jpg", f"{folder}/first.png", "missing.png"])
    assert [Path(p).name for p in expanded] == [
        "broken.jpg",
        "first.png",
        "second.jpg",
        "missing.png",
    ]


@pytest.mark.slow
def test_demo_reports_config_overrides_given_as_inputs_and_missing_weights(tmp_path):
    misplaced = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/demo.py"),
            "--config-file",
            "c.yaml",
            "--output",
            "o",
            "--input",
            "a.jpg",
            "MODEL.WEIGHTS",
            "w.pth",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert misplaced.returncode == 2 and "put config overrides after --output" in misplaced.stderr
    config_file, _, _ = write_tiny_setup(tmp_path)
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        Predictor(load_config(str(config_file)))


@pytest.mark.slow
def test_demo_runs_on_the_checkpoint_of_a_short_training_run(tmp_path):
    """train_net.py trains the tiny model for 2 iterations on the built-in shapes set; the demo
    loads its model_final.pth (a full training checkpoint) and draws with the dataset's names."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets")}
    cfg = tiny_cfg(
        *TINY_DEMO,
        "DATASETS.TRAIN",
        "('shapes_train',)",
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "SEED",
        "0",
        "OUTPUT_DIR",
        str(tmp_path / "run"),
    )
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(cfg.dump())
    train = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_net.py"),
            "--config-file",
            str(config_file),
            "DATASETS.TEST",
            "()",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    write_images(tmp_path / "images")
    out_dir = tmp_path / "out"
    demo = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/demo.py"),
            "--config-file",
            str(config_file),
            "--input",
            str(tmp_path / "images"),
            "--output",
            str(out_dir),
            "--confidence-threshold",
            "0",
            "MODEL.WEIGHTS",
            str(tmp_path / "run/model_final.pth"),
            "MODEL.FCOS.INFERENCE_TH_TEST",
            "0.0",
        ],  # two iterations may leave every score low
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["first.png", "results.json", "second.png"]
    results = json.loads((out_dir / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 3, 7}  # the shapes json ids
