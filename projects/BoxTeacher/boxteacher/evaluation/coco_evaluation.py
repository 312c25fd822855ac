"""COCO box and mask AP with pycocotools, detectron2-compatible numbers and result files.

``COCOEvaluator`` turns every model output into COCO result dicts as soon as it sees it (masks are
RLE-encoded immediately, no tensors are kept), gathers them to the main process in distributed
runs, and scores them with ``COCOeval`` against the dataset's json as the training loader reads it
(``data.coco.load_coco_ground_truth``: the same errors, skips and box clipping, re-numbered
annotation ids; mask AP treats annotations without a mask as crowd regions and is skipped when the
json has no masks at all). Metrics are percentages, NaN where the ground truth leaves them
undefined (no object of an area range, a class without GT)::

    {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class name>", ...},
     "segm": {...}}
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

from ..data.catalog import get_metadata
from ..data.coco import load_coco_ground_truth
from ..data.rle import encode_rle
from ..utils import comm
from .evaluator import DatasetEvaluator

logger = logging.getLogger(__name__)

SUMMARY_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# task -> the field of the model's instances it needs
_TASK_FIELDS = {"bbox": "boxes", "segm": "masks"}
RESULTS_FILE = "coco_instances_results.json"

_T = TypeVar("_T")


def _quietly(fn: Callable[[], _T]) -> _T:
    """Call ``fn`` and send what pycocotools prints to stdout to the debug log instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        out = fn()
    text = buffer.getvalue().strip()
    if text:
        logger.debug("%s", text)
    return out


def instances_to_coco_json(
    instances: Mapping[str, torch.Tensor],
    image_id: int,
    contiguous_to_json_id: Sequence[int],
    tasks: Sequence[str] = ("bbox", "segm"),
) -> list[dict[str, Any]]:
    """COCO result dicts of one image's predictions.

    Args:
        instances: ``boxes`` float [N,4] XYXY absolute, ``scores`` [N], ``labels`` int64 [N]
            contiguous, optional ``masks`` bool [N,H,W] (any device) or N COCO RLEs already
            encoded (``encode_rle``).
        image_id: the image's id in the COCO json.
        contiguous_to_json_id: ``contiguous_to_json_id[label]`` is the json category id.
        tasks: which of ``bbox`` (XYWH list of floats) and ``segmentation`` (RLE with ``counts``
            as str) to write; a task whose field is absent from ``instances`` is skipped.

    Returns:
        One dict per instance with ``image_id``, ``category_id``, ``score`` and the task keys.
    """
    scores = instances["scores"].detach().cpu().tolist()
    labels = instances["labels"].detach().cpu().tolist()
    if any(not 0 <= label < len(contiguous_to_json_id) for label in labels):
        raise ValueError(
            f"Predicted labels {sorted(set(labels))} outside 0..{len(contiguous_to_json_id) - 1}"
        )
    results = [
        {
            "image_id": int(image_id),
            "category_id": int(contiguous_to_json_id[label]),
            "score": float(score),
        }
        for label, score in zip(labels, scores)
    ]
    if "bbox" in tasks and "boxes" in instances:
        xyxy = instances["boxes"].detach().cpu().double()
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
        for result, box in zip(results, xywh.tolist()):
            result["bbox"] = box
    if "segm" in tasks and "masks" in instances and results:
        masks = instances["masks"]
        for result, rle in zip(results, masks if isinstance(masks, list) else encode_rle(masks)):
            result["segmentation"] = rle
    return results


def _load_results(coco_gt: COCO, results: list[dict[str, Any]], drop_key: str) -> COCO:
    """A results ``COCO`` object; works with no results (where ``loadRes`` fails).

    ``drop_key`` is removed from (copies of) the results: for mask AP the box must go so that
    pycocotools takes the mask area, not the box area, as the area of a detection.
    """
    if not results:
        coco_dt = COCO()
        coco_dt.dataset = {
            "info": {},
            "images": list(coco_gt.dataset["images"]),
            "categories": list(coco_gt.dataset["categories"]),
            "annotations": [],
        }
        _quietly(coco_dt.createIndex)
        return coco_dt
    copies = [{k: v for k, v in result.items() if k != drop_key} for result in results]
    return _quietly(lambda: coco_gt.loadRes(copies))


