"""Training engine: loop and hooks, events and writers, solver, checkpoints, launching."""

from .checkpoint import Checkpointer, RNGState, atomic_open, load_model_weights
from .defaults import (
    create_ddp_model,
    default_argument_parser,
    default_setup,
    resolve_data_seed,
    resolve_device,
    setup_config,
    setup_tool_logging,
)
from .events import (
    CommonMetricPrinter,
    EventStorage,
    EventWriter,
    JSONWriter,
    TensorboardXWriter,
    get_event_storage,
)
from .hooks import (
    EvalHook,
    IterationTimer,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
)
from .launch import DEFAULT_TIMEOUT, launch, started_by_torchrun
from .predictor import Predictor, build_trained_model
from .solver import (
    LRMultiplier,
    build_grad_clipper,
    build_lr_multiplier,
    build_lr_scheduler,
    build_optimizer,
    get_default_optimizer_params,
)
from .train_loop import HookBase, NonFiniteLossError, SimpleTrainer, TrainerBase, unwrap_model
from .weight_files import (
    CheckpointError,
    load_checkpoint_file,
    read_model_weights,
    resolve_weights_path,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "RNGState",
    "atomic_open",
    "load_checkpoint_file",
    "load_model_weights",
    "read_model_weights",
    "resolve_weights_path",
    "create_ddp_model",
    "default_argument_parser",
    "default_setup",
    "resolve_data_seed",
    "resolve_device",
    "setup_config",
    "setup_tool_logging",
    "Predictor",
    "build_trained_model",
    "CommonMetricPrinter",
    "EventStorage",
    "EventWriter",
    "JSONWriter",
    "TensorboardXWriter",
    "get_event_storage",
    "EvalHook",
    "IterationTimer",
    "LRScheduler",
    "PeriodicCheckpointer",
    "PeriodicWriter",
    "DEFAULT_TIMEOUT",
    "launch",
    "started_by_torchrun",
    "LRMultiplier",
    "build_grad_clipper",
    "build_lr_multiplier",
    "build_lr_scheduler",
    "build_optimizer",
    "get_default_optimizer_params",
    "HookBase",
    "NonFiniteLossError",
    "SimpleTrainer",
    "TrainerBase",
    "unwrap_model",
]
