"""Common set-up of a training / evaluation script: command-line flags, logging, seeding,
devices and the DDP wrapper."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Mapping, Sequence

import torch
from fvcore.common.config import CfgNode
from torch import nn

from ..config import load_config
from ..data import register_datasets_from_config
from ..utils import comm
from ..utils.env import collect_env_info, resolve_device, seed_all_rng
from ..utils.logger import setup_logger
from .checkpoint import atomic_open

__all__ = [
    "default_argument_parser",
    "default_setup",
    "setup_config",
    "setup_tool_logging",
    "resolve_device",
    "resolve_data_seed",
    "create_ddp_model",
]

logger = logging.getLogger(__name__)


_CONFIG_FILE_FLAGS = {
    "optional": {"default": "", "metavar": "FILE", "help": "path to a YAML config"},
    "required": {"required": True, "metavar": "FILE", "help": "path to a YAML config"},
    "many": {
        "required": True,
        "nargs": "+",
        "metavar": "FILE",
        "help": "paths to YAML configs, run with the same overrides",
    },
}


def default_argument_parser(
    epilog: str | None = None,
    *,
    description: str | None = None,
    config: str = "optional",
    overrides: bool = True,
    training: bool = True,
) -> argparse.ArgumentParser:
    """The command line of ``train_net.py`` and of every tool, which adds its own flags.

    Args:
        epilog, description: the help's text after and before the flags (a tool passes its
            module docstring as ``description``); ``train_net.py`` gets example commands.
        config: ``--config-file``: "optional" (``train_net.py``, detectron2's), "required",
            "many" (``--config-file A.yaml B.yaml``: tools that compare configs) or "none".
        overrides: trailing ``KEY VALUE`` config overrides (``opts``).
        training: detectron2's training flags: ``--resume``, ``--eval-only``, ``--num-gpus``,
            ``--num-machines``, ``--machine-rank``, ``--dist-url``.
    """
    if config != "none" and config not in _CONFIG_FILE_FLAGS:
        raise ValueError(f"config must be one of {[*_CONFIG_FILE_FLAGS, 'none']}, not '{config}'.")
    if epilog is None and training:
        epilog = (
            "Examples:\n"
            f"  {sys.argv[0]} --config-file cfg.yaml --num-gpus 8\n"
            f"  {sys.argv[0]} --config-file cfg.yaml --eval-only MODEL.WEIGHTS model.pth\n"
            f"  torchrun --nproc-per-node 8 {sys.argv[0]} --config-file cfg.yaml\n"
        )
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if config != "none":
        parser.add_argument("--config-file", **_CONFIG_FILE_FLAGS[config])
    if training:
        _add_training_flags(parser)
    if overrides:
        parser.add_argument(
            "opts",
            default=None,
            nargs=argparse.REMAINDER,
            help="config overrides as KEY VALUE pairs at the end, e.g. SOLVER.IMS_PER_BATCH 8",
        )
    return parser


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from OUTPUT_DIR/last_checkpoint if it exists (else load MODEL.WEIGHTS)",
    )
    parser.add_argument("--eval-only", action="store_true", help="only evaluate MODEL.WEIGHTS")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="rank of this machine")
    parser.add_argument(
        "--dist-url",
        default="auto",
        help="tcp://host:port of machine 0; 'auto' picks a free local port (one machine only)",
    )


def setup_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """The config of a command line (``load_config``: the file, then the ``KEY VALUE``
    overrides ``opts``), with the datasets it names by path (``DATASETS.REGISTER``) registered.

    The one set-up of ``train_net.py`` and the tools; a script that builds a config itself
    registers them with ``boxteacher.data.register_datasets_from_config(cfg)``."""
    cfg = load_config(config_file, list(opts))
    register_datasets_from_config(cfg)
    return cfg


def setup_tool_logging(level: int = logging.INFO) -> None:
    """Logging of a command-line tool: the project's loggers (``boxteacher.*``) on the
    console at ``level`` and above, on ``sys.stderr``, so that ``sys.stdout`` holds only the
    tool's tables."""
    setup_logger(name="boxteacher", console_level=level, stream=sys.stderr)


def default_setup(cfg: CfgNode, args: argparse.Namespace) -> int:
    """Output directory, logging, environment and config logs, config dump, seeding, cuDNN.

    Logs go to the console (main process) and ``OUTPUT_DIR/log.txt`` (``log.txt.rankN`` for
    the other processes); the merged config is written to ``OUTPUT_DIR/config.yaml``. The
    RNGs are seeded with ``SEED + rank`` (a random seed when ``SEED < 0``). Returns the seed.
    """
    output_dir = cfg.OUTPUT_DIR
    rank = comm.get_rank()
    os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank, name="boxteacher")

    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info("Environment info:\n%s", collect_env_info())
    logger.info("Command line: %s", " ".join(sys.argv))
    logger.info("Arguments: %s", args)
    config_file = getattr(args, "config_file", "")
    if config_file:
        with open(config_file, encoding="utf-8") as f:
            logger.info("Contents of config file %s:\n%s", config_file, f.read())
    logger.info("Running with full config:\n%s", cfg.dump())
    if comm.is_main_process():
        path = os.path.join(output_dir, "config.yaml")
        with atomic_open(path, "w") as f:
            f.write(cfg.dump())
        logger.info("Full config saved to %s", path)

    seed = seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    logger.info("Seeded the random number generators of this process with %d", seed)
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    return seed


def resolve_data_seed(cfg: CfgNode, checkpoint_extra: Mapping[str, Any]) -> int:
    """The seed of the training data: the resumed one, else ``SEED`` if >= 0, else random.

    The random seed is drawn on the main process and shared, so call this on every process.
    """
    if "data_seed" in checkpoint_extra:
        return int(checkpoint_extra["data_seed"])
    if cfg.SEED >= 0:
        return int(cfg.SEED)
    return int(comm.shared_random_seed())


def create_ddp_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` in multi-process runs, else return it.

    Defaults: ``broadcast_buffers=False`` (the reference setting), and the local GPU as the
    device when the model is on CUDA. ``kwargs`` go to ``DistributedDataParallel``.
    """
    if comm.get_world_size() == 1:
        return model
    kwargs.setdefault("broadcast_buffers", False)
    device = next(model.parameters()).device
    if device.type == "cuda":
        kwargs.setdefault("device_ids", [device.index])
    return nn.parallel.DistributedDataParallel(model, **kwargs)
