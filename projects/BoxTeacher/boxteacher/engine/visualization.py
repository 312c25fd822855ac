"""Pictures of training (``VIS_PERIOD``): what the network saw and predicted on the first image of
the batch it has just been trained on, to TensorBoard and ``OUTPUT_DIR/vis/iter_XXXXXXX.png``.

BoxTeacher gives three panels: the clean view with the ground-truth boxes, the teacher's pseudo
masks assigned to these boxes with their weights (computed as in the training step), and the
student's predictions on its own view. CondInst / BoxInst give two: the view the network trains
on with the ground-truth boxes, and the network's predictions. Drawing a picture never changes
training: see ``TrainingVisualizer``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from ..config.architecture import ArchitectureSpec
from ..modeling.boxteacher import BoxTeacher
from ..utils import comm
from ..utils.visualizer import draw_instances, save_png, side_by_side
from .hooks import _preserved_rng
from .train_loop import HookBase, unwrap_model

__all__ = [
    "TrainingVisualizer",
    "draw_training_picture",
    "network_outputs",
    "preserved_model_state",
]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """On exit, restore the train/eval mode of every module of ``model`` and the values of all
    its buffers (BatchNorm running statistics, iteration counters such as ``mask_head._iter``)."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, saved in buffers.items():
                model.get_buffer(name).copy_(saved)
        for module, training in modes:
            module.training = training


def to_rgb(image: torch.Tensor, input_format: str) -> np.ndarray:
    """A uint8 (3, H, W) image in ``input_format`` ("BGR" or "RGB") as RGB uint8 (H, W, 3)."""
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    return cv2.cvtColor(hwc, cv2.COLOR_BGR2RGB) if input_format == "BGR" else hwc


def predict(
    network: nn.Module, image: torch.Tensor, score_threshold: float
) -> dict[str, np.ndarray]:
    """Detections of ``network`` (run in eval mode) on a uint8 (3, H, W) image, scores >=
    ``score_threshold``: ``boxes`` (M, 4), ``scores`` (M,), ``labels`` (M,), ``masks`` bool
    (M, H, W), at the image's own resolution."""
    network.eval()
    height, width = image.shape[-2:]
    instances = network([{"image": image, "height": height, "width": width}])[0]["instances"]
    keep = instances["scores"] >= score_threshold
    return {k: instances[k][keep].cpu().numpy() for k in ("boxes", "scores", "labels", "masks")}


def pseudo_labels(model: BoxTeacher, batch: list[dict]) -> dict[str, np.ndarray]:
    """The pseudo masks ``masks`` bool (N, H, W) and ``weights`` (N,) of the first sample's
    ground-truth boxes, as the training step computes them: the teacher sees the whole batch in
    its training mode (its BatchNorm may use batch statistics). Soft masks are cut at 0.5."""
    labels = model.pseudo_label(batch)[0]
    masks = labels["masks"] if labels["masks"].dtype == torch.bool else labels["masks"] > 0.5
    return {"masks": masks.cpu().numpy(), "weights": labels["weights"].cpu().numpy()}


def network_outputs(
    model: nn.Module, batch: list[dict], score_threshold: float, spec: ArchitectureSpec
) -> dict[str, dict[str, np.ndarray]]:
    """What the picture of ``batch[0]`` shows: ``predictions`` (see ``predict``) of the network
    that trains (a teacher-student model, ``spec.teacher_student``: the student, on its view) and,
    for a teacher-student model, ``pseudo_labels``.

    ``model`` is a bare module (not a DDP wrapper). It is left in eval mode with possibly
    changed buffers: callers restore them (``preserved_model_state``) and disable gradients.
    """
    sample = batch[0]
    image = sample.get("aug_image", sample["image"])
    if not spec.teacher_student:
        return {"predictions": predict(model, image, score_threshold)}
    return {
        "pseudo_labels": pseudo_labels(model, batch),
        "predictions": predict(model.student, image, score_threshold),
    }


def _names(labels: np.ndarray, class_names: Sequence[str]) -> list[str]:
    return [class_names[i] if 0 <= i < len(class_names) else str(i) for i in labels.tolist()]


