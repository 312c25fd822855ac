"""Where config keys meet model constructors: builders registered by the names the config uses.

``MODEL.BACKBONE.NAME`` selects a function of ``BACKBONE_REGISTRY`` and
``MODEL.META_ARCHITECTURE`` one of ``META_ARCH_REGISTRY``; each takes the config and returns a
module. Another detector plugs in by registering its own builder, with the ``ArchitectureSpec`` of
its data needs (``register_architecture``). This is the only module that knows architectures by
name: everything else reads ``architecture_spec(cfg)``.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar, Union

from fvcore.common.registry import Registry
from torch import nn

from .build_mask_rcnn import mask_rcnn_network, roi_supervision
from .build_pseudo_labels import (
    load_pretrained_teacher,
    pseudo_instance_filter,
    pseudo_labeler,
    teacher_pass,
)
from .config import ArchitectureSpec, CfgNode
from .config.supervision import gt_mask_mode
from .modeling import boxteacher
from .modeling.backbone import INITIALISATIONS, FPNBackbone, ResNet
from .modeling.condinst import DynamicMaskHead, MaskBranch
from .modeling.criteria import BoxInstCriterion, DiceMaskCriterion, PseudoMaskCriterion
from .modeling.fcos import FCOS, FCOSHead
from .modeling.layers import get_norm
from .modeling.mask_rcnn import MaskRCNN as MaskRCNNDetector
from .modeling.mask_rcnn import MaskRCNNTeacherView
from .modeling.meta_arch import CondInst as CondInstDetector
from .modeling.pairwise import neighbour_offsets
from .modeling.supervision import LossWeights, MaskSupervision, Route, SupervisionKind
from .modeling.teacher import TeacherProtocol, TeacherView
from .utils.env import resolve_device

logger = logging.getLogger(__name__)

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = (
    "Backbone builders: f(cfg) -> module with strides, out_channels, size_divisibility."
)
META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = "Model builders, registered under their MODEL.META_ARCHITECTURE name."

# An architecture's spec, or the function of the config that gives it.
SpecOrFunction = Union[ArchitectureSpec, Callable[[CfgNode], ArchitectureSpec]]
_Builder = TypeVar("_Builder", bound=Callable[[CfgNode], nn.Module])
# Specs by MODEL.META_ARCHITECTURE name; a builder registered without one gets ArchitectureSpec().
_ARCHITECTURE_SPECS: dict[str, SpecOrFunction] = {}


def register_architecture(
    spec: SpecOrFunction = ArchitectureSpec(),
) -> Callable[[_Builder], _Builder]:
    """Decorator: register a model builder in ``META_ARCH_REGISTRY`` under its function name (the
    ``MODEL.META_ARCHITECTURE`` value), with the ``ArchitectureSpec`` of its data needs, or a
    function ``cfg -> ArchitectureSpec`` when they depend on the config.

    A builder registered with ``META_ARCH_REGISTRY.register()`` alone (detectron2 style) gets the
    default spec: one mask-supervised network.
    """

    def register(builder: _Builder) -> _Builder:
        META_ARCH_REGISTRY.register(builder)  # raises on a name registered twice
        _ARCHITECTURE_SPECS[builder.__name__] = spec
        return builder

    return register


def _registered_builder(cfg: CfgNode) -> Callable[[CfgNode], nn.Module]:
    """The builder of ``MODEL.META_ARCHITECTURE``; KeyError naming the key if it is unknown."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCH_REGISTRY:
        raise KeyError(
            f"MODEL.META_ARCHITECTURE '{name}' is not registered; available: "
            f"{sorted(k for k, _ in META_ARCH_REGISTRY)}"
        )
    return META_ARCH_REGISTRY.get(name)


