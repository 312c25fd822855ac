"""COCO evaluation: GT-as-prediction gives AP 100, id mapping, hand-checked IoU cases, empty and
box-only outputs, the results file, the inference loop and the distributed gather."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from boxteacher.data import catalog
from boxteacher.evaluation import (
    COCOEvaluator,
    flatten_results_dict,
    inference_on_dataset,
    print_csv_format,
)

from tiny_models import SHARED_DATA

COCO128_JSON = SHARED_DATA / "coco128" / "annotations" / "instances_train2017.json"
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# pycocotools' mask.decode (behind annToMask) trips a NumPy 2 deprecation; not ours to fix.


# ----------------------------------------------------------------------------- helpers
def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _tiny_json(path: Path) -> Path:
    """3 images (the last without annotations), non-contiguous category ids 1, 3, 7, one crowd
    RLE region, and no ``info`` / ``licenses`` keys."""
    crowd = np.zeros((48, 64), dtype=np.uint8)
    crowd[30:46, 40:62] = 1
    # Uncompressed RLE, column-major, starting with a run of zeros.
    flat = crowd.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    annotations = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "iscrowd": 0,
            "bbox": [4, 4, 20, 16],
            "area": 320,
            "segmentation": [_rect(4, 4, 24, 20)],
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 7,
            "iscrowd": 0,
            "bbox": [28, 6, 10, 30],
            "area": 300,
            "segmentation": [_rect(28, 6, 38, 36)],
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 1,
            "bbox": [40, 30, 22, 16],
            "area": 352,
            "segmentation": {"size": [48, 64], "counts": counts},
        },
        {
            "id": 4,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [10, 12, 24, 20],
            "area": 480,
            "segmentation": [_rect(10, 12, 34, 32)],
        },
        {
            "id": 5,
            "image_id": 2,
            "category_id": 3,
            "iscrowd": 0,
            "bbox": [2, 30, 30, 12],
            "area": 360,
            "segmentation": [_rect(2, 30, 32, 42)],
        },
    ]
    data = {
        "images": [
            {"id": i, "file_name": f"{i}.jpg", "height": 48, "width": 64} for i in (1, 2, 3)
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}],
        "annotations": annotations,
    }
    path.write_text(json.dumps(data))
    return path


def _register(name: str, json_file: Path) -> COCO:
    """Register ``json_file`` in the catalog (contiguous ids in category-id order)."""
    coco = COCO(str(json_file))
    cat_ids = sorted(coco.getCatIds())
    catalog.register_dataset(
        name,
        list,
        json_file=str(json_file),
        image_root=str(json_file.parent),
        thing_classes=[coco.cats[c]["name"] for c in cat_ids],
        thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(cat_ids)},
        evaluator_type="coco",
    )
    return coco


def _gt_outputs(
    coco: COCO, image_ids, *, with_masks: bool = True, shift: float = 0.0, label_map=None
):
    """(inputs, outputs) with the non-crowd GT of each image as its predictions (score 1).

    ``shift`` moves every box and mask right by that fraction of the box width; ``label_map``
    remaps contiguous labels (to break the category mapping on purpose).
    """
    id_map = {c: i for i, c in enumerate(sorted(coco.getCatIds()))}
    for image_id in image_ids:
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes, masks, labels = [], [], []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            dx = round(shift * w)
            boxes.append([x + dx, y, x + w + dx, y + h])
            labels.append(id_map[ann["category_id"]])
            if with_masks:
                mask = coco.annToMask(ann).astype(bool)
                masks.append(np.roll(mask, dx, axis=1))
        if label_map is not None:
            labels = [label_map[label] for label in labels]
        instances = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        if with_masks:
            shape = (len(anns), info["height"], info["width"])
            instances["masks"] = (
                torch.from_numpy(np.stack(masks)) if masks else torch.zeros(shape, dtype=torch.bool)
            )
        inputs = {"image_id": image_id, "height": info["height"], "width": info["width"]}
        yield [inputs], [{"instances": instances}]


def _run(evaluator: COCOEvaluator, batches) -> dict:
    evaluator.reset()
    for inputs, outputs in batches:
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


@pytest.fixture
def tiny(tmp_path):
    coco = _register("eval_tiny", _tiny_json(tmp_path / "tiny.json"))
    return coco


@pytest.fixture
def coco128_json(shared_data) -> Path:
    return COCO128_JSON


# ------------------------------------------------------------------------- (a) GT as predictions
def test_coco128_gt_as_predictions_gives_ap_100(coco128_json):
    coco = _register("eval_coco128", coco128_json)
    evaluator = COCOEvaluator("eval_coco128", distributed=False)
    results = _run(evaluator, _gt_outputs(coco, sorted(coco.getImgIds())))
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        for metric in SUMMARY:
            assert results[task][metric] == pytest.approx(100.0, abs=1e-6), (task, metric)
        per_class = {k: v for k, v in results[task].items() if k.startswith("AP-")}
        assert len(per_class) == 80
        present = [v for v in per_class.values() if not math.isnan(v)]
        assert len(present) == 71  # 71 of the 80 categories occur in coco128
        assert all(v == pytest.approx(100.0) for v in present)


def test_tiny_gt_as_predictions_ignores_crowd_and_empty_image(tiny):
    evaluator = COCOEvaluator("eval_tiny", distributed=False)
    results = _run(evaluator, _gt_outputs(tiny, [1, 2, 3]))
    for task in ("bbox", "segm"):
        metrics = results[task]
        for metric in ("AP", "AP50", "AP75", "APs", "AP-a", "AP-b", "AP-c"):
            assert metrics[metric] == pytest.approx(100.0, abs=1e-6), (task, metric)
        # Every object is small: medium and large AP are undefined.
        assert math.isnan(metrics["APm"]) and math.isnan(metrics["APl"])


def test_detection_on_crowd_region_is_not_a_false_positive(tiny):
    """A detection covering only the crowd region is ignored; a miss elsewhere is not."""
    batches = list(_gt_outputs(tiny, [1, 2, 3]))
    instances = batches[0][1][0]["instances"]
    crowd_mask = torch.from_numpy(tiny.annToMask(tiny.anns[3]).astype(bool))
    instances["boxes"] = torch.cat([instances["boxes"], torch.tensor([[40.0, 30, 62, 46]])])
    instances["scores"] = torch.cat([instances["scores"], torch.tensor([2.0])])  # ranked first
    instances["labels"] = torch.cat([instances["labels"], torch.tensor([0])])  # class "a"
    instances["masks"] = torch.cat([instances["masks"], crowd_mask[None]])
    results = _run(COCOEvaluator("eval_tiny", distributed=False), batches)
    assert results["bbox"]["AP-a"] == pytest.approx(100.0)
    assert results["segm"]["AP-a"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- (b) id round trip
def test_category_ids_map_back_to_json_ids(tiny, tmp_path):
    evaluator = COCOEvaluator("eval_tiny", output_dir=str(tmp_path), distributed=False)
    assert _run(evaluator, _gt_outputs(tiny, [1, 2, 3]))["segm"]["AP"] == pytest.approx(100.0)
    written = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert sorted({r["category_id"] for r in written}) == [1, 3, 7]
    # A wrong mapping (labels rotated) matches no GT class: AP 0.
    rotated = _run(evaluator, _gt_outputs(tiny, [1, 2, 3], label_map={0: 1, 1: 2, 2: 0}))
    assert rotated["bbox"]["AP"] == 0.0 and rotated["segm"]["AP"] == 0.0


def test_label_outside_classes_raises(tiny):
    batches = list(_gt_outputs(tiny, [2]))
    batches[0][1][0]["instances"]["labels"][0] = 3
    with pytest.raises(ValueError, match="outside 0..2"):
        _run(COCOEvaluator("eval_tiny", distributed=False), batches)


# ----------------------------------------------------------------------------- (c) known IoU
def test_one_object_with_iou_two_thirds(tmp_path):
    """GT 30x30 box, prediction moved right by 6 px: IoU = 24/36 = 0.667 for box and mask.

    It matches at IoU thresholds 0.50, 0.55, 0.60, 0.65 (4 of 10): AP = 40, AP50 = 100, AP75 = 0.
    """
    data = {
        "images": [{"id": 5, "file_name": "5.jpg", "height": 64, "width": 64}],
        "categories": [{"id": 2, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 2,
                "iscrowd": 0,
                "bbox": [10, 20, 30, 30],
                "area": 900,
                "segmentation": [_rect(10, 20, 40, 50)],
            }
        ],
    }
    json_file = tmp_path / "one.json"
    json_file.write_text(json.dumps(data))
    coco = _register("eval_one", json_file)
    assert coco.annToMask(coco.anns[1]).sum() == 900  # the polygon rasterises to 30x30 pixels
    results = _run(COCOEvaluator("eval_one", distributed=False), _gt_outputs(coco, [5], shift=0.2))
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(40.0), task
        assert results[task]["AP50"] == pytest.approx(100.0), task
        assert results[task]["AP75"] == pytest.approx(0.0), task


def test_coco128_shifted_boxes_lower_ap_same_as_pycocotools_summarize(tmp_path, coco128_json):
    """Boxes moved by a quarter of their width (IoU ~0.6): AP far below 100, AP50 ~100, AP75 0;
    the six numbers equal pycocotools' own ``summarize`` on the written results file."""
    coco = _register("eval_coco128", coco128_json)
    image_ids = sorted(coco.getImgIds())[:32]
    evaluator = COCOEvaluator(
        "eval_coco128", output_dir=str(tmp_path), tasks=("bbox",), distributed=False
    )
    results = _run(evaluator, _gt_outputs(coco, image_ids, with_masks=False, shift=0.25))
    assert 20.0 < results["bbox"]["AP"] < 40.0
    assert results["bbox"]["AP50"] > 99.0  # below 100 only where rounding the shift bites
    assert results["bbox"]["AP75"] < 1.0

    reference = COCOeval(coco, coco.loadRes(str(tmp_path / "coco_instances_results.json")), "bbox")
    reference.params.imgIds = image_ids
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    np.testing.assert_allclose([results["bbox"][m] for m in SUMMARY], reference.stats[:6] * 100)


