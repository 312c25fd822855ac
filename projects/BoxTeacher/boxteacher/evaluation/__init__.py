"""Evaluation: the evaluator protocol, the inference loop and COCO box / mask AP."""

from .coco_evaluation import COCOEvaluator, instances_to_coco_json
from .evaluator import (
    DatasetEvaluator,
    flatten_results_dict,
    inference_on_dataset,
    print_csv_format,
)

__all__ = [
    "COCOEvaluator",
    "DatasetEvaluator",
    "flatten_results_dict",
    "inference_on_dataset",
    "instances_to_coco_json",
    "print_csv_format",
]
