"""``tools/export_pseudo_masks.py`` and ``boxteacher.pseudo_export`` on a tiny BoxTeacher whose
weights the tests write, and a small COCO file of drawn shapes (non-contiguous category ids,
a crowd region, an image without annotations, polygon and RLE masks, a box without mask)."""

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from boxteacher.build import build_model, build_pseudo_labelling_model
from boxteacher.config import load_config
from boxteacher.data import catalog
from boxteacher.data.coco import load_coco_json
from boxteacher.engine.checkpoint import Checkpointer
from boxteacher.evaluation import COCOEvaluator
from boxteacher.evaluation.pseudo_mask_iou import pseudo_mask_report
from boxteacher.pseudo_export import ExportSettings, PseudoMaskExporter, box_labels

from tiny_models import REPO, TINY_MODEL_OVERRIDES, label_one

# A small test size, every detection kept, and a low assignment IoU: the randomly initialised
# teacher (its box regression biased towards boxes of 2 strides) then matches most boxes.
OVERRIDES = [
    *TINY_MODEL_OVERRIDES,
    "MODEL.FCOS.NUM_CLASSES",
    "2",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "128",
    "MODEL.FCOS.INFERENCE_TH_TEST",
    "0.0",
    "MODEL.BOX_TEACHER.IOU_THR",
    "0.2",
]
BOXTEACHER_YAML = "MODEL:\n  META_ARCHITECTURE: BoxTeacher\n  BOXINST:\n    ENABLED: True\n"
BOXINST_YAML = "MODEL:\n  BOXINST:\n    ENABLED: True\n"
SIZES = {1: (72, 96), 2: (64, 80), 3: (80, 64), 4: (64, 64)}  # image id -> (height, width)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _ann(ann_id, image_id, category_id, bbox, segmentation=None, iscrowd=0):
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": iscrowd,
        "note": f"object {ann_id}",
    }
    if segmentation is not None:
        ann["segmentation"] = segmentation
    return ann


def write_dataset(root: Path) -> Path:
    """Images with a rectangle (polygon) and an ellipse (RLE) each, a crowd region on image 1,
    a box without mask on image 4, and image 3 without annotations; categories 3 and 7."""
    images, anns = {}, []
    for image_id, (h, w) in SIZES.items():
        images[image_id] = np.full((h, w, 3), 40, np.uint8)
    for ann_id, image_id, category_id, (x, y, bw, bh) in (
        (11, 1, 3, (8, 10, 30, 36)),
        (21, 2, 7, (40, 8, 28, 24)),
    ):
        cv2.rectangle(images[image_id], (x, y), (x + bw - 1, y + bh - 1), (0, 200, 0), -1)
        anns.append(
            _ann(
                ann_id,
                image_id,
                category_id,
                [x, y, bw, bh],
                [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
            )
        )
    for ann_id, image_id, category_id, (cx, cy, ax, ay) in (
        (12, 1, 7, (68, 38, 14, 20)),
        (22, 2, 3, (20, 44, 12, 10)),
    ):
        mask = np.zeros(SIZES[image_id], np.uint8)
        cv2.ellipse(mask, (cx, cy), (ax, ay), 0, 0, 360, 1, -1)
        images[image_id][mask > 0] = (200, 60, 0)
        ys, xs = np.nonzero(mask)
        box = [
            int(xs.min()),
            int(ys.min()),
            int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1),
        ]
        anns.append(_ann(ann_id, image_id, category_id, box, _rle(mask)))
    crowd = np.zeros(SIZES[1], np.uint8)
    crowd[56:70, 40:90] = 1
    anns.append(_ann(13, 1, 7, [40, 56, 50, 14], _rle(crowd), iscrowd=1))
    cv2.circle(images[4], (32, 30), 14, (30, 30, 220), -1)
    anns.append(_ann(41, 4, 7, [18, 16, 29, 29]))
    for image_id, pixels in images.items():
        cv2.imwrite(str(root / f"{image_id}.png"), pixels)
    data = {
        "info": {"description": "export test"},
        "licenses": [{"id": 1, "name": "none"}],
        "images": [
            {"id": i, "file_name": f"{i}.png", "height": h, "width": w, "license": 1}
            for i, (h, w) in SIZES.items()
        ],
        "categories": [{"id": 3, "name": "rectangle"}, {"id": 7, "name": "ellipse"}],
        "annotations": anns,
    }
    path = root / "boxes.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The dataset, a BoxTeacher config and its weights (teacher boxes biased to be large)."""
    root = tmp_path_factory.mktemp("export")
    config = root / "boxteacher.yaml"
    config.write_text(BOXTEACHER_YAML)
    torch.manual_seed(0)
    model = build_model(load_config(str(config), OVERRIDES))
    with torch.no_grad():
        model.teacher.proposal_generator.fcos_head.bbox_pred.bias.fill_(1.0)
    torch.save({"model": model.state_dict()}, root / "model.pth")
    return {
        "json": write_dataset(root),
        "images": root,
        "config": config,
        "weights": root / "model.pth",
    }


