"""Datasets (registered by name), COCO loading, the mapper, samplers and data loaders.

Importing this package registers the built-in datasets (``builtin.py``); that reads no file.
"""

from ..geometry import resized_shape
from .build import build_test_loader, build_train_loader, get_train_metadata, get_train_records
from .builtin import datasets_root, register_builtin_datasets, register_datasets_from_config
from .catalog import (
    get_dataset_records,
    get_metadata,
    is_registered,
    register_dataset,
    registered_names,
)
from .coco import load_coco_json, register_coco_instances
from .coco_segmentation import segmentation_to_mask
from .image_io import read_image
from .mapper import DatasetMapper, build_flip_class_map
from .rle import encode_rle, segmentation_to_rle
from .samplers import InferenceSampler, TrainingBatchSampler
from .shapes import ensure_shapes_dataset, generate_shapes_dataset
from .transforms import ResizeFlip
from .unlabeled import register_unlabeled_images

register_builtin_datasets()

__all__ = [
    "DatasetMapper",
    "InferenceSampler",
    "ResizeFlip",
    "TrainingBatchSampler",
    "build_flip_class_map",
    "build_test_loader",
    "build_train_loader",
    "datasets_root",
    "encode_rle",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "get_dataset_records",
    "get_metadata",
    "get_train_metadata",
    "get_train_records",
    "is_registered",
    "load_coco_json",
    "read_image",
    "register_builtin_datasets",
    "register_coco_instances",
    "register_dataset",
    "register_datasets_from_config",
    "register_unlabeled_images",
    "registered_names",
    "resized_shape",
    "segmentation_to_mask",
    "segmentation_to_rle",
]
