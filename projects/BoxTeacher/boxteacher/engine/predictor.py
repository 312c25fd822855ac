"""A trained model of a config, and ``Predictor``: that model on one image in memory, as
detectron2's ``DefaultPredictor``."""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
import torch
from fvcore.common.config import CfgNode
from torch import nn

from ..build import build_model
from ..data import DatasetMapper
from .checkpoint import Checkpointer

__all__ = ["Predictor", "build_trained_model"]


def build_trained_model(
    cfg: CfgNode, builder: Callable[[CfgNode], nn.Module] = build_model
) -> nn.Module:
    """The model of ``cfg`` (built by ``builder``) with the network weights of
    ``MODEL.WEIGHTS`` (any file ``Checkpointer`` reads; no optimizer or iteration), in eval
    mode. Raises ``ValueError`` when ``MODEL.WEIGHTS`` is empty."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.WEIGHTS is empty: name the checkpoint to run, e.g. MODEL.WEIGHTS "
            "model_final.pth."
        )
    model = builder(cfg)
    Checkpointer(model, save_to_disk=False).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    return model.eval()


class Predictor:
    """The trained model of ``cfg`` on one image at a time.

    Builds the model, loads ``MODEL.WEIGHTS`` and evaluates as ``--eval-only`` does: the image
    is resized by its shortest edge to ``INPUT.MIN_SIZE_TEST`` (longest edge at most
    ``INPUT.MAX_SIZE_TEST``) by the test-time ``DatasetMapper``, its channels put in
    ``INPUT.FORMAT``, and the model (a BoxTeacher predicts with the network it evaluates with)
    runs without gradients.

    Example::

        predictor = Predictor(cfg)
        instances = predictor(read_image("photo.jpg"))
        instances["masks"]  # bool (N, H, W) in the frame of the photo
    """

    def __init__(self, cfg: CfgNode):
        self.cfg = cfg.clone()
        self.model = build_trained_model(self.cfg)
        self.mapper = DatasetMapper.from_config(self.cfg, is_train=False)

    def __call__(self, image_bgr: np.ndarray) -> dict[str, torch.Tensor]:
        """Detections on a uint8 (H, W, 3) BGR image (as ``boxteacher.data.read_image`` and
        OpenCV give it): ``boxes`` float (N, 4) XYXY, ``scores`` (N,), ``labels`` int64 (N,)
        in 0..K-1 and ``masks`` bool (N, H, W), all in the frame of ``image_bgr``."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
            raise ValueError(
                f"Predictor takes a uint8 (H, W, 3) BGR image, got {image_bgr.dtype} "
                f"{image_bgr.shape}."
            )
        image = (
            image_bgr
            if self.cfg.INPUT.FORMAT == "BGR"
            else cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        )
        with torch.no_grad():
            return self.model([self.mapper.map_image(image)])[0]["instances"]
