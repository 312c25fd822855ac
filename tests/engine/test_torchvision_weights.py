"""torchvision weights through ``read_model_weights`` + ``load_model_weights``: Mask R-CNN state
dicts (today's and older torchvision names, other numbers of classes) and ImageNet ResNets loaded
into the ResNet of a torchvision detection backbone (``backbone.body.``)."""

import logging
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from boxteacher.engine.checkpoint import MultiNetworkCheckpointing, load_model_weights
from boxteacher.engine.weight_files import (
    CheckpointError,
    read_model_weights,
    torchvision_legacy_to_current_name,
)

LOGGER = "boxteacher.engine.checkpoint"
CLASS_DEPENDENT = {
    f"roi_heads.{module}.{kind}"
    for module in (
        "box_predictor.cls_score",
        "box_predictor.bbox_pred",
        "mask_predictor.mask_fcn_logits",
    )
    for kind in ("weight", "bias")
}


def _mask_rcnn(num_classes: int = 5, builder=maskrcnn_resnet50_fpn) -> nn.Module:
    return builder(weights=None, weights_backbone=None, num_classes=num_classes)


class _StudentTeacher(nn.Module):
    """Two Mask R-CNNs (``MultiNetworkCheckpointing``): one-network weights load into
    ``student``."""

    single_network_prefix = "student."

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.student, self.teacher = _mask_rcnn(num_classes), _mask_rcnn(num_classes)
        self.loaded: list[str] = []

    def on_weights_loaded(self, loaded_keys: list[str]) -> None:
        self.loaded = list(loaded_keys)


def _shifted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with 1 added to its floating-point tensors, so that loaded values are told apart
    from an initialisation."""
    return {k: v + 1 if v.is_floating_point() else v.clone() for k, v in state.items()}


def _load(model: nn.Module, state: dict, path) -> tuple[list[str], list[str]]:
    torch.save(state, path)
    return load_model_weights(model, read_model_weights(str(path)), str(path))


def _legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` named as older torchvision saved it (COCO ``maskrcnn_resnet50_fpn`` files)."""
    return {
        re.sub(r"(inner_blocks|layer_blocks)\.(\d+)\.0\.", r"\1.\2.", k).replace(
            "rpn.head.conv.0.0.", "rpn.head.conv."
        ): v
        for k, v in state.items()
    }


def _assert_holds(
    model_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str = ""
) -> None:
    different = [k for k, v in expected.items() if not torch.equal(model_state[prefix + k], v)]
    assert different == []


@pytest.mark.parametrize(
    "legacy, current",
    [
        ("backbone.fpn.inner_blocks.0.weight", "backbone.fpn.inner_blocks.0.0.weight"),
        ("backbone.fpn.layer_blocks.3.bias", "backbone.fpn.layer_blocks.3.0.bias"),
        ("rpn.head.conv.weight", "rpn.head.conv.0.0.weight"),
        ("teacher.rpn.head.conv.bias", "teacher.rpn.head.conv.0.0.bias"),
        ("backbone.fpn.inner_blocks.0.0.weight", "backbone.fpn.inner_blocks.0.0.weight"),
        (
            "backbone.fpn.inner_blocks.0.1.running_mean",
            "backbone.fpn.inner_blocks.0.1.running_mean",
        ),
        ("rpn.head.conv.1.0.weight", "rpn.head.conv.1.0.weight"),
        ("rpn.head.cls_logits.weight", "rpn.head.cls_logits.weight"),
    ],
)
def test_older_torchvision_names_get_todays_names(legacy, current):
    assert torchvision_legacy_to_current_name(legacy) == current


@pytest.mark.parametrize(
    "builder", [maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2], ids=["v1", "v2"]
)
def test_mask_rcnn_state_dict_loads_fully(tmp_path, builder):
    state = _shifted(_mask_rcnn(builder=builder).state_dict())
    model = _mask_rcnn(builder=builder)
    missing, unexpected = _load(model, state, tmp_path / "mask_rcnn.pth")
    assert missing == [] and unexpected == []
    _assert_holds(model.state_dict(), state)


def test_mask_rcnn_saved_by_older_torchvision_loads_fully(tmp_path):
    state = _shifted(_mask_rcnn().state_dict())
    legacy = _legacy_names(state)
    assert "rpn.head.conv.weight" in legacy and "backbone.fpn.inner_blocks.0.weight" in legacy
    model = _mask_rcnn()
    missing, unexpected = _load(model, legacy, tmp_path / "maskrcnn_resnet50_fpn_coco.pth")
    assert missing == [] and unexpected == []
    _assert_holds(model.state_dict(), state)