def draw_training_picture(
    sample: dict,
    outputs: dict[str, dict[str, np.ndarray]],
    class_names: Sequence[str],
    input_format: str = "BGR",
    score_threshold: float = 0.5,
) -> np.ndarray:
    """The panels of one training sample side by side, with titles: RGB uint8 (H', W', 3).

    Without ``pseudo_labels`` in ``outputs`` (CondInst, BoxInst): the network's view with the
    ground-truth boxes, and its predictions. With them (BoxTeacher): the clean view ``image``
    with the ground-truth boxes, the same with the pseudo masks and weights, and the student's
    predictions on its view ``aug_image``.
    """
    instances = sample.get("instances", {})
    gt_boxes = (
        instances["boxes"].cpu().numpy() if "boxes" in instances else np.zeros((0, 4), np.float32)
    )
    gt_names = (
        _names(instances["labels"].cpu().numpy(), class_names) if "labels" in instances else []
    )
    view = to_rgb(sample.get("aug_image", sample["image"]), input_format)
    predictions = outputs["predictions"]
    prediction_panel = draw_instances(
        view,
        predictions["masks"],
        predictions["boxes"],
        _names(predictions["labels"], class_names),
        predictions["scores"].tolist(),
    )
    if "pseudo_labels" not in outputs:
        return side_by_side(
            [draw_instances(view, boxes=gt_boxes, labels=gt_names), prediction_panel],
            ["input, GT boxes", f"prediction, score >= {score_threshold:g}"],
        )
    clean = to_rgb(sample["image"], input_format)
    pseudo = outputs["pseudo_labels"]
    return side_by_side(
        [
            draw_instances(clean, boxes=gt_boxes, labels=gt_names),
            draw_instances(clean, pseudo["masks"], gt_boxes, gt_names, pseudo["weights"].tolist()),
            prediction_panel,
        ],
        [
            "clean view, GT boxes",
            "teacher pseudo masks, weights",
            f"student, score >= {score_threshold:g}",
        ],
    )


class TrainingVisualizer(HookBase):
    """Every ``period`` iterations (at iterations 0, period, 2 * period, ...), the picture of
    the first image of the batch just trained on (``draw_training_picture``) goes to the event
    storage (TensorBoard) as ``tag`` and to ``output_dir/vis/iter_XXXXXXX.png``.

    Training continues exactly as without the hook: the passes run without gradients, and the
    RNG states, the modules' modes and all buffers are restored after them. The passes run on
    every process (the teacher's SyncBatchNorm, in train mode, synchronises across processes);
    only the main process draws and writes. Needs a trainer with ``last_batch`` (the batch of
    the last step, see ``engine.trainer.Trainer``).

    Args:
        period: iterations between pictures (> 0).
        output_dir: the run's OUTPUT_DIR.
        class_names: names of the label ids.
        spec: the architecture's spec (what ``network_outputs`` shows).
        input_format: channel order of the images ("BGR" or "RGB").
        score_threshold: predictions below this confidence are not drawn. 0.5 as in
            ``tools/demo.py``: BoxTeacher's mask-aware scores sqrt(score x mask quality) are
            higher than FCOS scores, and lower thresholds bury the objects under duplicates.
    """

    tag = "training_visualization"

    def __init__(
        self,
        period: int,
        output_dir: str,
        class_names: Sequence[str],
        spec: ArchitectureSpec,
        input_format: str = "BGR",
        score_threshold: float = 0.5,
    ) -> None:
        if period <= 0:
            raise ValueError(f"TrainingVisualizer needs a period > 0; got {period}.")
        self._period = period
        self._folder = os.path.join(output_dir, "vis")
        self._class_names = list(class_names)
        self._spec = spec
        self._input_format = input_format
        self._score_threshold = score_threshold

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if iteration % self._period:
            return
        model = unwrap_model(self.trainer.model)
        batch = self.trainer.last_batch
        # In mixed precision as the step was, so that the pseudo masks are those it used.
        autocast = getattr(self.trainer, "autocast", contextlib.nullcontext)
        with torch.no_grad(), _preserved_rng(), preserved_model_state(model), autocast():
            outputs = network_outputs(model, batch, self._score_threshold, self._spec)
        if not comm.is_main_process():
            return
        picture = draw_training_picture(
            batch[0], outputs, self._class_names, self._input_format, self._score_threshold
        )
        self.trainer.storage.put_image(self.tag, torch.from_numpy(picture))
        path = os.path.join(self._folder, f"iter_{iteration:07d}.png")
        save_png(path, picture)
        logger.debug("Training picture of iteration %d written to %s", iteration, path)