def test_segm_area_ranges_use_mask_area_not_box_area(tmp_path):
    """A false positive whose mask is small (375 px) but whose box is medium (40x40) counts
    against mask APs (detectron2 drops the box from mask results) but not against box APs."""
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": 100, "width": 100}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [5, 5, 10, 10],
                "area": 100,
                "segmentation": [_rect(5, 5, 15, 15)],
            }
        ],
    }
    json_file = tmp_path / "area.json"
    json_file.write_text(json.dumps(data))
    _register("eval_area", json_file)
    masks = torch.zeros(2, 100, 100, dtype=torch.bool)
    masks[0, 50:90, 50:55] = True  # an L shape: 200 + 175 = 375 pixels inside a 40x40 box
    masks[0, 85:90, 55:90] = True
    masks[1, 5:15, 5:15] = True  # the GT square
    instances = {
        "boxes": torch.tensor([[50.0, 50, 90, 90], [5, 5, 15, 15]]),
        "scores": torch.tensor([0.9, 0.5]),
        "labels": torch.tensor([0, 0]),
        "masks": masks,
    }
    batches = [([{"image_id": 1, "height": 100, "width": 100}], [{"instances": instances}])]
    results = _run(COCOEvaluator("eval_area", distributed=False), batches)
    # The FP ranks first: precision 1/2 at recall 1 wherever it counts.
    assert results["segm"]["AP"] == pytest.approx(50.0)
    assert results["segm"]["APs"] == pytest.approx(50.0)
    assert results["bbox"]["AP"] == pytest.approx(50.0)
    assert results["bbox"]["APs"] == pytest.approx(100.0)
    # With one detection per image only the FP is kept.
    one = _run(COCOEvaluator("eval_area", distributed=False, max_dets_per_image=1), batches)
    assert one["segm"]["AP"] == 0.0 and one["bbox"]["AP"] == 0.0


