"""Weight files named by ``MODEL.WEIGHTS`` in the formats users hold, read as state dicts in this
project's parameter names.

* ``detectron2://ImageNetPretrained/MSRA/R-50.pkl`` style names, URLs and bare file names are
  looked up in ``pretrained_models/`` (by file name); nothing is downloaded.
* Caffe2 / detectron2 ``.pkl`` files (dicts of numpy arrays, possibly under ``blobs`` or
  ``model``) are read with an unpickler that only admits numpy arrays and plain containers, so
  a crafted file cannot run code. Caffe2 names (``res2_0_branch2a_w``) are converted to
  detectron2 names (``res2.0.conv1.weight``).
* ``.pth`` files are read with ``torch.load(weights_only=True)``. Files that need pickled code
  (PyTorch's legacy ``.tar`` format, pickled modules or objects) are refused with the command
  that converts a trusted file once: ``tools/convert_weights.py --trust-pickle IN OUT``.
* detectron2 / AdelaiDet names (``backbone.bottom_up.res2.0.conv1.norm.weight``,
  ``backbone.fpn_lateral3``) are renamed to this project's (torchvision ResNet, torchvision FPN);
  a file holding only a ResNet (ImageNet weights) is placed under ``RESNET_PREFIX``
  (``load_model_weights`` moves it to where a torchvision detection backbone keeps its ResNet).
* torchvision detection models (Mask R-CNN) keep their names; the FPN and RPN convolutions of
  files saved by older torchvision (``backbone.fpn.inner_blocks.0.weight``) get today's names.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tarfile
from typing import Any, Mapping

import numpy as np
import torch

from ..utils.io import atomic_open

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


DETECTRON2_PREFIX = "detectron2://"
DETECTRON2_DOWNLOAD_ROOT = "https://dl.fbaipublicfiles.com/detectron2/"
PRETRAINED_DIR = "pretrained_models"


def resolve_weights_path(path: str) -> str:
    """A local file for ``path``. Nothing is downloaded: ``detectron2://X/Y.pkl`` and URLs
    (``https://download.pytorch.org/models/resnet50-0676ba61.pth``) are looked up in
    ``pretrained_models/`` by file name, as is a bare file name not found in the working folder."""
    if path.startswith(DETECTRON2_PREFIX):
        url = DETECTRON2_DOWNLOAD_ROOT + path[len(DETECTRON2_PREFIX) :]
    elif path.startswith(("https://", "http://")):
        url = path
    elif os.path.basename(path) == path and not os.path.exists(path):
        url = None
    else:
        return path
    local = os.path.join(PRETRAINED_DIR, os.path.basename(path))
    if not os.path.isfile(local):
        fetch = (
            f"Download {url} into {PRETRAINED_DIR}/" if url else f"Put it into {PRETRAINED_DIR}/"
        )
        raise FileNotFoundError(
            f"MODEL.WEIGHTS '{path}' is looked up as '{local}', which does not exist. {fetch} (see "
            f"{PRETRAINED_DIR}/README.md), or set MODEL.WEIGHTS to a local file or ''."
        )
    return local


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays, numpy scalars and plain containers; refuses anything else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'")
        return super().find_class(module, name)


def read_array_pickle(path: str) -> Any:
    """The content of a pickle that holds only numpy arrays and containers (Python 2 pickles
    are read with latin-1 strings, as detectron2 does)."""
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"'{path}' is not a pickle of numpy arrays ({e}); it is not loaded because "
            "unpickling it could run arbitrary code."
        ) from e


def caffe2_to_detectron2_name(name: str) -> str:
    """Caffe2 blob name of a ResNet -> detectron2 name (``res2_0_branch2a_bn_s`` ->
    ``res2.0.conv1.norm.weight``, ``res_conv1_bn_b`` -> ``stem.conv1.norm.bias``)."""
    name = name.replace("_", ".")
    for pattern, replacement in (
        (r"\.b$", ".bias"),
        (r"\.w$", ".weight"),
        (r"bn\.s$", "norm.weight"),
        (r"bn\.bias$", "norm.bias"),
        (r"bn\.rm$", "norm.running_mean"),
        (r"bn\.running\.mean$", "norm.running_mean"),
        (r"bn\.riv$", "norm.running_var"),
        (r"bn\.running\.var$", "norm.running_var"),
        (r"bn\.gamma$", "norm.weight"),
        (r"bn\.beta$", "norm.bias"),
        (r"gn\.s$", "norm.weight"),
        (r"gn\.bias$", "norm.bias"),
        (r"^res\.conv1\.norm\.", "conv1.norm."),
        (r"^conv1\.", "stem.conv1."),
    ):
        name = re.sub(pattern, replacement, name)
    for old, new in (
        (".branch1.", ".shortcut."),
        (".branch2a.", ".conv1."),
        (".branch2b.", ".conv2."),
        (".branch2c.", ".conv3."),
    ):
        name = name.replace(old, new)
    return name


def detectron2_to_project_name(name: str) -> str:
    """detectron2 / AdelaiDet parameter name -> this project's (identity for our own names)."""
    name = re.sub(r"(^|\.)stem\.conv1\.norm\.", r"\1bn1.", name)
    name = re.sub(r"(^|\.)stem\.conv1\.", r"\1conv1.", name)

    def stage(match: re.Match) -> str:
        rest = match.group(4)
        rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
        rest = re.sub(r"^conv2_offset\.", "conv2.offset.", rest)
        rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
        rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
        return f"{match.group(1)}layer{int(match.group(2)) - 1}.{match.group(3)}.{rest}"

    name = re.sub(r"(^|\.)res(\d)\.(\d+)\.(.*)", stage, name)
    name = re.sub(
        r"backbone\.fpn_lateral(\d)", lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 3}.0", name
    )
    name = re.sub(
        r"backbone\.fpn_output(\d)", lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 3}.0", name
    )
    return name.replace("backbone.top_block.", "backbone.fpn.extra_blocks.")