def _coco_from_dict(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` of an already validated COCO dict."""
    coco = COCO()
    coco.dataset = dataset
    _quietly(coco.createIndex)
    return coco


def _box_polygon(annotation: Mapping[str, Any]) -> list[list[float]]:
    """The XYWH ``bbox`` of a COCO annotation as a one-rectangle polygon segmentation."""
    x, y, w, h = annotation["bbox"]
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _mean_ap(precision: np.ndarray) -> float:
    """Mean of the valid (> -1) precision entries in percent; NaN when there are none."""
    valid = precision[precision > -1]
    return float(np.mean(valid) * 100) if valid.size else float("nan")


def _summary_metrics(coco_eval: COCOeval, max_dets: int) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l in percent, read from ``coco_eval.eval["precision"]``.

    Same numbers as ``COCOeval.summarize`` (mean over the valid entries of precision
    [IoU, recall, class, area, maxDets]), NaN where nothing is valid, and correct for any
    ``max_dets`` (``summarize`` hard-codes 100 for AP).
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"][..., params.maxDets.index(max_dets)]  # [T, R, K, A]
    area = {label: i for i, label in enumerate(params.areaRngLbl)}
    iou_index = {thr: int(np.argmin(np.abs(params.iouThrs - thr))) for thr in (0.5, 0.75)}
    return {
        "AP": _mean_ap(precision[:, :, :, area["all"]]),
        "AP50": _mean_ap(precision[iou_index[0.5], :, :, area["all"]]),
        "AP75": _mean_ap(precision[iou_index[0.75], :, :, area["all"]]),
        "APs": _mean_ap(precision[:, :, :, area["small"]]),
        "APm": _mean_ap(precision[:, :, :, area["medium"]]),
        "APl": _mean_ap(precision[:, :, :, area["large"]]),
    }


def _per_category_ap(
    coco_eval: COCOeval, max_dets: int, names: Mapping[int, str]
) -> dict[str, float]:
    """``{"AP-<name>": AP in percent}`` per json category id (area "all")."""
    params = coco_eval.params
    precision = coco_eval.eval["precision"]
    area_all = params.areaRngLbl.index("all")
    m = params.maxDets.index(max_dets)
    return {
        f"AP-{names[cat_id]}": _mean_ap(precision[:, :, k, area_all, m])
        for k, cat_id in enumerate(params.catIds)
    }


def _log_tables(task: str, metrics: Mapping[str, float], num_columns: int = 6) -> None:
    summary = [metrics[name] for name in SUMMARY_METRICS]
    table = tabulate([summary], headers=SUMMARY_METRICS, tablefmt="pipe", floatfmt=".3f")
    logger.info("Evaluation results for %s:\n%s", task, table)
    pairs = [(name[3:], value) for name, value in metrics.items() if name.startswith("AP-")]
    flat = list(itertools.chain.from_iterable(pairs))
    rows = itertools.zip_longest(*[flat[i::num_columns] for i in range(num_columns)])
    headers = ["category", "AP"] * (num_columns // 2)
    table = tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".3f", numalign="left")
    logger.info("Per-category %s AP:\n%s", task, table)


def _write_json_atomically(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "w") as f:
            json.dump(obj, f)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)


class COCOEvaluator(DatasetEvaluator):
    """Box and mask AP of a registered COCO-format dataset (detectron2's ``COCOEvaluator``).

    Reads the dataset's ``json_file``, ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``
    from the catalog. Only the processed images are evaluated, with at most
    ``max_dets_per_image`` detections per image and class. Model outputs follow the inference
    contract ``{"instances": {"boxes", "scores", "labels", optional "masks"}}``; a task whose field
    is missing from some output (a box-only model has no masks) is skipped. Models that can
    (``CondInst.encode_masks``) hand over their masks as RLEs, encoded a chunk at a time.
    """

    encode_masks = staticmethod(encode_rle)

    def __init__(
        self,
        dataset_name: str,
        *,
        output_dir: str | None = None,
        tasks: tuple[str, ...] = ("bbox", "segm"),
        distributed: bool = True,
        max_dets_per_image: int = 100,
    ) -> None:
        unknown = set(tasks) - set(_TASK_FIELDS)
        if unknown:
            raise ValueError(f"Unknown COCO tasks {sorted(unknown)}; known: {sorted(_TASK_FIELDS)}")
        metadata = get_metadata(dataset_name)
        if not getattr(metadata, "json_file", None):
            raise ValueError(f"Dataset '{dataset_name}' has no json_file to evaluate against")
        self._json_file = metadata.json_file
        self._tasks = tuple(tasks)
        self._output_dir = output_dir
        self._distributed = distributed
        self._max_dets = max_dets_per_image
        id_map = metadata.thing_dataset_id_to_contiguous_id
        self._contiguous_to_json_id = [0] * len(id_map)
        for json_id, contiguous_id in id_map.items():
            self._contiguous_to_json_id[contiguous_id] = int(json_id)
        self._class_names = {
            int(json_id): metadata.thing_classes[contiguous_id]
            for json_id, contiguous_id in id_map.items()
        }
        self._coco_gt: COCO | None = None
        self._coco_segm_gt: COCO | None = None
        self.reset()

    def reset(self) -> None:
        self._predictions: dict[int, list[dict[str, Any]]] = {}
        self._missing_tasks: set[str] = set()

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            instances = out["instances"]
            self._missing_tasks.update(
                task for task in self._tasks if _TASK_FIELDS[task] not in instances
            )
            self._predictions[int(inp["image_id"])] = instances_to_coco_json(
                instances, inp["image_id"], self._contiguous_to_json_id, self._tasks
            )

    @property
    def coco_gt(self) -> COCO:
        """The ground truth, loaded once per evaluator through the training loader's validation
        (``load_coco_ground_truth``), never by pycocotools from the raw json."""
        if self._coco_gt is None:
            self._coco_gt = _coco_from_dict(load_coco_ground_truth(self._json_file))
        return self._coco_gt

    def _segm_gt(self) -> COCO | None:
        """The ground truth for mask AP; None when it has no masks at all.

        An annotation without a (usable) mask, e.g. a box-only one among masked ones or one whose
        polygons were dropped, becomes a crowd region covering its box: detections on it are
        neither matched nor false positives, and it is not a miss.
        """
        if self._coco_segm_gt is None:
            annotations = self.coco_gt.dataset["annotations"]
            if annotations and not any("segmentation" in a for a in annotations):
                return None
            boxes_only = [a for a in annotations if "segmentation" not in a]
            if not boxes_only:
                self._coco_segm_gt = self.coco_gt
                return self._coco_segm_gt
            logger.warning(
                "%s: %d annotation(s) have no mask; mask AP ignores detections on their boxes "
                "(as crowd regions) and does not count them as misses",
                self._json_file,
                len(boxes_only),
            )
            dataset = dict(self.coco_gt.dataset)
            dataset["annotations"] = [
                a if "segmentation" in a else {**a, "iscrowd": 1, "segmentation": _box_polygon(a)}
                for a in annotations
            ]
            self._coco_segm_gt = _coco_from_dict(dataset)
        return self._coco_segm_gt

    def _gathered(self) -> tuple[dict[int, list[dict[str, Any]]], set[str]] | None:
        """Predictions and missing tasks of all processes; None on non-main processes.

        Predictions are keyed by image id, so an image seen by two processes counts once.
        """
        if not self._distributed or comm.get_world_size() == 1:
            return self._predictions, self._missing_tasks
        parts = comm.gather((self._predictions, self._missing_tasks), dst=0)
        if not comm.is_main_process():
            return None
        predictions: dict[int, list[dict[str, Any]]] = {}
        missing: set[str] = set()
        for part_predictions, part_missing in parts:
            predictions.update(part_predictions)
            missing |= part_missing
        return predictions, missing

    def evaluate(self) -> dict[str, dict[str, float]]:
        gathered = self._gathered()
        if gathered is None:
            return {}
        predictions, missing = gathered
        image_ids = sorted(predictions)
        unknown = sorted(set(image_ids) - set(self.coco_gt.getImgIds()))
        if unknown:
            raise ValueError(
                f"Predictions for {len(unknown)} image ids not in {self._json_file}: "
                f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
            )
        results = [r for image_id in image_ids for r in predictions[image_id]]
        logger.info(
            "Evaluating %d predictions on %d images (%s)",
            len(results),
            len(image_ids),
            ", ".join(self._tasks),
        )
        if self._output_dir:
            path = os.path.join(self._output_dir, RESULTS_FILE)
            _write_json_atomically(path, results)
            logger.info("Saved %d COCO results to %s", len(results), path)
        if not results:
            logger.warning(
                "No predictions on the %d evaluated images: AP is 0 wherever the "
                "ground truth defines it",
                len(image_ids),
            )
        for task in sorted(missing):
            logger.warning(
                "Skipping '%s' evaluation: the model outputs have no '%s'", task, _TASK_FIELDS[task]
            )
        if "segm" in self._tasks and "segm" not in missing and self._segm_gt() is None:
            logger.warning(
                "Skipping 'segm' evaluation: mask AP needs masks, and the ground truth "
                "%s has none (box annotations only)",
                self._json_file,
            )
            missing = missing | {"segm"}
        return {
            task: self._evaluate_task(task, results, image_ids)
            for task in self._tasks
            if task not in missing
        }

    def _evaluate_task(
        self, task: str, results: list[dict[str, Any]], image_ids: list[int]
    ) -> dict[str, float]:
        drop_key = "segmentation" if task == "bbox" else "bbox"
        coco_gt = self.coco_gt if task == "bbox" else self._segm_gt()
        coco_dt = _load_results(coco_gt, results, drop_key)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType=task)
        coco_eval.params.imgIds = image_ids
        coco_eval.params.maxDets = sorted({1, 10, self._max_dets})
        _quietly(coco_eval.evaluate)
        _quietly(coco_eval.accumulate)
        metrics = _summary_metrics(coco_eval, self._max_dets)
        names = {
            cat_id: self._class_names.get(cat_id, self.coco_gt.cats[cat_id]["name"])
            for cat_id in coco_eval.params.catIds
        }
        metrics.update(_per_category_ap(coco_eval, self._max_dets, names))
        _log_tables(task, metrics)
        return metrics
