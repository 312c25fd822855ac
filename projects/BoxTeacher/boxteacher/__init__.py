"""BoxTeacher: box-supervised instance segmentation (CVPR 2023) and the CondInst / BoxInst family.

What a script needs, in one place::

    from boxteacher import Predictor, Trainer, read_image, setup_config

``boxteacher.modeling`` holds the networks; ``boxteacher.data``, ``boxteacher.engine`` and
``boxteacher.evaluation`` the rest of the pipeline.
"""

__version__ = "0.1.0"

from .build import architecture_spec, build_model, register_architecture
from .config import CfgNode, get_cfg, load_config
from .data import (
    encode_rle,
    read_image,
    register_coco_instances,
    register_datasets_from_config,
    segmentation_to_rle,
)
from .engine import Predictor, build_trained_model, default_argument_parser, launch, setup_config
from .engine.trainer import Trainer, evaluate

__all__ = [
    "CfgNode",
    "Predictor",
    "Trainer",
    "architecture_spec",
    "build_model",
    "build_trained_model",
    "default_argument_parser",
    "encode_rle",
    "evaluate",
    "get_cfg",
    "launch",
    "load_config",
    "read_image",
    "register_architecture",
    "register_coco_instances",
    "register_datasets_from_config",
    "segmentation_to_rle",
    "setup_config",
]
