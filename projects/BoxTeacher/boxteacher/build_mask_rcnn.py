"""Torchvision's Mask R-CNN built from this project's config keys (``MODEL.RESNETS``, ``FPN``,
``RPN``, ``ROI_HEADS``, ``ROI_BOX_HEAD``, ``ROI_MASK_HEAD``, ``BOXINST``, ``BOX_TEACHER``): the
network and its mask losses. ``build.py`` registers the architectures that use them."""

from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import CfgNode
from .modeling.mask_rcnn import MaskRCNN
from .modeling.pairwise import neighbour_offsets
from .modeling.roi_masks import RoIMaskSupervision
from .modeling.supervision import LossWeights


def torchvision_backbone(cfg: CfgNode, fpn_norm: Callable[[int], nn.Module] | None) -> nn.Module:
    """torchvision's ResNet (``MODEL.RESNETS.DEPTH``, ``NORM``; the stages below
    ``MODEL.BACKBONE.FREEZE_AT`` frozen, as detectron2 counts them) with an FPN of
    ``MODEL.FPN.OUT_CHANNELS`` channels on its four stages and a max-pooled fifth level."""
    r = cfg.MODEL.RESNETS
    norms = {"FrozenBN": FrozenBatchNorm2d, "BN": nn.BatchNorm2d}
    if r.NORM not in norms or r.DEPTH not in (18, 34, 50, 101, 152):
        raise ValueError(
            f"Mask R-CNN's torchvision ResNet takes MODEL.RESNETS.NORM in {sorted(norms)} and "
            "DEPTH in "
            f"(18, 34, 50, 101, 152), got {r.NORM!r} and {r.DEPTH}"
        )
    widths = (r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.NUM_GROUPS, r.WIDTH_PER_GROUP)
    standard = (64, 64 if r.DEPTH < 50 else 256, 1, 64)
    if widths != standard or any(r.DEFORM_ON_PER_STAGE) or (r.DEPTH >= 50 and r.STRIDE_IN_1X1):
        raise ValueError(
            "Mask R-CNN's torchvision ResNet has the standard widths: "
            "MODEL.RESNETS.STEM_OUT_CHANNELS, "
            f"RES2_OUT_CHANNELS, NUM_GROUPS, WIDTH_PER_GROUP must be {standard} at depth "
            f"{r.DEPTH} (got "
            f"{widths}), DEFORM_ON_PER_STAGE all False, and STRIDE_IN_1X1 False at depth >= 50 "
            "(its "
            "stride is in the 3x3 convolution)."
        )
    body = getattr(torchvision.models, f"resnet{r.DEPTH}")(weights=None, norm_layer=norms[r.NORM])
    # detectron2's FREEZE_AT: 0 nothing, 1 the stem, k >= 2 the stem and stages res2..res<k>.
    frozen = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")[
        : min(cfg.MODEL.BACKBONE.FREEZE_AT, 5) + 1
    ]
    for name, parameter in body.named_parameters():
        if cfg.MODEL.BACKBONE.FREEZE_AT > 0 and name.split(".")[0] in frozen:
            parameter.requires_grad_(False)
    stage2 = body.inplanes // 8
    return BackboneWithFPN(
        body,
        {f"layer{k}": str(k - 1) for k in range(1, 5)},
        [stage2 * 2**k for k in range(4)],
        cfg.MODEL.FPN.OUT_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=fpn_norm,
    )


