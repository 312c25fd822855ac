"""torchvision's Mask R-CNN (He et al., ICCV 2017) under this project's data contract, as a
BoxTeacher student and teacher.

The network is torchvision's (``backbone``, ``rpn``, ``roi_heads`` under torchvision's names, so
that its COCO checkpoints load by key); the input batching, the mask losses and the output are
the project's: the data contract of ``meta_arch.py`` (inputs resized by the data loader, labels
0..K-1, outputs in the original frame, masks encoded when ``encode_masks`` is set), the mask
losses of ``roi_masks.RoIMaskSupervision`` (annotation masks, pseudo masks, boxes), and the
teacher protocol of ``teacher.py`` (``MaskRCNNTeacherView``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.profiler import record_function
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork

from .layers import batch_images, full_precision, inside_boxes
from .mask_scores import foreground_sums, mask_aware_scores, mean_of_sums
from .postprocess import PASTE_CHUNK_PIXELS, binarise_in_chunks, rescale_boxes
from .roi_masks import RoIMaskSupervision, paste_roi_maps
from .teacher import TeacherPass, assignable_detections, resize_to_test_size, to_student_frame


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """The modules in eval mode inside the block, their own modes restored after."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class MaskRCNN(nn.Module):
    """Mask R-CNN: an FPN backbone, a region proposal network and RoI heads (boxes, classes and
    (S, S) masks of the predicted class), torchvision's modules.

    Args:
        backbone: torchvision's ``BackboneWithFPN`` (``body`` a ResNet, ``fpn``).
        rpn: torchvision's ``RegionProposalNetwork``.
        roi_heads: torchvision's ``RoIHeads`` with a mask head.
        supervision: how the mask head learns (``RoIMaskSupervision``).
        pixel_mean, pixel_std: per-channel normalisation of the input images (the channel order
            of ``INPUT.FORMAT``, 0-255).
        size_divisibility: the padded batch's sides are multiples of it.
        mask_threshold: probability threshold of the output masks.
        mask_aware_scores: rescore detections as BoxTeacher does (see ``mask_scores.py``).

    Attribute ``encode_masks``: as ``CondInst.encode_masks``.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        supervision: RoIMaskSupervision,
        pixel_mean: list[float],
        pixel_std: list[float],
        size_divisibility: int = 32,
        mask_threshold: float = 0.5,
        mask_aware_scores: bool = False,
    ):
        super().__init__()
        if not roi_heads.has_mask():
            raise ValueError("MaskRCNN needs RoI heads with a mask head.")
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.supervision = supervision
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility
        self.mask_threshold = mask_threshold
        self.mask_aware_scores = mask_aware_scores
        self.encode_masks: Callable[[torch.Tensor], list[Any]] | None = None

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(
        self, batched_inputs: list[dict], iteration: int | None = None
    ) -> dict[str, torch.Tensor] | list[dict]:
        """Training (``iteration``: the engine's iteration, required): the losses; evaluation:
        the detections (see ``meta_arch.py`` for both)."""
        if not self.training:
            return self.inference(batched_inputs)
        if iteration is None:
            raise ValueError(
                "A training forward needs the iteration (it drives the loss warm-ups): "
                "model(batch, iteration=t)."
            )
        return self.forward_train(batched_inputs, iteration)

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """(3, h, w) uint8 -> normalised float on the model's device."""
        return (image.to(self.device).float() - self.pixel_mean) / self.pixel_std

    def preprocess(
        self, batched_inputs: list[dict], key: str = "image"
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The normalised images ``key`` zero-padded into (B, 3, H, W), and their unpadded sizes."""
        return batch_images(
            [self.normalise(x[key]) for x in batched_inputs], self.size_divisibility
        )

    # ------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------
    def forward_train(self, batched_inputs: list[dict], iteration: int) -> dict[str, torch.Tensor]:
        """torchvision's RPN and box losses (``loss_objectness``, ``loss_rpn_box_reg``,
        ``loss_classifier``, ``loss_box_reg``) and the mask losses of ``supervision`` on the
        positive RoIs. The network sees ``aug_image`` when the data provides it."""
        with full_precision(self.device):
            images, sizes = self.preprocess(
                batched_inputs, "aug_image" if "aug_image" in batched_inputs[0] else "image"
            )
            gt = [self._instances_to_device(x) for x in batched_inputs]
        targets = [{"boxes": g["boxes"], "labels": g["labels"] + 1} for g in gt]  # 0: background
        with record_function("student: network"):
            features = self.backbone(images)
            proposals, losses = self.rpn(ImageList(images, sizes), features, targets)
            rois, matched, labels, regression_targets = self.sample_proposals(proposals, targets)
            heads = self.roi_heads
            class_logits, box_regression = heads.box_predictor(
                heads.box_head(heads.box_roi_pool(features, rois, sizes))
            )
            losses["loss_classifier"], losses["loss_box_reg"] = fastrcnn_loss(
                class_logits, box_regression, labels, regression_targets
            )
            # One host synchronisation per image, as torchvision's own.
            positive = [torch.nonzero(image_labels > 0)[:, 0] for image_labels in labels]
            positive_rois = [r[p] for r, p in zip(rois, positive)]
            mask_logits = heads.mask_predictor(
                heads.mask_head(heads.mask_roi_pool(features, positive_rois, sizes))
            )
        with record_function("student: mask losses"), full_precision(self.device):
            classes = torch.cat([image_labels[p] for image_labels, p in zip(labels, positive)])
            logits = mask_logits.float()[
                torch.arange(classes.numel(), device=classes.device), classes
            ]
            losses.update(
                self.supervision.losses(
                    logits,
                    torch.cat(positive_rois),
                    [image for image, p in enumerate(positive) for _ in range(p.numel())],
                    torch.cat([m[p] for m, p in zip(matched, positive)]),
                    gt,
                    [x["image"] for x in batched_inputs],
                    iteration,
                )
            )
        return losses

    def sample_proposals(
        self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """torchvision's ``RoIHeads.select_training_samples`` without its check for annotation
        masks (which box and pseudo-mask supervision do not have): per image the sampled RoIs
        (the ground-truth boxes among the candidates), the instance each RoI is matched to, its
        class (0: background) and the box regression targets."""
        heads = self.roi_heads
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        proposals = heads.add_gt_proposals(proposals, gt_boxes)
        matched, labels = heads.assign_targets_to_proposals(
            proposals, gt_boxes, [t["labels"] for t in targets]
        )
        sampled = heads.subsample(labels)
        proposals = [p[s] for p, s in zip(proposals, sampled)]
        matched = [m[s] for m, s in zip(matched, sampled)]
        labels = [c[s] for c, s in zip(labels, sampled)]
        matched_boxes = [
            (b if b.numel() else b.new_zeros((1, 4)))[m] for b, m in zip(gt_boxes, matched)
        ]
        return proposals, matched, labels, heads.box_coder.encode(matched_boxes, proposals)

    def _instances_to_device(self, sample: dict) -> dict[str, torch.Tensor]:
        instances = sample.get("instances")
        if instances is None:
            h, w = sample["image"].shape[-2:]
            return {
                "boxes": torch.zeros((0, 4), device=self.device),
                "labels": torch.zeros((0,), dtype=torch.int64, device=self.device),
                "masks": torch.zeros((0, h, w), dtype=torch.bool, device=self.device),
            }
        return {k: v.to(self.device) for k, v in instances.items()}

    # ------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(
        self, images: torch.Tensor, sizes: list[tuple[int, int]]
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image of a padded batch (unpadded ``sizes``) in the network input
        frame: ``boxes`` (M, 4), ``scores``, ``labels`` (M,) in 0..K-1 and the probabilities of
        the RoI masks ``mask_probs`` (M, S, S), best score first. In eval mode only (in train
        mode torchvision's heads sample proposals and need targets)."""
        features = self.backbone(images)
        proposals, _ = self.rpn(ImageList(images, sizes), features)
        detections, _ = self.roi_heads(features, proposals, sizes)
        return [
            {
                "boxes": d["boxes"],
                "scores": d["scores"],
                "labels": d["labels"] - 1,
                "mask_probs": d["masks"][:, 0],
            }
            for d in detections
        ]

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict]) -> list[dict]:
        """The detections of every image in its original frame (``height``, ``width``)."""
        images, sizes = self.preprocess(batched_inputs)
        results = []
        for det, size, sample in zip(self.detect(images, sizes), sizes, batched_inputs):
            output_size = (int(sample.get("height", size[0])), int(sample.get("width", size[1])))
            boxes = rescale_boxes(det["boxes"], size, output_size)
            keep = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[:, 0]
            boxes, probs = boxes[keep], det["mask_probs"][keep]
            masks, means = binarise_in_chunks(
                keep.numel(),
                lambda chunk: paste_roi_maps(probs[chunk], boxes[chunk], output_size),
                output_size,
                self.mask_threshold,
                PASTE_CHUNK_PIXELS,
                self.encode_masks,
                probs.device,
                probs.dtype,
            )
            scores = det["scores"][keep]
            if self.mask_aware_scores:
                scores = mask_aware_scores(scores, means)[0]
            results.append(
                {
                    "instances": {
                        "boxes": boxes,
                        "scores": scores,
                        "labels": det["labels"][keep],
                        "masks": masks,
                    }
                }
            )
        return results