def architecture_spec(cfg: CfgNode) -> ArchitectureSpec:
    """The ``ArchitectureSpec`` of ``MODEL.META_ARCHITECTURE`` under ``cfg``.

    Raises KeyError naming the key for an unregistered architecture (as ``build_model``), and
    whatever the architecture's spec function raises for a config it cannot train.
    """
    _registered_builder(cfg)
    name = cfg.MODEL.META_ARCHITECTURE
    spec = _ARCHITECTURE_SPECS.get(name, ArchitectureSpec())
    spec = spec if isinstance(spec, ArchitectureSpec) else spec(cfg)
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(
            f"The spec function of architecture '{name}' returned {spec!r}, not an "
            "ArchitectureSpec."
        )
    return spec


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg: CfgNode) -> FPNBackbone:
    """ResNet + FPN with P6/P7 on P5, as AdelaiDet's builder of the same name."""
    r = cfg.MODEL.RESNETS
    if r.INIT not in INITIALISATIONS:
        raise ValueError(
            f"MODEL.RESNETS.INIT must be one of {list(INITIALISATIONS)}, got {r.INIT!r}"
        )
    bottom_up = ResNet(
        depth=r.DEPTH,
        norm=get_norm(r.NORM),
        out_features=tuple(r.OUT_FEATURES),
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
        num_groups=r.NUM_GROUPS,
        width_per_group=r.WIDTH_PER_GROUP,
        stride_in_1x1=r.STRIDE_IN_1X1,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        deform_on_per_stage=tuple(r.DEFORM_ON_PER_STAGE),
        deform_modulated=r.DEFORM_MODULATED,
        deform_num_groups=r.DEFORM_NUM_GROUPS,
        init=r.INIT,
    )
    return FPNBackbone(
        bottom_up,
        in_features=tuple(cfg.MODEL.FPN.IN_FEATURES),
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=get_norm(cfg.MODEL.FPN.NORM),
        top_levels=cfg.MODEL.FCOS.TOP_LEVELS,
    )


def build_backbone(cfg: CfgNode) -> nn.Module:
    return BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg)


def build_fcos(cfg: CfgNode, backbone: nn.Module) -> FCOS:
    f = cfg.MODEL.FCOS
    missing = [name for name in f.IN_FEATURES if name not in backbone.out_features]
    if missing:
        raise ValueError(
            f"MODEL.FCOS.IN_FEATURES {missing} are not produced by the backbone "
            f"(it produces {list(backbone.out_features)})"
        )
    strides = [backbone.strides[name] for name in f.IN_FEATURES]
    if list(f.FPN_STRIDES) != strides:
        raise ValueError(
            f"MODEL.FCOS.FPN_STRIDES {list(f.FPN_STRIDES)} disagree with the backbone strides "
            f"{strides}"
        )
    if f.NORM not in ("GN", "none"):
        raise ValueError(f"MODEL.FCOS.NORM must be 'GN' or 'none', got '{f.NORM}'")
    head = FCOSHead(
        in_channels=backbone.out_channels,
        num_classes=f.NUM_CLASSES,
        num_levels=len(f.IN_FEATURES),
        num_cls_convs=f.NUM_CLS_CONVS,
        num_box_convs=f.NUM_BOX_CONVS,
        use_group_norm=f.NORM == "GN",
        use_scale=f.USE_SCALE,
        prior_prob=f.PRIOR_PROB,
    )
    return FCOS(
        head,
        strides=strides,
        sizes_of_interest=list(f.SIZES_OF_INTEREST),
        center_sampling_radius=f.POS_RADIUS if f.CENTER_SAMPLE else None,
        focal_alpha=f.LOSS_ALPHA,
        focal_gamma=f.LOSS_GAMMA,
        loc_loss_type=f.LOC_LOSS_TYPE,
        thresh_with_ctr=f.THRESH_WITH_CTR,
        score_threshold=f.INFERENCE_TH_TEST,
        pre_nms_topk=f.PRE_NMS_TOPK_TEST,
        nms_threshold=f.NMS_TH,
        post_nms_topk=f.POST_NMS_TOPK_TEST,
    )


def _condinst_kwargs(cfg: CfgNode) -> dict:
    """Constructor arguments of CondInst from ``MODEL.*``."""
    c = cfg.MODEL.CONDINST
    backbone = build_backbone(cfg)
    fcos = build_fcos(cfg, backbone)
    sizes_of_interest = list(cfg.MODEL.FCOS.SIZES_OF_INTEREST)
    mask_branch = MaskBranch(
        in_features=list(c.MASK_BRANCH.IN_FEATURES),
        in_channels=backbone.out_channels,
        channels=c.MASK_BRANCH.CHANNELS,
        out_channels=c.MASK_BRANCH.OUT_CHANNELS,
        num_convs=c.MASK_BRANCH.NUM_CONVS,
        norm=get_norm(c.MASK_BRANCH.NORM),
    )
    mask_head = DynamicMaskHead(
        in_channels=c.MASK_BRANCH.OUT_CHANNELS,
        channels=c.MASK_HEAD.CHANNELS,
        num_layers=c.MASK_HEAD.NUM_LAYERS,
        sizes_of_interest=sizes_of_interest + [sizes_of_interest[-1] * 2],
        disable_rel_coords=c.MASK_HEAD.DISABLE_REL_COORDS,
    )
    return dict(
        backbone=backbone,
        proposal_generator=fcos,
        mask_branch=mask_branch,
        mask_head=mask_head,
        pixel_mean=list(cfg.MODEL.PIXEL_MEAN),
        pixel_std=list(cfg.MODEL.PIXEL_STD),
        fcos_in_features=list(cfg.MODEL.FCOS.IN_FEATURES),
        mask_out_stride=c.MASK_OUT_STRIDE,
        max_proposals=c.MAX_PROPOSALS,
        topk_proposals_per_im=c.TOPK_PROPOSALS_PER_IM,
        mask_threshold=c.MASK_THRESHOLD,
    )


