"""Process environment: seeding every random number generator, and a summary for the logs."""

from __future__ import annotations

import importlib
import os
import platform
import random
import sys
from datetime import datetime
from typing import Any, Mapping

import numpy as np
import torch
from tabulate import tabulate

from . import comm

__all__ = ["seed_all_rng", "get_rng_state", "set_rng_state", "collect_env_info", "resolve_device"]


def seed_all_rng(seed: int | None = None) -> int:
    """Seed the RNGs of torch, numpy and python's ``random``; returns the seed used.

    ``seed=None`` draws a seed from the process id, the clock and ``os.urandom`` (as detectron2
    does), so that concurrent processes get different seeds.
    """
    if seed is None:
        seed = (
            os.getpid()
            + int(datetime.now().strftime("%S%f"))
            + int.from_bytes(os.urandom(2), "big")
        )
    seed = int(seed) % 2**32  # numpy accepts seeds in [0, 2**32)
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


def get_rng_state() -> dict[str, Any]:
    """The states of this process's RNGs: torch CPU, the current CUDA device (if CUDA was
    used), python ``random`` and numpy, as tensors and plain python values (so that
    ``torch.load(weights_only=True)`` can read them back)."""
    version, mt_state, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss_next],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _version_of(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return "not installed"
    return f"{getattr(module, '__version__', 'unknown')} @ {os.path.dirname(module.__file__ or '')}"


def collect_env_info() -> str:
    """A table with the versions of python and the libraries, and the visible GPUs."""
    rows = [
        ("sys.platform", sys.platform),
        ("platform", platform.platform()),
        ("Python", sys.version.replace("\n", " ")),
        ("numpy", np.__version__),
        ("PyTorch", f"{torch.__version__} @ {os.path.dirname(torch.__file__)}"),
        ("torchvision", _version_of("torchvision")),
        ("fvcore", _version_of("fvcore")),
        ("pycocotools", _version_of("pycocotools")),
        ("OpenCV", _version_of("cv2")),
        ("PyTorch built with CUDA", str(torch.version.cuda)),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        rows.append(("cuDNN", str(torch.backends.cudnn.version())))
        names: dict[str, list[str]] = {}
        for index in range(torch.cuda.device_count()):
            names.setdefault(torch.cuda.get_device_name(index), []).append(str(index))
        rows.extend((f"GPU {','.join(ids)}", name) for name, ids in names.items())
        rows.append(("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<not set>")))
    rows.append(("CPU threads (torch)", str(torch.get_num_threads())))
    return tabulate(rows)


def resolve_device(cfg_device: str) -> torch.device:
    """The device of ``MODEL.DEVICE``: "auto", "cpu", "cuda" or "cuda:N".

    "auto" is CUDA when available, else the CPU. In multi-process runs on CUDA, "auto" and
    "cuda" mean this process's GPU (its local rank).
    """
    if cfg_device == "cpu":
        return torch.device("cpu")
    if cfg_device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if cfg_device not in ("auto", "cuda") and not cfg_device.startswith("cuda:"):
        raise ValueError(
            f"Unknown MODEL.DEVICE '{cfg_device}'; valid values: auto, cpu, cuda, cuda:N."
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE is '{cfg_device}' but CUDA is not available; use 'cpu' or 'auto'."
        )
    if cfg_device in ("auto", "cuda"):
        index = comm.get_local_rank() if comm.get_world_size() > 1 else torch.cuda.current_device()
        return torch.device("cuda", index)
    if comm.get_world_size() > 1:
        raise ValueError(
            f"MODEL.DEVICE '{cfg_device}' names one GPU but {comm.get_world_size()} processes "
            "run; use 'cuda' or 'auto' (each process takes the GPU of its local rank)."
        )
    device = torch.device(cfg_device)
    if device.index is None or device.index >= torch.cuda.device_count():
        raise ValueError(
            f"MODEL.DEVICE '{cfg_device}': there are {torch.cuda.device_count()} CUDA devices."
        )
    return device