def load_teacher(files, yaml=None, root=None):
    config = files["config"]
    if yaml is not None:
        config = root / "other.yaml"
        config.write_text(yaml)
    cfg = load_config(str(config), [*OVERRIDES, "MODEL.WEIGHTS", str(files["weights"])])
    model = build_pseudo_labelling_model(cfg)
    Checkpointer(model).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    return model, cfg


@pytest.fixture(scope="module")
def teacher(files):
    return load_teacher(files)[0]


def export(files, model, images=None, **settings):
    data = json.loads(files["json"].read_text())
    return PseudoMaskExporter(model, ExportSettings(**settings)).export(
        data, str(images or files["images"])
    )


def non_crowd(data):
    return [a for a in data["annotations"] if not a["iscrowd"]]


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_tool_labels_every_box_keeps_the_rest_and_reports_the_iou(files, tmp_path):
    out = tmp_path / "pseudo.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/export_pseudo_masks.py"),
            "--config-file",
            str(files["config"]),
            "--json",
            str(files["json"]),
            "--images",
            str(files["images"]),
            "--output",
            str(out),
            "--batch-size",
            "2",
            *OVERRIDES,
            "MODEL.WEIGHTS",
            str(files["weights"]),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    original, exported = json.loads(files["json"].read_text()), json.loads(out.read_text())
    for key in ("info", "licenses", "images", "categories"):
        assert exported[key] == original[key], key
    assert len(exported["annotations"]) == len(original["annotations"])
    for before, after in zip(original["annotations"], exported["annotations"]):
        if before["iscrowd"]:
            assert after == before
            continue
        assert {
            k: v for k, v in after.items() if not k.startswith(("pseudo_mask_", "segmentation"))
        } == {k: v for k, v in before.items() if k != "segmentation"}
        assert (
            isinstance(after["pseudo_mask_matched"], bool)
            and 0.0 <= after["pseudo_mask_score"] <= 1.0
        )
        assert ("segmentation" in after) == after["pseudo_mask_matched"]

    coco = COCO(str(out))
    matched = [a for a in non_crowd(exported) if a["pseudo_mask_matched"]]
    assert len(matched) >= 3
    for ann in matched:
        assert isinstance(ann["segmentation"]["counts"], str)
        mask = coco.annToMask(ann)
        assert mask.shape == SIZES[ann["image_id"]] and mask.any()

    report = json.loads((tmp_path / "pseudo.report.json").read_text())
    assert report["boxes"] == 5 and report["matched"] == len(matched)
    assert report["matched_fraction"] == pytest.approx(len(matched) / 5)
    assert report["boxes_with_masks"] == 4 and 0.0 <= report["mean_iou"] <= 1.0
    assert [c["category_id"] for c in report["per_category"]] == [3, 7]
    assert [c["boxes"] for c in report["per_category"]] == [2, 3]
    assert report["unreadable_images"] == [] and report["weights"] == str(files["weights"])
    assert "| all" in proc.stdout and "ellipse" in proc.stdout

    # The project's loader reads the output (the image without annotations included).
    records = load_coco_json(str(out), str(files["images"]))
    assert [r["image_id"] for r in records] == [1, 2, 3, 4]
    assert sum(
        "segmentation" in a for r in records for a in r["annotations"] if not a["iscrowd"]
    ) == len(matched)