def _supervision(cfg: CfgNode, pseudo_masks: bool) -> MaskSupervision:
    """The mask supervision of a box-supervised network (``MODEL.BOXINST.*``): BoxInst's box terms,
    the Dice of the annotation masks in mixed supervision (``MODEL.BOXINST.GT_MASKS``), and with
    ``pseudo_masks`` BoxTeacher's pseudo-mask terms (``MODEL.BOX_TEACHER.*``)."""
    b, t = cfg.MODEL.BOXINST, cfg.MODEL.BOX_TEACHER
    mixed = gt_mask_mode(cfg, architecture_spec(cfg)) != "ignore"
    offsets = neighbour_offsets(b.PAIRWISE.SIZE, b.PAIRWISE.DILATION)
    box_kinds = {SupervisionKind.BOX} | ({SupervisionKind.PSEUDO_MASK} if pseudo_masks else set())
    kinds = frozenset(box_kinds | ({SupervisionKind.MASK} if mixed else set()))
    box = BoxInstCriterion(
        bottom_pixels_removed=b.BOTTOM_PIXELS_REMOVED,
        pairwise_offsets=offsets,
        pairwise_color_thresh=b.PAIRWISE.COLOR_THRESH,
        input_format=cfg.INPUT.FORMAT,
    )
    routes = [Route(box, kinds if b.BOX_TERMS_ON_MASKED else frozenset(box_kinds))]
    if mixed:
        dice = DiceMaskCriterion("loss_gt_mask", optional=True)  # unlabelled images have none
        routes.append(Route(dice, frozenset({SupervisionKind.MASK})))
    weights, warmups = {}, {"loss_pairwise": b.PAIRWISE.WARMUP_ITERS}
    if pseudo_masks:
        mean_projection = t.WITH_AVG_LOSS and t.AVG_LOSS_WEIGHT > 0
        pseudo = PseudoMaskCriterion(
            pairwise_offsets=offsets,
            bottom_pixels_removed=b.BOTTOM_PIXELS_REMOVED,
            affinity_threshold=t.MASK_AFFINITY_THRESH,
            fix_reduction=t.FIX_REDUCTION,
            mean_projection=mean_projection,
            mask_threshold=None if t.SOFT_PSEUDO_MASKS else t.TEACHER_MASK_THRESHOLD,
        )
        routes.append(Route(pseudo, kinds))
        weights = {"loss_mask": t.MASK_WEIGHT, "loss_mask_affinity": t.MASK_AFFINITY_WEIGHT}
        if mean_projection:
            weights["loss_avg"] = t.AVG_LOSS_WEIGHT
        if t.WITH_WARMUP:
            warmups.update({name: t.WARMUP_ITERS for name in pseudo.loss_names})
    warmups = {name: iters for name, iters in warmups.items() if iters > 0}
    return MaskSupervision(routes, kinds, LossWeights(weights, warmups), offsets)


def _condinst_spec(cfg: CfgNode) -> ArchitectureSpec:
    """CondInst learns from masks; with ``MODEL.BOXINST.ENABLED`` (BoxInst) from boxes."""
    return ArchitectureSpec(box_supervised=bool(cfg.MODEL.BOXINST.ENABLED))


@register_architecture(_condinst_spec)
def CondInst(cfg: CfgNode) -> CondInstDetector:  # noqa: N802 (registered under its config name)
    """CondInst from ``MODEL.*``: trained with annotation masks, or from boxes (BoxInst) when
    ``MODEL.BOXINST.ENABLED``."""
    if not cfg.MODEL.BOXINST.ENABLED:
        masks = MaskSupervision(
            [Route(DiceMaskCriterion(), frozenset({SupervisionKind.MASK}))],
            frozenset({SupervisionKind.MASK}),
        )
        return CondInstDetector(
            supervision=masks, positive_centers="masks", **_condinst_kwargs(cfg)
        )
    return CondInstDetector(
        supervision=_supervision(cfg, pseudo_masks=False),
        positive_centers="box_masks",
        **_condinst_kwargs(cfg),
    )