class MaskRCNNTeacherView:
    """A Mask R-CNN seen as a teacher (the teacher protocol of ``teacher.py``): its detections of
    the clean views, each RoI mask pasted at the student's input size, ranked by the mask-aware
    score of the pasted probabilities. The detector runs in eval mode (torchvision's heads sample
    proposals in train mode), its own mode restored after.

    Args:
        detector: a ``MaskRCNN``.
        settings: the test size, mask threshold, detections kept, candidate pruning and score
            variants (``TeacherPass``).
    """

    def __init__(self, detector: MaskRCNN, settings: TeacherPass = TeacherPass()):
        self.detector = detector
        self.settings = settings

    @torch.no_grad()
    def forward_teacher(self, batched_inputs: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Per image ``boxes`` (M, 4) in the student frame, ranking ``scores`` and pseudo-mask
        weights ``mask_scores`` (mask-aware), the detector's ``detector_scores``, ``labels`` and
        ``mask_probs`` (M, h, w) at the sample's (student) input size."""
        detector, settings = self.detector, self.settings
        images = [detector.normalise(x["image"]) for x in batched_inputs]
        student_sizes = [tuple(im.shape[-2:]) for im in images]
        resized = [resize_to_test_size(im, settings.min_size, settings.max_size) for im in images]
        batch, sizes = batch_images(resized, detector.size_divisibility)
        with record_function("teacher: network"), eval_mode(detector):
            detections = [
                {k: v[: settings.post_nms_topk] for k, v in d.items()}
                for d in detector.detect(batch, sizes)
            ]
        with record_function("teacher: post-processing"), full_precision(detector.device):
            counts = [d["scores"].numel() for d in detections]
            merged = {k: torch.cat([d[k] for d in detections]) for k in detections[0]}
            merged["im_inds"] = torch.repeat_interleave(
                torch.arange(len(counts)), torch.tensor(counts)
            ).to(detector.device)
            merged["boxes"] = to_student_frame(
                merged["boxes"], merged["im_inds"], sizes, student_sizes
            )
            keep = (merged["boxes"][:, 2] > merged["boxes"][:, 0]) & (
                merged["boxes"][:, 3] > merged["boxes"][:, 1]
            )
            merged = {k: v[keep] for k, v in merged.items()}
            if settings.candidate_iou is not None and all("instances" in x for x in batched_inputs):
                merged = assignable_detections(
                    merged,
                    merged["boxes"],
                    [x["instances"]["boxes"] for x in batched_inputs],
                    settings.candidate_iou,
                )
            return self._outputs(merged, student_sizes)

    def _outputs(
        self, detections: dict[str, torch.Tensor], student_sizes: list[tuple[int, int]]
    ) -> list[dict[str, torch.Tensor]]:
        settings = self.settings
        threshold = -1.0 if settings.float_masks else settings.mask_threshold
        counts = torch.bincount(detections.pop("im_inds"), minlength=len(student_sizes)).tolist()
        fields = {k: v.split(counts) for k, v in detections.items()}
        outputs = []
        for i, size in enumerate(student_sizes):
            boxes = fields["boxes"][i]
            probs = paste_roi_maps(fields["mask_probs"][i].float(), boxes, size)
            if settings.clip_masks_to_boxes:
                rows, cols = inside_boxes(boxes, size)
                probs = probs * (rows[:, :, None] & cols[:, None, :])
            sums = foreground_sums(probs, threshold, boxes if settings.score_in_box else None)
            ranking, weights = mask_aware_scores(fields["scores"][i], mean_of_sums(*sums))
            outputs.append(
                {
                    "boxes": boxes,
                    "scores": ranking,
                    "mask_scores": weights,
                    "detector_scores": fields["scores"][i],
                    "labels": fields["labels"][i],
                    "mask_probs": probs,
                }
            )
        return outputs
