"""The trainer a config describes: model, optimizer, schedule, data, checkpoints, evaluation
and writers, assembled as detectron2's ``DefaultTrainer`` assembles them."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Iterator

import torch
from torch import nn

from ..build import architecture_spec, build_model
from ..config import ArchitectureSpec, CfgNode
from ..data.build import (
    build_semi_supervised_loader,
    build_test_loader,
    build_train_loader,
    get_train_metadata,
)
from ..data.catalog import get_metadata
from ..evaluation import COCOEvaluator, DatasetEvaluator, inference_on_dataset, print_csv_format
from ..modeling.ema import momentum_for_horizon
from ..utils import comm
from ..utils.comm import unwrap_model
from ..utils.env import seed_all_rng
from ..utils.io import remove_stale_temporary_files
from . import hooks
from .checkpoint import Checkpointer, RNGState
from .defaults import create_ddp_model, default_setup, resolve_data_seed, setup_config
from .events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from .solver import build_grad_clipper, build_lr_scheduler, build_optimizer
from .train_loop import SimpleTrainer
from .visualization import TrainingVisualizer

logger = logging.getLogger(__name__)


def build_evaluator(cfg: CfgNode, dataset_name: str, folder: str = "inference") -> DatasetEvaluator:
    """The evaluator of a test dataset, by its ``evaluator_type`` metadata, writing into
    ``OUTPUT_DIR/folder/dataset_name``."""
    evaluator_type = getattr(get_metadata(dataset_name), "evaluator_type", "coco")
    if evaluator_type != "coco":
        raise ValueError(
            f"Dataset '{dataset_name}' asks for evaluator '{evaluator_type}'; only 'coco' exists."
        )
    return COCOEvaluator(
        dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR, folder, dataset_name)
    )


def evaluate(cfg: CfgNode, model: nn.Module) -> dict[str, Any]:
    """Evaluate ``model`` on every dataset of ``DATASETS.TEST``; with
    ``MODEL.BOX_TEACHER.EVAL_BOTH``, a teacher-student model's other network too.

    Returns, on the main process, ``{task: {metric: value}}`` for a single test dataset and
    ``{dataset: {task: {metric: value}}}`` for several, plus the other network's results of that
    form under its name (``{"student": ...}``); ``{}`` on the other processes.
    """
    network = unwrap_model(model)
    if not cfg.MODEL.BOX_TEACHER.EVAL_BOTH:
        return _evaluate_datasets(cfg, model, getattr(network, "inference_network", ""))
    if not hasattr(network, "inference_by"):
        raise ValueError(
            "MODEL.BOX_TEACHER.EVAL_BOTH evaluates a teacher and a student; "
            f"{type(network).__name__} has one network."
        )
    results = _evaluate_datasets(cfg, model, network.inference_network)
    other = "student" if network.inference_network == "teacher" else "teacher"
    with network.inference_by(other):
        other_results = _evaluate_datasets(cfg, model, other, f"inference/{other}")
    return {**results, other: other_results} if comm.is_main_process() else {}


def _evaluate_datasets(
    cfg: CfgNode, model: nn.Module, network: str, folder: str = "inference"
) -> dict[str, Any]:
    results = {}
    for name in cfg.DATASETS.TEST:
        result = inference_on_dataset(
            model, build_test_loader(cfg, name), build_evaluator(cfg, name, folder)
        )
        if comm.is_main_process():
            logger.info("Evaluation results of %s%s:", name, f" ({network})" if network else "")
            print_csv_format(result)
        results[name] = result
    if not comm.is_main_process():
        return {}
    return next(iter(results.values())) if len(results) == 1 else results


def build_training_data(
    cfg: CfgNode, spec: ArchitectureSpec, *, seed: int, start_iter: int
) -> Iterator[list[dict]]:
    """The training batches of ``cfg`` from ``start_iter`` on: labelled (``build_train_loader``),
    and with ``DATASETS.UNLABELED`` followed by ``round(DATALOADER.UNLABELED_RATIO *
    SOLVER.IMS_PER_BATCH)`` unlabelled images (``build_semi_supervised_loader``). ValueError
    naming DATASETS.UNLABELED when the architecture does not learn from unlabelled images."""
    if not cfg.DATASETS.UNLABELED:
        return build_train_loader(cfg, spec, seed=seed, start_iter=start_iter)
    if not spec.unlabeled_images:
        raise ValueError(
            f"DATASETS.UNLABELED is set, but {cfg.MODEL.META_ARCHITECTURE} does not learn from "
            "unlabelled images; semi-supervised training needs MODEL.META_ARCHITECTURE "
            "BoxTeacher with MODEL.BOX_TEACHER.STUDENT CondInst."
        )
    batch_size = max(1, round(cfg.DATALOADER.UNLABELED_RATIO * cfg.SOLVER.IMS_PER_BATCH))
    return build_semi_supervised_loader(
        cfg, spec, list(cfg.DATASETS.UNLABELED), batch_size, seed=seed, start_iter=start_iter
    )


def check_num_classes(cfg: CfgNode) -> None:
    """MODEL.FCOS.NUM_CLASSES must equal the number of classes of the training data."""
    num_classes = len(get_train_metadata(cfg).thing_classes)
    if num_classes != cfg.MODEL.FCOS.NUM_CLASSES:
        raise ValueError(
            f"The training datasets {list(cfg.DATASETS.TRAIN)} have {num_classes} classes but "
            f"MODEL.FCOS.NUM_CLASSES is {cfg.MODEL.FCOS.NUM_CLASSES}; set it to {num_classes}."
        )


AMP_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(cfg: CfgNode, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``SOLVER.AMP`` on ``device`` (None: AMP off)."""
    precision = cfg.SOLVER.AMP.PRECISION
    if precision != "auto" and precision not in AMP_PRECISIONS:
        raise ValueError(
            f"SOLVER.AMP.PRECISION must be 'auto', 'bfloat16' or 'float16', got {precision!r}"
        )
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    if precision == "auto":
        bfloat16 = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
        precision = "bfloat16" if bfloat16 else "float16"
    logger.info("Mixed precision: %s autocast on %s.", precision, device)
    if device.type == "cpu":
        logger.warning(
            "Mixed precision on a CPU is rarely faster than float32, and its bfloat16 backward "
            "kernels can give huge gradients (seen with oneDNN on CPUs without native bfloat16): "
            "SOLVER.AMP is meant for CUDA."
        )
    return AMP_PRECISIONS[precision]


