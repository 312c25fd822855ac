"""Checkpoints: atomic saving, safe loading (``weights_only``), exact resume (RNG included).

A checkpoint file is a dict::

    {"model": state dict (no "module." prefix), "optimizer": ..., "scheduler": ...,
     ["grad_scaler": ...,] "rng": RNG states of every process,
     "iteration": last finished iteration,
     "data_seed": seed of the training data}

holding only tensors and plain python values, so ``torch.load(weights_only=True)`` reads it.

A model made of several networks loads the weights of one of them through the
``MultiNetworkCheckpointing`` protocol.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from fvcore.common.checkpoint import Checkpointer as _FvcoreCheckpointer
from fvcore.common.checkpoint import (
    get_missing_parameters_message,
    get_unexpected_parameters_message,
)
from torch import nn

from ..utils import comm
from ..utils.env import get_rng_state, set_rng_state
from ..utils.io import atomic_open
from .train_loop import unwrap_model
from .weight_files import RESNET_PREFIX, CheckpointError, read_model_weights

__all__ = [
    "Checkpointer",
    "MultiNetworkCheckpointing",
    "RNGState",
    "atomic_open",
    "load_model_weights",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class MultiNetworkCheckpointing(Protocol):
    """What a model made of several networks (BoxTeacher: ``teacher.`` and ``student.``) provides
    so that ``load_model_weights`` loads a checkpoint of one network into it. A model without
    these members loads checkpoints key by key (and, if it is one network, takes the ``teacher.``
    part of a teacher-student checkpoint).
    """

    #: The prefix, e.g. "student.", of the network that a one-network checkpoint (ImageNet
    #: backbone, CondInst / BoxInst weights) loads into; read before the keys are matched.
    single_network_prefix: str

    def on_weights_loaded(self, loaded_keys: list[str]) -> None:
        """Called after every load with the model keys that were loaded, e.g. to set up the
        networks the checkpoint did not hold (BoxTeacher: the teacher as a copy of the student)."""


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A copy without ``prefix`` when every key has it (detectron2's rule)."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


#: Where a torchvision detection backbone (``BackboneWithFPN``, e.g. of Mask R-CNN) keeps its
#: ResNet.
TORCHVISION_RESNET_PREFIX = "backbone.body."


def _rehome_resnet(
    state_dict: dict[str, Any], model_state: Mapping[str, Any], prefix: str
) -> dict[str, Any]:
    """A ResNet-only checkpoint (ImageNet weights, read under ``RESNET_PREFIX``) moved under
    ``TORCHVISION_RESNET_PREFIX`` when the model has none of the checkpoint's keys but has them
    under that prefix; else ``state_dict`` unchanged. ``prefix`` is the network the checkpoint
    was placed in ("student." for a one-network checkpoint in BoxTeacher, else "")."""
    ours, theirs = prefix + RESNET_PREFIX, prefix + TORCHVISION_RESNET_PREFIX
    if not all(key.startswith(ours) for key in state_dict) or any(
        key in model_state for key in state_dict
    ):
        return state_dict
    moved = {theirs + key[len(ours) :]: value for key, value in state_dict.items()}
    return moved if any(key in model_state for key in moved) else state_dict


def _keys_of_model(
    state_dict: dict[str, Any], model_state: Mapping[str, Any], prefix: str, source: str
) -> tuple[dict[str, Any], bool]:
    """The checkpoint renamed to the model's keys, and whether it is one network loaded into a
    model of several. A model made of several networks (BoxTeacher) loads a one-network
    checkpoint into the network ``prefix`` names (e.g. "student."); a one-network model takes
    the teacher of a BoxTeacher checkpoint (the network BoxTeacher evaluates with). ImageNet
    weights go into the model's ResNet, ours or torchvision's (``_rehome_resnet``)."""
    one_network = bool(prefix) and not any(key in model_state for key in state_dict)
    if one_network:
        state_dict = {prefix + key: value for key, value in state_dict.items()}
    if not any(key in model_state for key in state_dict) and any(
        k.startswith("teacher.") for k in state_dict
    ):
        logger.info("'%s' is a teacher-student checkpoint: loading its teacher.", source)
        state_dict = {
            k[len("teacher.") :]: v for k, v in state_dict.items() if k.startswith("teacher.")
        }
    return _rehome_resnet(state_dict, model_state, prefix if one_network else ""), one_network


def _loadable_tensors(
    state_dict: Mapping[str, Any], model_state: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose key and shape the model has (shape mismatches skipped with
    a warning). Raises CheckpointError for a non-tensor value or when nothing fits."""
    loadable: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in model_state:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"'{key}' in '{source}' is a {type(value).__name__}, not a tensor."
            )
        expected = tuple(model_state[key].shape)
        if tuple(value.shape) != expected:
            logger.warning(
                "Skip loading '%s' from '%s': shape %s in the checkpoint, %s in the model.",
                key,
                source,
                tuple(value.shape),
                expected,
            )
            continue
        loadable[key] = value
    if model_state and not loadable:
        raise CheckpointError(
            f"Not a single tensor of '{source}' fits the model: it is a checkpoint of another "
            f"model (checkpoint keys start with {sorted(state_dict)[:3]}, model keys with "
            f"{sorted(model_state)[:3]})."
        )
    return loadable


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold a NaN or an infinity."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