# ----------------------------------------------------------------------------- (d) empty / missing
def test_empty_predictions_give_zero_and_warn(tiny, tmp_path, caplog):
    batches = [
        (
            [{"image_id": i, "height": 48, "width": 64}],
            [
                {
                    "instances": {
                        "boxes": torch.zeros(0, 4),
                        "scores": torch.zeros(0),
                        "labels": torch.zeros(0, dtype=torch.int64),
                        "masks": torch.zeros(0, 48, 64, dtype=torch.bool),
                    }
                }
            ],
        )
        for i in (1, 2, 3)
    ]
    evaluator = COCOEvaluator("eval_tiny", output_dir=str(tmp_path), distributed=False)
    with caplog.at_level(logging.WARNING):
        results = _run(evaluator, batches)
    assert "No predictions" in caplog.text
    for task in ("bbox", "segm"):
        for metric in ("AP", "AP50", "AP75", "APs", "AP-a", "AP-b", "AP-c"):
            assert results[task][metric] == 0.0, (task, metric)
    assert json.loads((tmp_path / "coco_instances_results.json").read_text()) == []


def test_box_only_outputs_skip_segm(tiny, caplog):
    with caplog.at_level(logging.WARNING):
        results = _run(
            COCOEvaluator("eval_tiny", distributed=False),
            _gt_outputs(tiny, [1, 2, 3], with_masks=False),
        )
    assert set(results) == {"bbox"}
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert "Skipping 'segm'" in caplog.text