def _boxteacher_network(cfg: CfgNode) -> CondInstDetector:
    """One of BoxTeacher's two identical networks: CondInst with BoxInst's and the pseudo-mask
    criteria, FCOS positives around box centres, and mask-aware scores."""
    return CondInstDetector(
        supervision=_supervision(cfg, pseudo_masks=True),
        positive_centers="boxes",
        mask_aware_scores=True,
        **_condinst_kwargs(cfg),
    )


def _boxteacher_spec(cfg: CfgNode) -> ArchitectureSpec:
    """A teacher and a box-supervised student trained on its own view. ValueError naming
    ``MODEL.BOXINST.ENABLED`` when it is False: the student is always BoxInst."""
    if not cfg.MODEL.BOXINST.ENABLED:
        raise ValueError(
            "MODEL.BOXINST.ENABLED must be True with MODEL.META_ARCHITECTURE BoxTeacher: "
            "BoxTeacher's "
            "student is BoxInst, trained from boxes (and the teacher's pseudo masks), never from "
            "mask annotations alone."
        )
    return ArchitectureSpec(
        box_supervised=True,
        student_view=True,
        teacher_student=True,
        ema_teacher=not cfg.MODEL.BOX_TEACHER.TEACHER_CONFIG,
        # Ignore regions and pseudo instances are CondInst's; Mask R-CNN takes neither.
        unlabeled_images=cfg.MODEL.BOX_TEACHER.STUDENT == "CondInst",
    )


@register_architecture(_boxteacher_spec)
def BoxTeacher(cfg: CfgNode) -> boxteacher.BoxTeacher:  # noqa: N802 (registered under its config name)
    """BoxTeacher: a teacher and a student network built alike (teacher first, as the release)."""
    return _boxteacher(cfg)


def _boxteacher(cfg: CfgNode, teacher_eval_mode: bool | None = None) -> boxteacher.BoxTeacher:
    t = cfg.MODEL.BOX_TEACHER
    key, name = _trained_network(cfg)
    network, view = _boxteacher_network_kind(cfg, key, name)
    if t.TEACHER_CONFIG:
        teacher, teacher_view = _frozen_teacher(cfg)
    else:
        teacher = network(cfg)  # first, as the release: the same initialisations from a seed
        teacher_view = view(teacher, teacher_pass(cfg))
    pretrained = load_pretrained_teacher(cfg, teacher)
    student = network(cfg)
    frozen = bool(t.TEACHER_CONFIG)
    if teacher_eval_mode is None:
        teacher_eval_mode = t.TEACHER_EVAL or name in _EVAL_MODE_TEACHERS
    return boxteacher.BoxTeacher(
        student,
        teacher,
        teacher_view=teacher_view,
        labeler=pseudo_labeler(cfg),
        teacher_eval_mode=frozen or teacher_eval_mode,
        use_teacher_inference=t.USE_TEACHER_INFERENCE and not frozen,
        frozen_teacher=frozen,
        unlabeled=pseudo_instance_filter(cfg) if cfg.DATASETS.UNLABELED else None,
        unlabeled_weight=cfg.MODEL.SEMI.UNLABELED_WEIGHT,
        # A pre-trained teacher is worth learning from at once.
        unlabeled_start_iter=0 if pretrained else t.WARMUP_ITERS,
        pretrained_teacher=pretrained,
    )


def _trained_network(cfg: CfgNode) -> tuple[str, str]:
    """The key naming the network a config trains, and its value: ``MODEL.BOX_TEACHER.STUDENT``
    for BoxTeacher, otherwise the architecture (CondInst, also as BoxInst, or MaskRCNN)."""
    if cfg.MODEL.META_ARCHITECTURE == "BoxTeacher":
        return "MODEL.BOX_TEACHER.STUDENT", cfg.MODEL.BOX_TEACHER.STUDENT
    return "MODEL.META_ARCHITECTURE", cfg.MODEL.META_ARCHITECTURE


def _boxteacher_network_kind(
    cfg: CfgNode, key: str, name: str
) -> tuple[Callable[[CfgNode], nn.Module], Callable]:
    """The network builder and teacher view of a BoxTeacher network named ``name`` (the value of
    ``key``); ValueError naming the key for another name."""
    if name not in _BOXTEACHER_NETWORKS:
        raise ValueError(f"{key} must be one of {sorted(_BOXTEACHER_NETWORKS)}, got {name!r}")
    return _BOXTEACHER_NETWORKS[name]