def ema_max_momentum(cfg: CfgNode) -> float:
    """MODEL.BOX_TEACHER.MOMENTUM, lowered to the momentum of an EMA over EMA_HORIZON of the
    schedule when that is set."""
    t = cfg.MODEL.BOX_TEACHER
    if t.EMA_HORIZON > 0:
        return min(t.MOMENTUM, momentum_for_horizon(round(t.EMA_HORIZON * cfg.SOLVER.MAX_ITER)))
    return t.MOMENTUM


class Trainer(SimpleTrainer):
    """Trains the model of ``cfg`` with the standard hooks; what the data holds and which hooks
    run follow the architecture's ``ArchitectureSpec`` (``spec``).

    Usage: ``Trainer(cfg).resume_or_load(resume=args.resume); trainer.train()``. The training
    data is built after resuming, from the restored data seed and iteration, so that a resumed
    run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, cfg: CfgNode):
        if comm.is_main_process():  # before this run writes anything there
            remove_stale_temporary_files(cfg.OUTPUT_DIR)
            check_num_classes(cfg)
        self.spec = architecture_spec(cfg)
        if cfg.MODEL.BOX_TEACHER.EVAL_BOTH and not self.spec.teacher_student:
            raise ValueError(
                "MODEL.BOX_TEACHER.EVAL_BOTH evaluates a teacher and a student; "
                f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} trains one network."
            )
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        super().__init__(
            create_ddp_model(model),
            None,
            optimizer,
            grad_clipper=build_grad_clipper(cfg),
            amp_dtype=amp_dtype(cfg, next(model.parameters()).device),
        )
        self.cfg = cfg
        self.scheduler = build_lr_scheduler(cfg, optimizer)
        self.checkpointer = Checkpointer(
            model,
            cfg.OUTPUT_DIR,
            save_to_disk=comm.is_main_process(),
            scheduler=self.scheduler,
            rng=RNGState(),
            **self.checkpointables(),
        )
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.last_results: dict[str, Any] = {}
        # The batch of the last step, for the hooks that look at it (TrainingVisualizer).
        self.last_batch: Any = None
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume from ``OUTPUT_DIR/last_checkpoint`` when ``resume`` and it exists, else load
        ``MODEL.WEIGHTS`` (if set) and start at iteration 0. Runs on every process."""
        extra = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        self.start_iter = int(extra.get("iteration", -1)) + 1
        self.data_seed = resolve_data_seed(self.cfg, extra)

    def build_hooks(self) -> list[hooks.HookBase]:
        cfg = self.cfg
        result: list[hooks.HookBase] = [
            hooks.IterationTimer(),
            hooks.LRScheduler(self.optimizer, self.scheduler),
            hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD),
            hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self.test),
        ]
        if cfg.VIS_PERIOD > 0:
            # Before the writers, so that they write the pictures of the same iteration.
            result.append(
                TrainingVisualizer(
                    cfg.VIS_PERIOD,
                    cfg.OUTPUT_DIR,
                    get_train_metadata(cfg).thing_classes,
                    self.spec,
                    cfg.INPUT.FORMAT,
                )
            )
        if comm.is_main_process():
            result.append(hooks.PeriodicWriter(self.build_writers(), period=20))
        if self.spec.teacher_student and self.spec.ema_teacher:
            # A teacher run in eval mode never updates its BN statistics itself.
            norm_stats = unwrap_model(self.model).teacher_eval_mode
            result.append(
                hooks.EMAHook(
                    ema_max_momentum(cfg),
                    norm_stats=norm_stats,
                    burn_in_iters=cfg.MODEL.SEMI.BURN_IN_ITERS,
                )
            )
        return result

    def _next_batch(self) -> Any:
        self.last_batch = super()._next_batch()
        return self.last_batch

    def build_writers(self) -> list:
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    def test(self) -> dict[str, Any]:
        """Evaluate the current model (in eval mode; its training mode is restored after)."""
        if not self.cfg.DATASETS.TEST:
            return {}
        self.last_results = evaluate(self.cfg, self.model)
        return self.last_results

    def train(self) -> dict[str, Any]:
        """Train from ``start_iter`` to ``SOLVER.MAX_ITER``; returns the last evaluation results."""
        if self.data_seed is None:
            self.resume_or_load(resume=False)
        self.data_loader = build_training_data(
            self.cfg, self.spec, seed=self.data_seed, start_iter=self.start_iter
        )
        super().train(self.start_iter, self.max_iter)
        return self.last_results