def describe_tensors(names: list[str], total: int, shown: int = 3) -> str:
    """ "2 of 10 tensors (a, b)"-style summary naming the first ``shown`` of ``names``."""
    listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    return f"{len(names)} of {total} tensors ({listed})"


def load_model_weights(
    model: nn.Module, checkpoint: Mapping[str, Any], source: str
) -> tuple[list[str], list[str]]:
    """Load weights into ``model`` by exact key, tolerating missing and unexpected keys.

    Args:
        model: the model (a DDP wrapper is unwrapped).
        checkpoint: ``{"model": state_dict, ...}`` or a bare state dict; a "module." prefix on
            every key is removed. A ``MultiNetworkCheckpointing`` model takes a checkpoint of
            one network under its ``single_network_prefix`` and is told which keys were loaded
            (``on_weights_loaded``); another model takes the ``teacher.`` part of a
            teacher-student checkpoint. ImageNet weights (read under ``RESNET_PREFIX``) load
            into ``TORCHVISION_RESNET_PREFIX`` when the model keeps its ResNet there.
        source: where the weights come from, for the messages.

    Tensors whose shape differs from the model's are skipped with a warning; missing and
    unexpected keys are logged, grouped by prefix; loaded tensors holding NaN or infinite values
    are loaded with a warning naming them. Returns ``(missing, unexpected)`` keys.

    Raises:
        CheckpointError: not a state dict, or not a single tensor could be loaded (the file is
            for another model).
    """
    state_dict = checkpoint
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        state_dict = checkpoint["model"]
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"'{source}' holds no state dict (a dict of tensors).")
    state_dict = _strip_prefix(state_dict, "module.")
    model = unwrap_model(model)
    model_state = model.state_dict()
    multi_network = isinstance(model, MultiNetworkCheckpointing)
    prefix = model.single_network_prefix if multi_network else ""
    state_dict, one_network = _keys_of_model(state_dict, model_state, prefix, source)
    loadable = _loadable_tensors(state_dict, model_state, source)
    non_finite = non_finite_tensors(loadable)
    if non_finite:
        logger.warning(
            "'%s' holds NaN or infinite values in %s: the model will predict garbage.",
            source,
            describe_tensors(non_finite, len(loadable)),
        )
    incompatible = model.load_state_dict(loadable, strict=False)
    if multi_network:
        model.on_weights_loaded(list(loadable))
    # The other networks of a one-network load are set by ``on_weights_loaded``.
    missing = [k for k in incompatible.missing_keys if not one_network or k.startswith(prefix)]
    unexpected = [key for key in state_dict if key not in model_state]
    logger.info("Loaded %d of %d model tensors from '%s'.", len(loadable), len(model_state), source)
    if missing:
        logger.warning(get_missing_parameters_message(missing))
    if unexpected:
        logger.warning(get_unexpected_parameters_message(unexpected))
    return missing, unexpected