def mask_rcnn_network(
    cfg: CfgNode, supervision: RoIMaskSupervision, mask_aware_scores: bool = False
) -> MaskRCNN:
    """torchvision's Mask R-CNN (``MODEL.MASK_RCNN.VERSION`` 1 or 2, the heads of
    ``maskrcnn_resnet50_fpn`` or of its v2) under the project's data contract."""
    version = cfg.MODEL.MASK_RCNN.VERSION
    if version not in (1, 2):
        raise ValueError(f"MODEL.MASK_RCNN.VERSION must be 1 or 2, got {version!r}")
    channels, classes = cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.FCOS.NUM_CLASSES + 1
    conv_dim, fc_dim = cfg.MODEL.ROI_MASK_HEAD.CONV_DIM, cfg.MODEL.ROI_BOX_HEAD.FC_DIM
    norm = nn.BatchNorm2d if version == 2 else None
    backbone = torchvision_backbone(cfg, norm)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    heads = dict(
        rpn_head=RPNHead(channels, 3, conv_depth=2 if version == 2 else 1),
        box_head=(
            FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [fc_dim], norm_layer=norm)
            if version == 2
            else TwoMLPHead(channels * 49, fc_dim)
        ),
        box_predictor=FastRCNNPredictor(fc_dim, classes),
        mask_head=MaskRCNNHeads(channels, [conv_dim] * 4, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(conv_dim, conv_dim, classes),
    )
    rh, rpn = cfg.MODEL.ROI_HEADS, cfg.MODEL.RPN
    network = torchvision.models.detection.MaskRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        rpn_post_nms_top_n_train=rpn.POST_NMS_TOPK_TRAIN,
        rpn_post_nms_top_n_test=rpn.POST_NMS_TOPK_TEST,
        rpn_pre_nms_top_n_train=rpn.POST_NMS_TOPK_TRAIN,
        rpn_pre_nms_top_n_test=rpn.POST_NMS_TOPK_TEST,
        box_score_thresh=rh.SCORE_THRESH_TEST,
        box_nms_thresh=rh.NMS_THRESH_TEST,
        box_detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
        box_batch_size_per_image=rh.BATCH_SIZE_PER_IMAGE,
        box_positive_fraction=rh.POSITIVE_FRACTION,
        **heads,
    )
    return MaskRCNN(
        backbone=network.backbone,
        rpn=network.rpn,
        roi_heads=network.roi_heads,
        supervision=supervision,
        pixel_mean=list(cfg.MODEL.PIXEL_MEAN),
        pixel_std=list(cfg.MODEL.PIXEL_STD),
        mask_threshold=cfg.MODEL.CONDINST.MASK_THRESHOLD,
        mask_aware_scores=mask_aware_scores,
    )


def roi_supervision(cfg: CfgNode, mask_key: str | None, box_terms: bool) -> RoIMaskSupervision:
    """A Mask R-CNN's mask losses: annotation or pseudo masks (``mask_key``), and BoxInst's terms
    on the RoI grid (``box_terms``, with ``MODEL.BOXINST.PAIRWISE.*``); the pseudo-mask terms
    weighted as BoxTeacher's (``MODEL.BOX_TEACHER.*``)."""
    b, t = cfg.MODEL.BOXINST, cfg.MODEL.BOX_TEACHER
    pseudo = mask_key == "pseudo_masks"
    weights, warmups = {}, {}
    if box_terms and b.PAIRWISE.WARMUP_ITERS > 0:
        warmups["loss_pairwise"] = b.PAIRWISE.WARMUP_ITERS
    if pseudo:
        weights = {"loss_mask": t.MASK_WEIGHT, "loss_mask_affinity": t.MASK_AFFINITY_WEIGHT}
        if t.WITH_WARMUP and t.WARMUP_ITERS > 0:
            warmups.update({"loss_mask": t.WARMUP_ITERS, "loss_mask_affinity": t.WARMUP_ITERS})
    return RoIMaskSupervision(
        mask_key=mask_key,
        box_terms=box_terms,
        pairwise_offsets=tuple(neighbour_offsets(b.PAIRWISE.SIZE, b.PAIRWISE.DILATION)),
        pairwise_color_thresh=b.PAIRWISE.COLOR_THRESH,
        affinity_threshold=t.MASK_AFFINITY_THRESH if pseudo else None,
        input_format=cfg.INPUT.FORMAT,
        weights=LossWeights(weights, warmups),
    )