def train_or_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """What ``train_net.py`` runs in every process: the config of the command line
    (``default_argument_parser``), set up (``setup_config``, ``default_setup``), then training
    (resumed with ``--resume``) or, with ``--eval-only``, the evaluation of ``MODEL.WEIGHTS``
    (or of the last checkpoint with ``--resume``). Returns the evaluation results."""
    cfg = setup_config(args.config_file, args.opts)
    seed = default_setup(cfg, args)
    if args.eval_only:
        model = build_model(cfg)
        if not cfg.MODEL.WEIGHTS and not args.resume:
            logger.warning(
                "--eval-only without MODEL.WEIGHTS: evaluating randomly initialised weights."
            )
        Checkpointer(model, cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return evaluate(cfg, model)
    if cfg.MODEL.SEMI.TRAIN_TEACHER:
        cfg = train_teacher_first(cfg, resume=args.resume)
        seed_all_rng(seed)  # the student starts as in a run given the teacher by path
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def train_teacher_first(cfg: CfgNode, resume: bool) -> CfgNode:
    """Guided Distillation's stage 1 in the command that trains the student
    (``MODEL.SEMI.TRAIN_TEACHER``): the teacher is trained with ``cfg`` on ``DATASETS.TRAIN``
    alone in ``OUTPUT_DIR/teacher`` (kept when ``resume`` finds it finished, resumed when it is
    not); returns ``cfg`` with its ``model_final.pth`` as ``MODEL.SEMI.TEACHER_WEIGHTS``.
    ValueError naming the keys without a burn-in or with teacher weights already given."""
    s = cfg.MODEL.SEMI
    if s.TEACHER_WEIGHTS or s.BURN_IN_ITERS <= 0 or not cfg.DATASETS.UNLABELED:
        raise ValueError(
            "MODEL.SEMI.TRAIN_TEACHER trains the teacher of a guided burn-in: it needs "
            "DATASETS.UNLABELED, MODEL.SEMI.BURN_IN_ITERS > 0 and no MODEL.SEMI.TEACHER_WEIGHTS; "
            f"got DATASETS.UNLABELED {tuple(cfg.DATASETS.UNLABELED)}, BURN_IN_ITERS "
            f"{s.BURN_IN_ITERS} and TEACHER_WEIGHTS {s.TEACHER_WEIGHTS!r}."
        )
    folder = os.path.join(cfg.OUTPUT_DIR, "teacher")
    weights = os.path.join(folder, "model_final.pth")
    if resume and os.path.isfile(weights):
        logger.info("Stage 1: the teacher trained on the labelled images is there: %s", weights)
    else:
        teacher_cfg = cfg.clone()
        teacher_cfg.defrost()
        teacher_cfg.DATASETS.UNLABELED = ()
        teacher_cfg.MODEL.SEMI.TRAIN_TEACHER = False
        teacher_cfg.MODEL.SEMI.BURN_IN_ITERS = 0
        teacher_cfg.OUTPUT_DIR = folder
        teacher_cfg.freeze()
        logger.info(
            "Stage 1: training the teacher on the labelled images %s alone, in %s.",
            tuple(cfg.DATASETS.TRAIN),
            folder,
        )
        teacher = Trainer(teacher_cfg)
        teacher.resume_or_load(resume=resume)
        teacher.train()
        comm.synchronize()
    student_cfg = cfg.clone()
    student_cfg.defrost()
    student_cfg.MODEL.SEMI.TEACHER_WEIGHTS = weights
    student_cfg.freeze()
    return student_cfg
