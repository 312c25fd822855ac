"""The parity fixtures of the official BoxTeacher / AdelaiDet implementation (compared by
``evaluation/parity.py``, printed by ``tools/parity_report.py``): where they are, how one is
read and run, the tolerances of their README (section 10), and the bookkeeping of the largest
difference of each compared quantity."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..build import build_model
from ..config import get_cfg
from ..engine import load_model_weights, read_model_weights

LEVELS = ("p3", "p4", "p5", "p6", "p7")

# Tolerances of the fixtures' README (section 10).
FEATURES, BBOX_REG, MASK_LOGITS, MASK_PROBS = 2e-4, 5e-4, 1e-3, 2e-4
BOXES, SCORES, LOSSES, GRAD_TOTAL, GRAD_PARAM = 5e-3, 1e-4, 1e-4, 1e-4, 1e-2
MASK_DISAGREEMENT = 1e-3


def fixtures_root(default: Path) -> Path:
    """``$BOXTEACHER_FIXTURES`` if set, else ``default``."""
    return Path(os.environ.get("BOXTEACHER_FIXTURES", default))


def fixture_folders(root: Path) -> list[Path]:
    """Every sub-folder of ``root`` holding ``expected.pt`` (none if ``root`` does not exist)."""
    return (
        sorted(p for p in root.glob("*") if (p / "expected.pt").is_file()) if root.is_dir() else []
    )


@dataclass
class Fixture:
    """One fixture folder; ``base_config`` is the repository's ``configs/Base-BoxTeacher.yaml``,
    under the fixture's ``config.yaml``."""

    folder: Path
    inputs: dict[str, Any]
    expected: dict[str, torch.Tensor]
    base_config: Path

    @classmethod
    def load(cls, folder: Path, base_config: Path) -> "Fixture":
        read = lambda name: torch.load(folder / name, map_location="cpu", weights_only=True)  # noqa: E731
        return cls(folder, read("inputs.pt"), read("expected.pt"), base_config)

    @property
    def num_images(self) -> int:
        return int(self.inputs["num_images"])

    def image(self, i: int) -> list[dict]:
        x = self.inputs
        return [{"image": x[f"image_{i}"], "height": x[f"height_{i}"], "width": x[f"width_{i}"]}]

    def training_batch(self, aug: bool = True, masks: bool = False) -> list[dict]:
        batch = []
        for i in range(self.num_images):
            sample = self.image(i)[0]
            if aug:
                sample["aug_image"] = self.inputs[f"aug_image_{i}"]
            sample["instances"] = {
                "boxes": self.inputs[f"gt_boxes_{i}"],
                "labels": self.inputs[f"gt_classes_{i}"],
            }
            if masks:
                sample["instances"]["masks"] = self.inputs[f"gt_masks_{i}"]
            batch.append(sample)
        return batch

    def build(self, *overrides: str, network: str | None = None) -> nn.Module:
        """The fixture's model (Base-BoxTeacher.yaml + its config.yaml + ``overrides``) with its
        official weights; ``network`` ("student.") loads that network into a one-network model."""
        cfg = get_cfg()
        cfg.merge_from_file(str(self.base_config))
        cfg.merge_from_file(str(self.folder / "config.yaml"))
        cfg.merge_from_list(list(overrides))
        model = build_model(cfg)
        state = read_model_weights(str(self.folder / "model_final_fp16.pth"))["model"]
        if network:
            state = {k[len(network) :]: v for k, v in state.items() if k.startswith(network)}
        missing, unexpected = load_model_weights(model, state, str(self.folder))
        if missing or unexpected:
            raise RuntimeError(f"{self.folder}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model


@dataclass
class Row:
    """One compared quantity: ``diff`` is the largest difference, within ``tolerance`` if ok."""

    section: str
    quantity: str
    diff: float
    tolerance: float
    kind: str  # "abs", "rel", "exact" or "pixels" (fraction of disagreeing mask pixels)

    @property
    def ok(self) -> bool:
        return self.diff <= self.tolerance


class Comparison:
    """Collects the largest difference of each quantity over repeated comparisons."""

    def __init__(self, section: str):
        self.section = section
        self.rows: dict[str, Row] = {}

    def add(self, quantity: str, diff: float, tolerance: float, kind: str) -> None:
        row = self.rows.setdefault(quantity, Row(self.section, quantity, 0.0, tolerance, kind))
        row.diff = max(row.diff, float(diff))

    def close(
        self, quantity: str, ours: torch.Tensor, expected: torch.Tensor, tolerance: float
    ) -> None:
        """abs difference, plus a relative allowance of 1e-5 of the value (the README's rule)."""
        if ours.shape != expected.shape:
            self.add(quantity, float("inf"), tolerance, "abs")
            return
        excess = (ours.float() - expected.float()).abs() - 1e-5 * expected.float().abs()
        self.add(
            quantity, excess.max().clamp(min=0).item() if excess.numel() else 0.0, tolerance, "abs"
        )

    def relative(self, quantity: str, ours: float, expected: float, tolerance: float) -> None:
        self.add(quantity, abs(ours - expected) / max(abs(expected), 1e-3), tolerance, "rel")

    def exact(self, quantity: str, ours: torch.Tensor, expected: torch.Tensor) -> None:
        same = ours.shape == expected.shape and torch.equal(ours.long(), expected.long())
        self.add(quantity, 0.0 if same else 1.0, 0.0, "exact")

    def masks(self, quantity: str, ours: torch.Tensor, packed: torch.Tensor, width: int) -> None:
        expected = torch.from_numpy(
            np.unpackbits(packed.numpy(), axis=-1, count=width).astype(bool)
        )
        if ours.shape != expected.shape:
            self.add(quantity, 1.0, MASK_DISAGREEMENT, "pixels")
            return
        disagreement = (ours != expected).flatten(1).float().mean(dim=1)
        self.add(
            quantity,
            disagreement.max().item() if len(disagreement) else 0.0,
            MASK_DISAGREEMENT,
            "pixels",
        )


@contextlib.contextmanager
def recording(obj: Any, method: str, calls: list) -> Iterator[None]:
    """Records ``(args, return value)`` of every call of ``obj.method`` into ``calls``."""
    original: Callable = getattr(obj, method)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, out))
        return out

    setattr(obj, method, wrapper)
    try:
        yield
    finally:
        delattr(obj, method)