@pytest.mark.slow
def test_the_tool_refuses_to_overwrite_its_input(files):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/export_pseudo_masks.py"),
            "--config-file",
            str(files["config"]),
            "--json",
            str(files["json"]),
            "--images",
            str(files["images"]),
            "--output",
            str(files["json"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--output must differ from --json" in proc.stderr


# ---------------------------------------------------------------------------------------------
# The exporter
# ---------------------------------------------------------------------------------------------
def test_a_high_score_threshold_unmatches_every_box_and_box_fallback_fills_the_boxes(
    files, teacher
):
    scores = [a["pseudo_mask_score"] for a in non_crowd(export(files, teacher).data)]
    none = export(files, teacher, min_score=2.0).data
    assert all(not a["pseudo_mask_matched"] and "segmentation" not in a for a in non_crowd(none))
    assert [a["pseudo_mask_score"] for a in non_crowd(none)] == pytest.approx(scores)

    filled = export(files, teacher, min_score=2.0, box_fallback=True).data
    assert non_crowd(filled) and all(not a["pseudo_mask_matched"] for a in non_crowd(filled))
    for ann in non_crowd(filled):
        x, y, w, h = ann["bbox"]
        expected = np.zeros(SIZES[ann["image_id"]], np.uint8)
        expected[y : y + h, x : x + w] = 1
        np.testing.assert_array_equal(mask_util.decode(ann["segmentation"]), expected)
    crowd = next(a for a in filled["annotations"] if a["iscrowd"])
    assert crowd == next(
        a for a in json.loads(files["json"].read_text())["annotations"] if a["iscrowd"]
    )


def test_exported_masks_are_ground_truth_for_the_coco_evaluator(files, teacher, tmp_path):
    """Register the exported file as a dataset; its own masks as predictions score AP 100."""
    median = float(
        np.median([a["pseudo_mask_score"] for a in non_crowd(export(files, teacher).data)])
    )
    exported = export(files, teacher, min_score=median, box_fallback=True).data
    assert {a["pseudo_mask_matched"] for a in non_crowd(exported)} == {True, False}
    path = tmp_path / "exported.json"
    path.write_text(json.dumps(exported))
    catalog.register_dataset(
        "export_roundtrip",
        list,
        json_file=str(path),
        image_root=str(files["images"]),
        evaluator_type="coco",
        thing_classes=["rectangle", "ellipse"],
        thing_dataset_id_to_contiguous_id={3: 0, 7: 1},
    )
    evaluator = COCOEvaluator("export_roundtrip", distributed=False)
    evaluator.reset()
    for image in exported["images"]:
        anns = [a for a in non_crowd(exported) if a["image_id"] == image["id"]]
        boxes = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32
        )
        masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in anns]
        empty = np.zeros((0, image["height"], image["width"]), dtype=bool)
        instances = {
            "boxes": boxes.reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor(
                [{3: 0, 7: 1}[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "masks": torch.from_numpy(np.stack(masks) if masks else empty),
        }
        evaluator.process([{"image_id": image["id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0) and results["bbox"]["AP"] == pytest.approx(
        100.0
    )


def test_an_unreadable_image_is_named_and_its_boxes_stay_unmatched(
    files, teacher, tmp_path, caplog
):
    images = tmp_path / "images"
    images.mkdir()
    for image_id in (1, 2, 4):
        (images / f"{image_id}.png").write_bytes((files["images"] / f"{image_id}.png").read_bytes())
    (images / "2.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="boxteacher.pseudo_export"):
        result = export(files, teacher, images=images)
    assert result.unreadable_images == [str(images / "2.png")]
    assert any(
        "2.png" in r.getMessage() and "could not be decoded" in r.getMessage()
        for r in caplog.records
    )
    by_image = {}
    for ann in non_crowd(result.data):
        by_image.setdefault(ann["image_id"], []).append(ann["pseudo_mask_matched"])
    assert by_image[2] == [False, False] and any(by_image[1])
    with pytest.raises(OSError, match="in a row could not be read"):
        data = json.loads(files["json"].read_text())
        data["images"] = [
            {"id": 1, "file_name": f"missing{i}.png", "height": 72, "width": 96} for i in range(12)
        ]
        data["images"] = [dict(image, id=100 + i) for i, image in enumerate(data["images"])]
        data["annotations"] = [_ann(i, 100 + i, 3, [1, 1, 9, 9]) for i in range(12)]
        PseudoMaskExporter(teacher).export(data, str(images))


def test_a_boxinst_config_exports_what_the_boxteacher_teacher_exports(files, teacher, tmp_path):
    """A one-network config loads the teacher of the checkpoint (into both networks of the
    labelling model) and gets the teacher pass of the config (test size, assignment IoU), so it
    labels the boxes the same way."""
    model, cfg = load_teacher(files, BOXINST_YAML, tmp_path)
    assert (
        model.teacher_view.settings.min_size == 64
        and model.teacher_view.settings.candidate_iou == pytest.approx(0.2)
    )
    assert model.labeler.iou_threshold == pytest.approx(0.2) and model.teacher_eval_mode
    assert export(files, model).data == export(files, teacher).data


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("refine_radius", [0, 3])
def test_box_labels_are_the_pseudo_labels_of_training(files, refine_radius):
    cfg = load_config(
        str(files["config"]), [*OVERRIDES, "MODEL.BOX_TEACHER.REFINE_RADIUS", str(refine_radius)]
    )
    model = build_model(cfg)
    settings = ExportSettings.from_config(cfg)
    exporting = build_pseudo_labelling_model(cfg)
    refinement = exporting.labeler.refinement
    assert refinement == model.labeler.refinement and (refine_radius == 0) == (refinement is None)
    h, w = 64, 64
    probs = torch.zeros(3, h, w)
    probs[0, 40:50, 40:50] = 0.9
    probs[1, 35:50, 35:50] = 0.8
    probs[2, 0:30, 0:30] = 0.3  # an empty mask at threshold 0.5
    prediction = {
        "boxes": torch.tensor([[31.0, 31, 59, 59], [100, 100, 110, 110], [0, 0, 30, 30]]),
        "scores": torch.tensor([0.9, 0.8, 0.95]),
        "mask_scores": torch.tensor([0.7, 0.6, 0.2]),
        "mask_probs": probs,
    }
    boxes = torch.tensor([[8.0, 8, 22, 22], [30, 30, 60, 60], [0, 0, 30, 30], [60, 0, 64, 4]])
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:, 41:49, 40:51] = 200  # the object of the mask of detection 0 (rows and columns 40:50)
    sample = {
        "image": image,
        "height": h,
        "width": w,
        "instances": {"boxes": boxes, "labels": torch.zeros(4, dtype=torch.int64)},
    }
    training = label_one(model, sample, prediction)
    out = box_labels(exporting.assign([sample], [prediction])[0], settings)
    assert torch.equal(out["masks"], training["pseudo_masks"])
    assert torch.equal(out["masks"][1], probs[0] > 0.5 if refine_radius == 0 else image[0] > 0)
    assert torch.equal(out["scores"], training["pseudo_weights"])
    assert out["matched"].tolist() == [
        False,
        True,
        False,
        False,
    ]  # no detection, match, empty mask, none
    assert (
        box_labels(exporting.assign([sample], [prediction])[0], ExportSettings(min_score=0.75))[
            "matched"
        ].tolist()
        == [False] * 4
    )
    nothing = {k: v[:0] for k, v in prediction.items()}
    empty = box_labels(exporting.assign([sample], [nothing])[0], ExportSettings())
    assert (
        empty["masks"].shape == (4, h, w)
        and not empty["matched"].any()
        and not empty["scores"].any()
    )


def test_the_report_by_hand():
    square = np.zeros((20, 20), np.uint8)
    square[0:10, 0:10] = 1
    shifted = np.roll(square, 5, axis=1)  # IoU 50 / 150
    original = {
        "images": [{"id": 1, "height": 20, "width": 20}],
        "categories": [{"id": 7, "name": "b"}, {"id": 2, "name": "a"}],
        "annotations": [
            _ann(1, 1, 2, [0, 0, 10, 10], [[0, 0, 10, 0, 10, 10, 0, 10]]),  # exported exactly
            _ann(2, 1, 2, [0, 0, 10, 10], _rle(square)),  # exported shifted
            _ann(3, 1, 7, [0, 0, 10, 10], _rle(square)),  # unmatched: IoU 0
            _ann(4, 1, 7, [0, 0, 10, 10]),  # no true mask
            _ann(5, 1, 7, [0, 0, 10, 10], _rle(square), iscrowd=1),  # left out
        ],
    }
    exported = copy.deepcopy(original)
    for ann, mask in zip(exported["annotations"][:2], (square, shifted)):
        ann.update(segmentation=_rle(mask), pseudo_mask_matched=True)
    del exported["annotations"][2]["segmentation"]
    exported["annotations"][2]["pseudo_mask_matched"] = False
    exported["annotations"][3].update(segmentation=_rle(square), pseudo_mask_matched=True)
    report = pseudo_mask_report(original, exported)
    assert (report["boxes"], report["matched"], report["boxes_with_masks"]) == (4, 3, 3)
    assert report["matched_fraction"] == pytest.approx(0.75)
    assert report["mean_iou"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert report["mean_iou_matched"] == pytest.approx((1 + 1 / 3) / 2)
    a, b = report["per_category"]
    assert (a["name"], a["mean_iou"], a["matched_fraction"]) == ("a", pytest.approx(2 / 3), 1.0)
    assert (b["name"], b["boxes"], b["boxes_with_masks"]) == ("b", 2, 1)
    assert (b["mean_iou"], b["mean_iou_matched"]) == (0.0, None)
    boxes_only = {**original, "annotations": [_ann(1, 1, 2, [0, 0, 10, 10])]}
    assert pseudo_mask_report(boxes_only, boxes_only)["mean_iou"] is None
