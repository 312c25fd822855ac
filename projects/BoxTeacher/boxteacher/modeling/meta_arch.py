"""CondInst, the one detector: what goes in, what comes out.

Data contract
-------------
Input: a list with one dict per image:

* ``image``: uint8 (3, H, W), resized, channel order of ``INPUT.FORMAT``;
* ``height``, ``width``: the original image size (inference results are returned at it);
* ``image_id`` (optional, for evaluation);
* ``instances`` (training): ``{"boxes": float32 (N, 4) XYXY absolute in the resized frame,
  "labels": int64 (N,) in 0..K-1, "masks": bool (N, H, W) (mask supervision only),
  "has_mask": bool (N,) (mixed supervision: which rows of ``masks`` are annotation masks),
  "pseudo_masks": (N, H, W) bool or float and "pseudo_weights": float (N,) (a teacher's pseudo
  masks), "ignore_boxes": float32 (K, 4) XYXY (regions whose background locations the
  classification loss leaves out: a teacher's uncertain detections)}``; ``aug_image``
  (optional): the student's view of ``image``, same geometry.

Training: ``model(batch, iteration=t)`` with the engine's (0-based) iteration, which drives the
loss warm-ups. Output: ``dict[str, Tensor]`` of 0-dim losses, already weighted, named as AdelaiDet
names them (``loss_fcos_cls``, ``loss_fcos_loc``, ``loss_fcos_ctr``, then the mask losses of the
criteria the detector is given: ``loss_mask`` for CondInst, ``loss_prj`` and ``loss_pairwise``
for BoxInst, ``loss_gt_mask`` for the masked instances of mixed supervision, ``loss_mask`` and
``loss_mask_affinity`` for BoxTeacher's pseudo masks; see ``criteria.py``). The engine sums the
keys that start with "loss"; any other key is a metric it only logs. A batch without objects
gives zero losses that are still connected to the graph.

Inference output: one dict per image, ``{"instances": {"boxes": (M, 4) XYXY, "scores": (M,),
"labels": (M,), "masks": bool (M, height, width)}}`` in the original frame (the masks encoded
when ``CondInst.encode_masks`` is set).

Inputs are never mutated. Normalisation constants are buffers (not saved in checkpoints).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.profiler import record_function

from .backbone import FPNBackbone
from .boxinst import box_mask_centers
from .condinst import DynamicMaskHead, MaskBranch, sample_top_per_object
from .fcos import FCOS, HeadOutputs
from .fcos_targets import mask_centers
from .layers import aligned_bilinear, batch_images, full_precision
from .mask_scores import mask_aware_scores
from .postprocess import detections_to_output_frame
from .supervision import MaskSupervision, TargetBatch

POSITIVE_CENTERS = ("masks", "box_masks", "boxes")


class CondInst(nn.Module):
    """CondInst (Tian et al., ECCV 2020): FCOS detects objects and, per detection, predicts the
    weights of a tiny mask head that runs on shared mask features. How the mask head learns is
    the ``supervision`` it is given: CondInst's Dice with masks, BoxInst's box terms, BoxTeacher's
    pseudo-mask terms, or a mix of them per instance (``supervision.py``, ``criteria.py``).

    Args:
        backbone: ResNet + FPN producing P3-P7.
        proposal_generator: FCOS (head, targets, losses, inference).
        mask_branch: shared mask features from P3-P5.
        mask_head: the dynamic mask head; the controller producing its parameters is built here.
        supervision: the mask criteria and how they are routed to the instances.
        positive_centers: FCOS samples positives around the centres of mass of the annotation
            "masks" (CondInst), of the "box_masks" (AdelaiDet's BoxInst), or around the centres
            of the "boxes" (BoxTeacher's student).
        pixel_mean, pixel_std: per-channel normalisation of the input images.
        fcos_in_features: backbone outputs the FCOS head reads (e.g. p3..p7).
        mask_out_stride: stride of the mask logits the losses see (4).
        max_proposals: if >= 0, train the mask head on at most this many random positives.
        topk_proposals_per_im: if >= 0, per image about this many positives, the best of every
            object (see ``sample_top_per_object``).
        mask_threshold: probability threshold of the output masks.
        mask_aware_scores: rescore detections as sqrt(score * mean foreground probability of
            the mask), as BoxTeacher does (for box and mask AP alike).

    Attribute ``encode_masks`` (None by default): a function from a chunk of output masks (c, H,
    W) bool to c encoded masks (e.g. COCO RLEs; an evaluator sets it while it runs, see
    ``DatasetEvaluator.encode_masks``). When set, inference returns the masks it encoded, a
    chunk of detections at a time, instead of an (M, H, W) bool tensor.
    """

    def __init__(
        self,
        *,
        backbone: FPNBackbone,
        proposal_generator: FCOS,
        mask_branch: MaskBranch,
        mask_head: DynamicMaskHead,
        supervision: MaskSupervision,
        positive_centers: str = "masks",
        pixel_mean: list[float],
        pixel_std: list[float],
        fcos_in_features: list[str],
        mask_out_stride: int = 4,
        max_proposals: int = -1,
        topk_proposals_per_im: int = -1,
        mask_threshold: float = 0.5,
        mask_aware_scores: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.mask_head = mask_head
        self.mask_branch = mask_branch
        self.supervision = supervision
        if positive_centers not in POSITIVE_CENTERS:
            raise ValueError(
                f"positive_centers must be one of {POSITIVE_CENTERS}, got {positive_centers!r}"
            )
        self.positive_centers = positive_centers
        head_channels = proposal_generator.fcos_head.cls_logits.in_channels
        self.controller = nn.Conv2d(head_channels, mask_head.num_gen_params, 3, padding=1)
        nn.init.normal_(self.controller.weight, std=0.01)
        nn.init.constant_(self.controller.bias, 0.0)
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

        self.fcos_in_features = list(fcos_in_features)
        self.mask_feat_stride = backbone.strides[mask_branch.in_features[0]]
        if self.mask_feat_stride % mask_out_stride:
            raise ValueError(
                f"Mask feature stride {self.mask_feat_stride} is not a multiple of the mask "
                f"output stride {mask_out_stride}"
            )
        self.mask_out_stride = mask_out_stride
        self.max_proposals = max_proposals
        self.topk_proposals_per_im = topk_proposals_per_im
        self.mask_threshold = mask_threshold
        self.mask_aware_scores = mask_aware_scores
        self.encode_masks: Callable[[torch.Tensor], list[Any]] | None = None

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(
        self, batched_inputs: list[dict], iteration: int | None = None, min_positives: float = 1.0
    ) -> dict[str, torch.Tensor] | list[dict]:
        """Training (``iteration``: the engine's iteration, required): the losses (FCOS's
        normalised by at least ``min_positives`` positive locations) and the metric
        ``num_fcos_positives`` (positive locations of the batch); evaluation: the detections."""
        if not self.training:
            return self.inference(batched_inputs)
        if iteration is None:
            raise ValueError(
                "A training forward needs the iteration (it drives the loss warm-ups): "
                "model(batch, iteration=t)."
            )
        return self.forward_train(batched_inputs, iteration, min_positives)

    # ------------------------------------------------------------------------------------
    # Shared steps
    # ------------------------------------------------------------------------------------
    def preprocess(
        self, batched_inputs: list[dict], key: str = "image"
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise ``batched_inputs[i][key]`` and zero-pad them into (B, 3, H, W); returns the
        batch and the unpadded sizes."""
        images = [
            (x[key].to(self.device).float() - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        return batch_images(images, self.backbone.size_divisibility)

    def run_heads(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, HeadOutputs, list[torch.Tensor], list[torch.Tensor]]:
        """Backbone, mask branch, FCOS head and controller on a (B, 3, H, W) batch.

        Returns mask features (B, C, H/8, W/8), the FCOS head outputs, the controller outputs
        (per level (B, num_gen_params, h, w)) and the locations of every level.
        """
        features = self.backbone(images)
        mask_feats = self.mask_branch(features)
        head_inputs = [features[f] for f in self.fcos_in_features]
        outputs = self.proposal_generator.fcos_head(head_inputs)
        top_feats = [self.controller(t) for t in outputs.bbox_towers]
        locations = self.proposal_generator.locations(head_inputs)
        return mask_feats, outputs, top_feats, locations

    def mask_logits(
        self, mask_feats: torch.Tensor, instances: dict[str, torch.Tensor], params_key: str
    ) -> torch.Tensor:
        """Dynamic-head logits (K, 1, H/4, W/4) at the mask output stride for K instances
        with ``im_inds``, ``locations``, ``fpn_levels`` and parameters ``instances[params_key]``;
        float32 also under autocast (the losses and the pseudo masks need it)."""
        logits = self.mask_head(
            mask_feats,
            self.mask_feat_stride,
            instances[params_key],
            instances["im_inds"],
            instances["locations"],
            instances["fpn_levels"],
        )
        return aligned_bilinear(logits.float(), self.mask_feat_stride // self.mask_out_stride)

    # ------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------
    def forward_train(
        self, batched_inputs: list[dict], iteration: int, min_positives: float = 1.0
    ) -> dict[str, torch.Tensor]:
        # The network trains on the student view ``aug_image`` when the data provides one;
        # ``image`` (the clean view) still feeds the targets computed from colours.
        with record_function("student: targets"), full_precision(self.device):
            images, sizes = self.preprocess(
                batched_inputs, "aug_image" if "aug_image" in batched_inputs[0] else "image"
            )
            gt = [self._instances_to_device(x) for x in batched_inputs]
            mask_targets = self.mask_targets(batched_inputs, gt, tuple(images.shape[-2:]), sizes)
            centers = self.centers_of_positives(gt, tuple(images.shape[-2:]))
        with record_function("student: network"):
            mask_feats, outputs, top_feats, locations = self.run_heads(images)
        with record_function("student: FCOS losses"):
            ignore_boxes = [g["ignore_boxes"] for g in gt] if "ignore_boxes" in gt[0] else None
            targets = self.proposal_generator.targets(
                locations,
                [g["boxes"] for g in gt],
                [g["labels"] for g in gt],
                centers,
                ignore_boxes,
            )
            losses, positives = self.proposal_generator.losses(
                outputs, targets, top_feats, min_positives
            )
            # The count is on the host already (``nonzero``): no synchronisation.
            losses["num_fcos_positives"] = torch.tensor(float(positives["pos_inds"].numel()))
        self.mask_head._iter += 1
        with record_function("student: mask losses"):
            sampled = self.sample_positives(positives)
            if sampled["gt_inds"].numel() == 0:
                losses.update(
                    self.supervision.zero_losses(self.zero_loss(mask_feats, sampled), mask_targets)
                )
            else:
                logits = self.mask_logits(mask_feats, sampled, "top_feats")
                losses.update(self.supervision.losses(logits, sampled, mask_targets, iteration))
        return losses

    def mask_targets(
        self,
        batched_inputs: list[dict],
        gt: list[dict[str, torch.Tensor]],
        padded_size: tuple[int, int],
        image_sizes: list[tuple[int, int]],
    ) -> dict:
        """The targets of the mask criteria (``MaskSupervision.targets``), built before the heads
        run, for the instances ``gt`` (on the device) of a batch padded to ``padded_size``."""
        batch = TargetBatch(
            batched_inputs,
            gt,
            tuple(padded_size),
            image_sizes,
            self.mask_out_stride,
            self.backbone.size_divisibility,
            self.device,
        )
        return self.supervision.targets(batch)

    def centers_of_positives(
        self, gt: list[dict[str, torch.Tensor]], padded_size: tuple[int, int]
    ) -> list[torch.Tensor | None]:
        """Per image the (N_i, 2) points FCOS samples each object's positives around (None: the
        box centres); see ``positive_centers``."""
        if self.positive_centers == "masks":
            return [mask_centers(g["masks"], g["boxes"]) for g in gt]
        if self.positive_centers == "box_masks":
            return [box_mask_centers(g["boxes"], padded_size) for g in gt]
        return [None] * len(gt)

    def _instances_to_device(self, sample: dict) -> dict[str, torch.Tensor]:
        instances = sample.get("instances")
        if instances is None:
            h, w = sample["image"].shape[-2:]
            return {
                "boxes": torch.zeros((0, 4), device=self.device),
                "labels": torch.zeros((0,), dtype=torch.int64, device=self.device),
                "masks": torch.zeros((0, h, w), dtype=torch.bool, device=self.device),
                "has_mask": torch.zeros((0,), dtype=torch.bool, device=self.device),
            }
        return {k: v.to(self.device) for k, v in instances.items()}

    def sample_positives(self, positives: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The positives the mask head is trained on (see MAX_PROPOSALS, TOPK_PROPOSALS_PER_IM)."""
        num = positives["gt_inds"].numel()
        if 0 <= self.max_proposals < num:
            keep = torch.randperm(num, device=self.device)[: self.max_proposals]
        elif self.topk_proposals_per_im >= 0:
            keep = sample_top_per_object(positives, self.topk_proposals_per_im)
        else:
            return positives
        return {k: v[keep] for k, v in positives.items()}

    @staticmethod
    def zero_loss(mask_feats: torch.Tensor, sampled: dict[str, torch.Tensor]) -> torch.Tensor:
        """0, connected to the mask branch and the controller (every parameter gets a gradient,
        as DDP requires, when a batch has no positive)."""
        return mask_feats.sum() * 0 + sampled["top_feats"].sum() * 0

    # ------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def inference(self, batched_inputs: list[dict]) -> list[dict]:
        images, sizes = self.preprocess(batched_inputs)
        detections = self.detect(images)
        results = []
        for det, size, sample in zip(detections, sizes, batched_inputs):
            output_size = (int(sample.get("height", size[0])), int(sample.get("width", size[1])))
            result = detections_to_output_frame(
                det,
                det["mask_probs"],
                self.mask_out_stride,
                size,
                output_size,
                self.mask_threshold,
                encode_masks=self.encode_masks,
            )
            if self.mask_aware_scores:
                result["scores"] = mask_aware_scores(result["scores"], result["mask_means"])[0]
            results.append(
                {"instances": {k: result[k] for k in ("boxes", "scores", "labels", "masks")}}
            )
        return results

    def detect(
        self, images: torch.Tensor, post_nms_topk: int | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image of a padded batch with their stride-4 mask probabilities
        (``mask_probs``: (M, 1, H/4, W/4)) in the network input frame."""
        return self.with_mask_probs(*self.detect_boxes(images, post_nms_topk))

    def detect_boxes(
        self, images: torch.Tensor, post_nms_topk: int | None = None
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """The mask features (B, C, H/8, W/8) of a padded batch and its FCOS detections per image
        (boxes, scores, labels, levels, locations and controller outputs ``top_feat``)."""
        mask_feats, outputs, top_feats, locations = self.run_heads(images)
        return mask_feats, self.proposal_generator.predict(
            outputs, locations, top_feats, post_nms_topk
        )

    def with_mask_probs(
        self, mask_feats: torch.Tensor, detections: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """The detections, each with the stride-4 mask probabilities of the dynamic mask head
        (``mask_probs``: (M, 1, H/4, W/4))."""
        counts = [d["scores"].numel() for d in detections]
        merged = {k: torch.cat([d[k] for d in detections]) for k in detections[0]}
        merged["im_inds"] = torch.repeat_interleave(
            torch.arange(len(counts), device=mask_feats.device),
            torch.tensor(counts, device=mask_feats.device),
        )
        probs = self.mask_logits(mask_feats, merged, "top_feat").sigmoid()
        return [dict(d, mask_probs=p) for d, p in zip(detections, probs.split(counts))]