def torchvision_legacy_to_current_name(name: str) -> str:
    """Name in a torchvision detection model saved by older torchvision -> today's, where the FPN
    and RPN convolutions are ``Conv2dNormActivation`` blocks
    (``backbone.fpn.inner_blocks.0.weight`` -> ``backbone.fpn.inner_blocks.0.0.weight``,
    ``rpn.head.conv.bias`` -> ``rpn.head.conv.0.0.bias``). torchvision renames these in
    ``_load_from_state_dict``, which only sees the keys the model has."""
    name = re.sub(
        r"(^|\.)fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$", r"\1fpn.\2.\3.0.\4", name
    )
    return re.sub(r"(^|\.)rpn\.head\.conv\.(weight|bias)$", r"\1rpn.head.conv.0.0.\2", name)


_RESNET_ONLY = re.compile(r"^(conv1\.|bn1\.|layer\d\.|fc\d*\.)")

#: Where a ResNet-only state dict (ImageNet weights) is placed: the ResNet of our CondInst backbone.
RESNET_PREFIX = "backbone.bottom_up."


def to_project_names(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename to this project's names; a ResNet-only state dict (ImageNet weights) goes under
    ``RESNET_PREFIX`` and loses its classifier (``fc``)."""
    renamed = {
        torchvision_legacy_to_current_name(detectron2_to_project_name(k)): v
        for k, v in state_dict.items()
    }
    if renamed and all(_RESNET_ONLY.match(k) for k in renamed):
        renamed = {RESNET_PREFIX + k: v for k, v in renamed.items() if not k.startswith("fc")}
    return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in renamed.items()}


CONVERT_HINT = (
    "If you trust the file (it comes from a source you trust), convert it once to the safe "
    "format: python tools/convert_weights.py --trust-pickle {path} converted.pth"
)


def load_checkpoint_file(path: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with an error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file '{path}' does not exist.")
    if tarfile.is_tarfile(path):
        raise CheckpointError(
            f"'{path}' is in PyTorch's legacy .tar format (PyTorch < 0.4), which cannot be "
            "read without running the code pickled in it. " + CONVERT_HINT.format(path=path)
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"Cannot read checkpoint '{path}' with torch.load(weights_only=True): {e}\n"
            "Only files holding tensors and plain python values are loaded, since unpickling "
            "anything else could run arbitrary code. " + CONVERT_HINT.format(path=path)
        ) from e


def load_trusted_checkpoint_file(path: str) -> dict[str, Any]:
    """UNSAFE: ``torch.load(weights_only=False)`` runs whatever code the file pickled. Only for
    files the user trusts (``tools/convert_weights.py --trust-pickle``). Returns
    ``{"model": state dict in this project's names}``; a pickled module gives its state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file '{path}' does not exist.")
    content = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(content, torch.nn.Module):
        content = content.state_dict()
    if isinstance(content, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if isinstance(content, torch.nn.Module):
        content = content.state_dict()
    if not isinstance(content, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(content).__name__}, not a state dict.")
    tensors = {k: v for k, v in content.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    if not tensors:
        raise CheckpointError(f"'{path}' holds no tensors.")
    return {"model": to_project_names(tensors)}


def read_model_weights(path: str) -> dict[str, Any]:
    """``{"model": state dict in this project's names, ...}`` from any supported file."""
    local = resolve_weights_path(path)
    if local.endswith(".pkl"):
        content = read_array_pickle(local)
        if not isinstance(content, dict):
            raise CheckpointError(
                f"'{local}' holds a {type(content).__name__}, not a dict of arrays."
            )
        if "model" in content and "__author__" in content:  # detectron2 model zoo
            state = content["model"]
        else:  # Caffe2 / Detectron: detection models keep their arrays under "blobs"
            state = {
                caffe2_to_detectron2_name(k): v
                for k, v in content.get("blobs", content).items()
                if not k.endswith("_momentum") and k != "weight_order"
            }
        logger.info("Read %d arrays from the pickle '%s'.", len(state), local)
        return {"model": to_project_names(state)}
    checkpoint = load_checkpoint_file(local)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"'{local}' does not hold a dict; got {type(checkpoint).__name__}.")
    if isinstance(checkpoint.get("model"), Mapping):
        return {**checkpoint, "model": to_project_names(checkpoint["model"])}
    return {"model": to_project_names(checkpoint)}


# A converted file must hold at least this many backbone tensors (a network, not a fragment).
MIN_BACKBONE_TENSORS = 20
_BACKBONE_NAME = re.compile(r"(^|\.)backbone\.")


def convert_weight_file(src: str, dst: str, trust_pickle: bool = False) -> int:
    """Write the model weights of ``src`` (anything ``read_model_weights`` reads; with
    ``trust_pickle``, any pickle) to ``dst`` atomically as this project's checkpoint format, so
    that loading it later needs no conversion and no unpickling; returns the number of tensors.

    Raises CheckpointError, and writes nothing, when ``src`` gives too few backbone tensors.
    """
    checkpoint = load_trusted_checkpoint_file(src) if trust_pickle else read_model_weights(src)
    state = {k: v for k, v in checkpoint["model"].items() if isinstance(v, torch.Tensor)}
    dropped = sorted(set(checkpoint["model"]) - set(state))
    if dropped:
        logger.warning("Entries that are not tensors are left out: %s", dropped)
    check_has_network(src, state)
    with atomic_open(dst) as f:
        torch.save({"model": state, "__author__": f"converted from {src}"}, f)
    return len(state)


def check_has_network(src: str, state: dict[str, torch.Tensor]) -> None:
    """Raises CheckpointError naming ``src`` unless ``state`` holds at least
    ``MIN_BACKBONE_TENSORS`` backbone tensors."""
    backbone = [k for k in state if _BACKBONE_NAME.search(k)]
    if len(backbone) >= MIN_BACKBONE_TENSORS:
        return
    found = f"{len(state)} tensors ({_sample(state)})" if state else "no tensors"
    raise CheckpointError(
        f"'{src}' gives {found}, {len(backbone)} of them backbone weights; expected a network's "
        f"state dict with at least {MIN_BACKBONE_TENSORS} backbone tensors (a ResNet, or a "
        "detectron2 / AdelaiDet / BoxTeacher detector). Nothing was written."
    )


def _sample(names: dict[str, torch.Tensor], count: int = 5) -> str:
    """The first ``count`` names, and how many more."""
    shown = list(names)[:count]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f", ... {more} more" if more else "")
