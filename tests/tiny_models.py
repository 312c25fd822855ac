"""Tiny configs and inputs for fast model tests, and the paths of the repository and of the
shared test data (not a test module; ``conftest.py`` hands them to tests as fixtures)."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from boxteacher.config import CfgNode, get_cfg
from boxteacher.data.builtin import register_builtin_datasets

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def key_values(pairs: dict[str, object]) -> list[str]:
    """Config overrides as ``merge_from_list`` takes them: ``{"A.B": 1}`` -> ``["A.B", "1"]``."""
    return [str(item) for pair in pairs.items() for item in pair]


# The tiny CondInst: R-18 of 16 channels, light heads, 3 classes, on the CPU.
TINY_MODEL_OVERRIDES = key_values(
    {
        "MODEL.DEVICE": "cpu",
        "MODEL.RESNETS.DEPTH": "18",
        "MODEL.RESNETS.STEM_OUT_CHANNELS": "16",
        "MODEL.RESNETS.RES2_OUT_CHANNELS": "16",
        "MODEL.RESNETS.NORM": "BN",
        "MODEL.BACKBONE.FREEZE_AT": "0",
        "MODEL.FPN.OUT_CHANNELS": "64",
        "MODEL.FCOS.NUM_CLASSES": "3",
        "MODEL.FCOS.NUM_CLS_CONVS": "1",
        "MODEL.FCOS.NUM_BOX_CONVS": "1",
        "MODEL.CONDINST.MASK_BRANCH.CHANNELS": "16",
        "MODEL.CONDINST.MASK_BRANCH.NUM_CONVS": "1",
    }
)
# A tiny BoxTeacher of two such networks, small test size, warm-ups of one iteration.
TINY_BOXTEACHER = key_values(
    {
        "MODEL.META_ARCHITECTURE": "BoxTeacher",
        "MODEL.BOXINST.ENABLED": True,
        "INPUT.MIN_SIZE_TEST": 64,
        "MODEL.BOX_TEACHER.WARMUP_ITERS": 1,
        "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS": 1,
    }
)


@contextlib.contextmanager
def builtin_datasets_under(root: str) -> Iterator[str]:
    """The built-in datasets (shapes) registered under ``root``, also for child processes
    (``DETECTRON2_DATASETS``); the previous root is restored on exit."""
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = root
    register_builtin_datasets(root)
    try:
        yield root
    finally:
        if old is None:
            del os.environ["DETECTRON2_DATASETS"]
        else:
            os.environ["DETECTRON2_DATASETS"] = old
        register_builtin_datasets()


def tiny_cfg(*overrides: str):
    cfg = get_cfg()
    cfg.merge_from_list(TINY_MODEL_OVERRIDES + list(overrides))
    return cfg


def box_mask(h: int, w: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    mask = torch.zeros((h, w), dtype=torch.bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def sample(
    h: int, w: int, boxes: list[tuple[int, int, int, int]], labels: list[int], seed: int = 0
) -> dict:
    """A training sample with rectangular objects drawn brighter than a random background."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 100, (3, h, w), generator=g, dtype=torch.uint8)
    masks = (
        torch.stack([box_mask(h, w, b) for b in boxes])
        if boxes
        else torch.zeros((0, h, w), dtype=torch.bool)
    )
    for m in masks:
        image[:, m] = 200
    return {
        "image": image,
        "height": h,
        "width": w,
        "instances": {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": masks,
        },
    }


# Full names of the config keys read through any RecordingCfgNode (clones included).
RECORDED_READS: set[str] = set()


class RecordingCfgNode(CfgNode):
    """A config that adds the full name of every key the code reads to ``RECORDED_READS``."""

    def __init__(self, init_dict=None, key_list=None, new_allowed=False):
        super().__init__(init_dict, key_list, new_allowed)
        self.__dict__["_prefix"] = ".".join(key_list or [])

    def __getattr__(self, name):
        if name in self:
            prefix = self.__dict__["_prefix"]
            RECORDED_READS.add(f"{prefix}.{name}" if prefix else name)
        return super().__getattr__(name)


def leaf_keys(node, prefix=""):
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from leaf_keys(value, name + ".")
        else:
            yield name


def two_view_batch(seed: int = 0) -> list[dict]:
    """Two random images (64x64 with two boxes, 48x64 with one) with their student views
    (``aug_image``, the colours inverted), as BoxTeacher trains on them."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for h, w, boxes in ((64, 64, [(8, 8, 40, 40), (30, 30, 60, 60)]), (48, 64, [(4, 4, 30, 40)])):
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g)
        samples.append(
            {
                "image": image,
                "aug_image": 255 - image,
                "height": h,
                "width": w,
                "instances": {
                    "boxes": torch.tensor(boxes, dtype=torch.float32),
                    "labels": torch.zeros(len(boxes), dtype=torch.long),
                },
            }
        )
    return samples


def label_one(model, sample: dict, prediction: dict) -> dict:
    """The instances of ``sample`` labelled by a BoxTeacher ``model`` from a given teacher
    ``prediction``, as a training step labels them."""
    from boxteacher.modeling.boxteacher import with_pseudo_labels

    return with_pseudo_labels([sample], model.assign([sample], [prediction]))[0]["instances"]


# A toy model and its data for the engine's tests (training loop, launch)
class ToyModel(nn.Module):
    """Uses the torch (dropout), numpy and python RNGs, so an exact resume needs all three."""

    def __init__(self, nan_at_call=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, batch, iteration=None):
        x, y = batch
        noise = 1.0 + 0.01 * float(np.random.rand()) + 0.01 * random.random()
        loss = ((self.net(x).squeeze(1) - y) ** 2).mean() * noise
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        self.calls += 1
        reg = 1e-3 * sum((p**2).sum() for p in self.parameters())
        return {"loss_mse": loss, "loss_reg": reg, "num_things": torch.tensor(100.0)}


def toy_data(seed, start_iter):
    """Infinite batches; the batch of iteration t depends only on (seed, t)."""
    t = start_iter
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + t)
        x = torch.randn(6, 4, generator=g)
        yield x, x.sum(1) + 0.1 * torch.randn(6, generator=g)
        t += 1