class RNGState:
    """Checkpointable RNG states of every process: torch (CPU and current CUDA device), python
    ``random`` and numpy.

    ``state_dict`` gathers the states of all processes, so in multi-process runs it must be
    called by every process (``Checkpointer.save`` is, see there); ``load_state_dict`` restores
    this process's own state.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"per_rank": comm.all_gather(get_rng_state())}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        states = state_dict["per_rank"]
        rank, world_size = comm.get_rank(), comm.get_world_size()
        if len(states) != world_size:
            logger.warning(
                "The checkpoint holds RNG states of %d processes but %d run now: the random "
                "streams after resuming differ from an uninterrupted run.",
                len(states),
                world_size,
            )
        set_rng_state(states[rank % len(states)])


class Checkpointer(_FvcoreCheckpointer):
    """fvcore's ``Checkpointer`` with atomic saves and ``weights_only`` loading.

    Args:
        model: the model; a DDP wrapper is unwrapped so that keys have no "module." prefix.
        save_dir: where checkpoints and the ``last_checkpoint`` tag go.
        save_to_disk: whether this process writes files (``comm.is_main_process()`` in
            multi-process runs).
        checkpointables: objects with ``state_dict``/``load_state_dict`` saved under their
            keyword (``optimizer=``, ``scheduler=``, ``rng=RNGState()``, ...).

    In multi-process runs, call ``save`` on every process (as the ``PeriodicCheckpointer``
    hook does): the ``RNGState`` checkpointable gathers the states of all processes, and only
    processes with ``save_to_disk`` write.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: bool = True,
        **checkpointables: Any,
    ) -> None:
        super().__init__(
            unwrap_model(model), save_dir, save_to_disk=save_to_disk, **checkpointables
        )

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``save_dir/name.pth`` atomically with ``kwargs`` as extra fields, then tag it.

        Raises:
            FloatingPointError: the model's weights hold NaN or infinite values (a step whose
                loss was finite diverged); nothing is written, so the last checkpoint on disk
                keeps finite weights. Checked on every process, so all of them stop.
        """
        model_state = self.model.state_dict()
        non_finite = non_finite_tensors(model_state)
        if non_finite:
            raise FloatingPointError(
                f"Not writing checkpoint '{name}.pth' to '{self.save_dir}': the model's weights "
                "hold "
                f"NaN or infinite values in {describe_tensors(non_finite, len(model_state))}."
            )
        data = {"model": model_state}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        if not self.save_dir or not self.save_to_disk:
            return
        os.makedirs(self.save_dir, exist_ok=True)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        logger.info("Saving checkpoint to %s", path)
        with atomic_open(path, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_open(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """Resume from ``save_dir/last_checkpoint`` if ``resume`` and it exists, else load weights.

        Resuming loads the model and every checkpointable (optimizer, scheduler, RNG, ...) and
        returns the extra fields of the checkpoint (``iteration``, ``data_seed``). Otherwise
        only the model weights are loaded from ``path`` (if not empty) and ``{}`` is returned:
        the run starts from iteration 0.
        """
        if resume and self.has_checkpoint():
            return self.load(self.get_checkpoint_file())
        if resume:
            logger.info("No checkpoint to resume from in '%s'.", self.save_dir)
        self.load(path, checkpointables=[])
        return {}

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        """Load the model and the given checkpointables (all when ``None``) from ``path``.

        Returns the fields of the checkpoint that were not loaded (e.g. ``iteration``).
        """
        if not path:
            logger.info("No checkpoint given: the model keeps its initialisation.")
            return {}
        logger.info("Loading checkpoint from %s", path)
        checkpoint = read_model_weights(path)
        load_model_weights(self.model, checkpoint.pop("model"), path)
        for key in self.checkpointables if checkpointables is None else checkpointables:
            if key in checkpoint:
                logger.info("Loading %s from %s", key, path)
                self.checkpointables[key].load_state_dict(checkpoint.pop(key))
            else:
                logger.warning("'%s' has no '%s' to load; it keeps its current state.", path, key)
        return checkpoint