def test_other_number_of_classes_skips_only_the_class_dependent_tensors(tmp_path, caplog):
    coco = _shifted(_mask_rcnn(num_classes=91).state_dict())
    model = _mask_rcnn(num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items() if k in CLASS_DEPENDENT}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        missing, unexpected = _load(model, coco, tmp_path / "coco.pth")
    assert set(re.findall(r"Skip loading '([^']+)'", caplog.text)) == CLASS_DEPENDENT
    assert set(missing) == CLASS_DEPENDENT and unexpected == []
    _assert_holds(model.state_dict(), before)
    _assert_holds(model.state_dict(), {k: v for k, v in coco.items() if k not in CLASS_DEPENDENT})


def test_coco_mask_rcnn_of_older_torchvision_loads_into_the_student(tmp_path):
    coco = _shifted(_mask_rcnn(num_classes=91).state_dict())
    model = _StudentTeacher(num_classes=5)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    missing, unexpected = _load(model, _legacy_names(coco), tmp_path / "coco.pth")
    assert set(missing) == {f"student.{k}" for k in CLASS_DEPENDENT} and unexpected == []
    assert set(model.loaded) == {f"student.{k}" for k in coco if k not in CLASS_DEPENDENT}
    _assert_holds(
        model.state_dict(), {k: v for k, v in coco.items() if k not in CLASS_DEPENDENT}, "student."
    )
    _assert_holds(model.teacher.state_dict(), teacher_before)


@pytest.mark.parametrize("student_teacher", [False, True], ids=["mask_rcnn", "student_teacher"])
def test_imagenet_resnet_loads_into_the_torchvision_backbone(tmp_path, student_teacher):
    resnet = _shifted(torchvision.models.resnet50().state_dict())
    model = _StudentTeacher() if student_teacher else _mask_rcnn()
    prefix = "student." if student_teacher else ""
    assert isinstance(model, MultiNetworkCheckpointing) == student_teacher
    fpn_before = model.state_dict()[f"{prefix}backbone.fpn.inner_blocks.0.0.weight"].clone()
    missing, unexpected = _load(model, resnet, tmp_path / "resnet50-0676ba61.pth")
    body = {k: v for k, v in resnet.items() if not k.startswith("fc.")}
    _assert_holds(model.state_dict(), body, f"{prefix}backbone.body.")
    assert unexpected == [] and not any(k.startswith(f"{prefix}backbone.body.") for k in missing)
    assert torch.equal(
        model.state_dict()[f"{prefix}backbone.fpn.inner_blocks.0.0.weight"], fpn_before
    )
    if student_teacher:
        assert set(model.loaded) == {f"student.backbone.body.{k}" for k in body}


def _caffe2_resnet_blobs(resnet: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torchvision ResNet state dict as the Caffe2 blobs of detectron2's ``R-50.pkl`` (affine
    norm parameters only, with the ``fc1000`` classifier)."""
    stem = {
        "conv1.weight": "conv1_w",
        "bn1.weight": "res_conv1_bn_s",
        "bn1.bias": "res_conv1_bn_b",
        "fc.weight": "fc1000_w",
        "fc.bias": "fc1000_b",
    }
    kinds = {"weight": "s", "bias": "b"}
    blobs = {}
    for key, value in resnet.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        if key in stem:
            blobs[stem[key]] = value.numpy()
            continue
        layer, block, module, *rest = key.split(".")
        if module == "downsample":
            branch, kind = ("branch1", "w") if rest[0] == "0" else ("branch1_bn", kinds[rest[1]])
        elif module.startswith("bn"):
            branch, kind = f"branch2{'abc'[int(module[2:]) - 1]}_bn", kinds[rest[0]]
        else:
            branch, kind = f"branch2{'abc'[int(module[4:]) - 1]}", "w"
        blobs[f"res{int(layer[len('layer') :]) + 1}_{block}_{branch}_{kind}"] = value.numpy()
    return blobs


def test_detectron2_imagenet_pickle_loads_into_the_torchvision_backbone(tmp_path):
    resnet = _shifted(torchvision.models.resnet50().state_dict())
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(_caffe2_resnet_blobs(resnet), f, protocol=2)
    model = _StudentTeacher()
    load_model_weights(model, read_model_weights(str(path)), str(path))
    affine = {
        k: v
        for k, v in resnet.items()
        if k.endswith(("weight", "bias")) and not k.startswith("fc.")
    }
    _assert_holds(model.state_dict(), affine, "student.backbone.body.")
    assert set(model.loaded) == {f"student.backbone.body.{k}" for k in affine}


def test_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "pickled_module.pth"
    torch.save(torchvision.models.resnet18(), path)
    with pytest.raises(CheckpointError, match="(?s)arbitrary code.*--trust-pickle"):
        read_model_weights(str(path))