def _frozen_teacher(cfg: CfgNode) -> tuple[nn.Module, TeacherProtocol]:
    """The network of ``MODEL.BOX_TEACHER.TEACHER_CONFIG`` (a CondInst / BoxInst, BoxTeacher or
    MaskRCNN config: the detector it trains) with the weights of ``TEACHER_WEIGHTS``, and its
    teacher view with this config's teacher pass."""
    from .config import load_config
    from .engine.checkpoint import load_model_weights
    from .engine.weight_files import read_model_weights

    t = cfg.MODEL.BOX_TEACHER
    if not t.TEACHER_WEIGHTS:
        raise ValueError(
            f"MODEL.BOX_TEACHER.TEACHER_WEIGHTS is empty: the frozen teacher of TEACHER_CONFIG "
            f"'{t.TEACHER_CONFIG}' needs the weights of a trained network."
        )
    teacher_cfg = load_config(t.TEACHER_CONFIG, ["MODEL.DEVICE", cfg.MODEL.DEVICE])
    key, name = _trained_network(teacher_cfg)
    network, view = _boxteacher_network_kind(teacher_cfg, f"{key} of '{t.TEACHER_CONFIG}'", name)
    teacher = network(teacher_cfg)
    load_model_weights(teacher, read_model_weights(t.TEACHER_WEIGHTS), t.TEACHER_WEIGHTS)
    return teacher, view(teacher, teacher_pass(cfg))


def _boxteacher_mask_rcnn(cfg: CfgNode) -> MaskRCNNDetector:
    """A Mask R-CNN of BoxTeacher: pseudo masks and box terms, mask-aware scores."""
    return mask_rcnn_network(
        cfg, roi_supervision(cfg, "pseudo_masks", box_terms=True), mask_aware_scores=True
    )


# The networks BoxTeacher's student (and its EMA teacher) can be, with their teacher views.
_BOXTEACHER_NETWORKS = {
    "CondInst": (_boxteacher_network, TeacherView),
    "MaskRCNN": (_boxteacher_mask_rcnn, MaskRCNNTeacherView),
}
# The networks whose teacher pass runs in eval mode whatever MODEL.BOX_TEACHER.TEACHER_EVAL says
# (torchvision's heads sample proposals in train mode): their EMA averages the BN statistics too.
_EVAL_MODE_TEACHERS = {"MaskRCNN"}


@register_architecture(_condinst_spec)
def MaskRCNN(cfg: CfgNode) -> MaskRCNNDetector:  # noqa: N802 (registered under its config name)
    """torchvision's Mask R-CNN from ``MODEL.*``, trained with annotation masks or, with
    ``MODEL.BOXINST.ENABLED``, from boxes (BoxInst's terms on the RoI grid; the annotation
    masks too in mixed supervision)."""
    if not cfg.MODEL.BOXINST.ENABLED:
        return mask_rcnn_network(cfg, roi_supervision(cfg, "masks", box_terms=False))
    mixed = gt_mask_mode(cfg, architecture_spec(cfg)) != "ignore"
    return mask_rcnn_network(cfg, roi_supervision(cfg, "masks" if mixed else None, box_terms=True))


def build_pseudo_labelling_model(cfg: CfgNode) -> boxteacher.BoxTeacher:
    """The BoxTeacher of ``cfg``'s networks, whether ``cfg`` is a BoxTeacher config or one of a
    single network (CondInst / BoxInst or MaskRCNN, whose checkpoint then loads into the student
    and the teacher alike): the pseudo-mask export labels through ``BoxTeacher.pseudo_label`` as
    training does, with the teacher in eval mode (the labels of an image do not depend on the
    other images of its batch). On ``MODEL.DEVICE``."""
    model = _boxteacher(cfg, teacher_eval_mode=True)
    model.to(resolve_device(cfg.MODEL.DEVICE))
    return model


def method_name(cfg: CfgNode) -> str:
    """The method ``cfg`` trains, for tables and logs: "BoxInst" for CondInst with
    ``MODEL.BOXINST.ENABLED``, else ``MODEL.META_ARCHITECTURE``."""
    name = cfg.MODEL.META_ARCHITECTURE
    return "BoxInst" if name == "CondInst" and cfg.MODEL.BOXINST.ENABLED else name


def build_model(cfg: CfgNode) -> nn.Module:
    """The model named by ``MODEL.META_ARCHITECTURE``, on ``MODEL.DEVICE``. The supervision keys
    (``MODEL.BOXINST.GT_MASKS``) are checked against the architecture's spec first."""
    name = cfg.MODEL.META_ARCHITECTURE
    gt_mask_mode(cfg, architecture_spec(cfg))
    model = _registered_builder(cfg)(cfg)
    model.to(resolve_device(cfg.MODEL.DEVICE))
    num_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Built %s: %s parameters (%s trainable)", name, f"{num_params:,}", f"{trainable:,}")
    return model