def test_unknown_image_id_raises(tiny):
    batches = list(_gt_outputs(tiny, [1]))
    batches[0][0][0]["image_id"] = 12345
    with pytest.raises(ValueError, match="12345"):
        _run(COCOEvaluator("eval_tiny", distributed=False), batches)


# ----------------------------------------------------------------------------- (e) results file
def test_results_json_is_written_and_loadable(tiny, tmp_path):
    out_dir = tmp_path / "inference"
    evaluator = COCOEvaluator("eval_tiny", output_dir=str(out_dir), distributed=False)
    _run(evaluator, _gt_outputs(tiny, [1, 2, 3]))
    path = out_dir / "coco_instances_results.json"
    results = json.loads(path.read_text())
    assert len(results) == 4  # the non-crowd GT objects
    assert sorted(p.name for p in out_dir.iterdir()) == [path.name]  # no temporary left behind
    first = results[0]
    assert set(first) == {"image_id", "category_id", "score", "bbox", "segmentation"}
    assert isinstance(first["segmentation"]["counts"], str)
    loaded = tiny.loadRes(str(path))
    assert len(loaded.getAnnIds()) == 4
    assert loaded.anns[1]["bbox"] == first["bbox"]


# ----------------------------------------------------------------------------- inference loop
class _GTModel(torch.nn.Module):
    """Returns stored outputs by image id; records whether it ran in eval mode without grad."""

    def __init__(self, outputs_by_id: dict) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.outputs_by_id = outputs_by_id
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, inputs):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return [self.outputs_by_id[inp["image_id"]] for inp in inputs]


def test_inference_on_dataset(tiny, caplog):
    batches = list(_gt_outputs(tiny, [1, 2, 3]))
    model = _GTModel({inp[0]["image_id"]: out[0] for inp, out in batches})
    model.train()
    loader = [[batches[0][0][0], batches[1][0][0]], [batches[2][0][0]]]  # batches of 2 and 1
    evaluator = COCOEvaluator("eval_tiny", distributed=False)
    evaluator.process(*batches[0])  # stale state must be reset by the loop
    with caplog.at_level(logging.INFO):
        results = inference_on_dataset(model, loader, evaluator)
    assert model.training
    assert model.calls == [(False, False), (False, False)]
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert "Total inference time" in caplog.text

    flat = flatten_results_dict(results)
    assert flat["segm/AP"] == results["segm"]["AP"]
    assert flat["bbox/AP-c"] == results["bbox"]["AP-c"]
    assert len(flat) == 2 * (len(SUMMARY) + 3)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        print_csv_format(results)
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in caplog.text
    assert "copypaste: 100.0000,100.0000,100.0000,100.0000,nan,nan" in caplog.text


# ----------------------------------------------------------------------------- (f) distributed
def _dist_worker(
    rank: int, world_size: int, init_file: str, json_file: str, image_ids, out_file: str
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        coco = _register("eval_dist", Path(json_file))
        evaluator = COCOEvaluator("eval_dist")
        results = _run(evaluator, _gt_outputs(coco, image_ids[rank::world_size], shift=0.25))
        Path(f"{out_file}.{rank}").write_text(json.dumps(results))
        dist.barrier()  # rank 1, done first, tearing gloo down while rank 0 evaluates can abort it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_gather_matches_single_process(tmp_path):
    """Two gloo processes each evaluate half the images; rank 0 gets the single-process AP."""
    if COCO128_JSON.exists():
        json_file, image_ids = COCO128_JSON, None
    else:  # the tiny dataset still checks the gather
        json_file, image_ids = _tiny_json(tmp_path / "tiny.json"), [1, 2, 3]
    coco = _register("eval_dist", json_file)
    image_ids = image_ids or sorted(coco.getImgIds())[:24]
    single = _run(
        COCOEvaluator("eval_dist", distributed=False), _gt_outputs(coco, image_ids, shift=0.25)
    )
    assert 0.0 < single["segm"]["AP"] < 100.0

    out_file = str(tmp_path / "results")
    mp.spawn(
        _dist_worker,
        nprocs=2,
        join=True,
        args=(2, str(tmp_path / "dist_init"), str(json_file), image_ids, out_file),
    )
    assert json.loads(Path(f"{out_file}.1").read_text()) == {}
    gathered = json.loads(Path(f"{out_file}.0").read_text())
    assert gathered.keys() == single.keys()
    for task in single:
        np.testing.assert_allclose(
            [gathered[task][k] for k in sorted(single[task])],
            [single[task][k] for k in sorted(single[task])],
            rtol=1e-12,
        )


def test_masks_are_encoded_one_at_a_time_as_all_at_once():
    from pycocotools import mask as mask_util

    from boxteacher.evaluation.coco_evaluation import instances_to_coco_json

    masks = torch.rand(3, 17, 23) > 0.5
    instances = {
        "scores": torch.tensor([0.9, 0.5, 0.1]),
        "labels": torch.tensor([0, 1, 0]),
        "masks": masks,
    }
    results = instances_to_coco_json(instances, 7, [1, 2], tasks=("segm",))
    together = mask_util.encode(
        np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0))
    )
    for result, rle, mask in zip(results, together, masks):
        assert result["segmentation"] == {
            "size": rle["size"],
            "counts": rle["counts"].decode("ascii"),
        }
        assert np.array_equal(
            mask_util.decode(dict(result["segmentation"], counts=rle["counts"])), mask.numpy()
        )


class _EncodingModel(_GTModel):
    """A model that hands over its masks encoded when given ``encode_masks`` (as CondInst)."""

    def __init__(self, outputs_by_id: dict) -> None:
        super().__init__(outputs_by_id)
        self.encode_masks = None
        self.encoders_seen: list = []

    def forward(self, inputs):
        self.encoders_seen.append(self.encode_masks)
        outputs = super().forward(inputs)
        if self.encode_masks is None:
            return outputs
        return [
            {
                "instances": dict(
                    out["instances"], masks=self.encode_masks(out["instances"]["masks"])
                )
            }
            for out in outputs
        ]


def test_inference_on_dataset_has_a_model_hand_over_its_masks_encoded(tiny):
    """The COCO evaluator asks for RLEs, which a model encodes a chunk at a time (no (M, H, W)
    bool output); same AP; the model's own setting is restored after, also inside DDP-like
    wrappers."""
    batches = list(_gt_outputs(tiny, [1, 2, 3]))
    model = _EncodingModel({inp[0]["image_id"]: out[0] for inp, out in batches})
    loader = [[batches[0][0][0], batches[1][0][0]], [batches[2][0][0]]]
    evaluator = COCOEvaluator("eval_tiny", distributed=False)
    results = inference_on_dataset(torch.nn.DataParallel(model), loader, evaluator)
    assert model.encoders_seen == [COCOEvaluator.encode_masks] * 2
    assert model.encode_masks is None
    assert results["segm"]["AP"] == pytest.approx(100.0)
