"""MODEL.WEIGHTS files: detectron2:// names, safe Caffe2 pickles, torchvision and detectron2
parameter names."""

import io
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from boxteacher.build import build_model
from boxteacher.config import load_config
from boxteacher.engine import Checkpointer, load_model_weights
from boxteacher.engine.weight_files import (
    CheckpointError,
    caffe2_to_detectron2_name,
    convert_weight_file,
    detectron2_to_project_name,
    read_model_weights,
    resolve_weights_path,
)

from tiny_models import REPO, tiny_cfg


@pytest.mark.parametrize(
    "caffe2, detectron2",
    [
        ("res2_0_branch2a_w", "res2.0.conv1.weight"),
        ("res2_0_branch2a_bn_s", "res2.0.conv1.norm.weight"),
        ("res3_1_branch2c_bn_b", "res3.1.conv3.norm.bias"),
        ("res4_0_branch1_w", "res4.0.shortcut.weight"),
        ("res_conv1_bn_b", "stem.conv1.norm.bias"),
        ("conv1_w", "stem.conv1.weight"),
        ("fc1000_w", "fc1000.weight"),
    ],
)
def test_caffe2_names(caffe2, detectron2):
    assert caffe2_to_detectron2_name(caffe2) == detectron2


@pytest.mark.parametrize(
    "detectron2, ours",
    [
        ("backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.conv1.weight"),
        ("backbone.bottom_up.stem.conv1.norm.running_var", "backbone.bottom_up.bn1.running_var"),
        ("backbone.bottom_up.res2.0.conv2.norm.bias", "backbone.bottom_up.layer1.0.bn2.bias"),
        (
            "backbone.bottom_up.res5.0.shortcut.weight",
            "backbone.bottom_up.layer4.0.downsample.0.weight",
        ),
        (
            "backbone.bottom_up.res5.0.shortcut.norm.weight",
            "backbone.bottom_up.layer4.0.downsample.1.weight",
        ),
        ("backbone.fpn_lateral3.weight", "backbone.fpn.inner_blocks.0.0.weight"),
        ("backbone.fpn_output5.bias", "backbone.fpn.layer_blocks.2.0.bias"),
        ("backbone.top_block.p7.weight", "backbone.fpn.extra_blocks.p7.weight"),
        (
            "proposal_generator.fcos_head.cls_tower.0.weight",
            "proposal_generator.fcos_head.cls_tower.0.weight",
        ),
        ("mask_branch.refine.0.1.running_mean", "mask_branch.refine.0.1.running_mean"),
    ],
)
def test_detectron2_names_and_our_names_are_fixed_points(detectron2, ours):
    assert detectron2_to_project_name(detectron2) == ours
    assert detectron2_to_project_name(ours) == ours


def test_detectron2_url_is_looked_up_in_pretrained_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=r"dl\.fbaipublicfiles\.com/detectron2/ImageNetPretrained/MSRA/R-50\.pkl",
    ):
        resolve_weights_path("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    (tmp_path / "pretrained_models").mkdir()
    (tmp_path / "pretrained_models/R-50.pkl").write_bytes(b"")
    assert resolve_weights_path("detectron2://ImageNetPretrained/MSRA/R-50.pkl") == os.path.join(
        "pretrained_models", "R-50.pkl"
    )
    assert resolve_weights_path("some/file.pth") == "some/file.pth"


def test_torchvision_url_and_bare_file_name_are_looked_up_in_pretrained_models(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    url = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(url)):
        resolve_weights_path(url)
    with pytest.raises(FileNotFoundError, match=r"pretrained_models/resnet50-0676ba61\.pth"):
        resolve_weights_path("resnet50-0676ba61.pth")
    (tmp_path / "pretrained_models").mkdir()
    (tmp_path / "pretrained_models/resnet50-0676ba61.pth").write_bytes(b"")
    local = os.path.join("pretrained_models", "resnet50-0676ba61.pth")
    assert resolve_weights_path(url) == resolve_weights_path("resnet50-0676ba61.pth") == local
    (tmp_path / "mine.pth").write_bytes(b"")
    assert resolve_weights_path("mine.pth") == "mine.pth"


def _caffe2_blobs(model):
    """The model's ResNet as Caffe2 blobs (numpy), with a classifier and momentum blobs."""
    inverse = {
        "conv1.weight": "conv1_w",
        "bn1.weight": "res_conv1_bn_s",
        "bn1.bias": "res_conv1_bn_b",
    }
    blobs = {}
    for key, value in model.backbone.bottom_up.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            continue  # MSRA files hold only the affine parameters
        if key in inverse:
            name = inverse[key]
        else:
            layer, block, module, *rest = key.split(".")
            stage = int(layer[len("layer") :]) + 1
            if module == "downsample":
                branch, kind = (
                    ("branch1", "w")
                    if rest[0] == "0"
                    else ("branch1_bn", {"weight": "s", "bias": "b"}[rest[1]])
                )
            elif module.startswith("bn"):
                branch, kind = (
                    f"branch2{'abc'[int(module[2:]) - 1]}_bn",
                    {"weight": "s", "bias": "b"}[rest[0]],
                )
            else:
                branch, kind = f"branch2{'abc'[int(module[4:]) - 1]}", "w"
            name = f"res{stage}_{block}_{branch}_{kind}"
        blobs[name] = value.numpy() + 0.5
    blobs["fc1000_w"] = np.zeros((10, 4), dtype=np.float32)
    blobs["conv1_w_momentum"] = np.zeros(3, dtype=np.float32)
    return blobs


def test_caffe2_imagenet_pickle_loads_into_the_backbone_only(tmp_path):
    model = build_model(tiny_cfg("MODEL.RESNETS.NORM", "FrozenBN"))
    blobs = _caffe2_blobs(model)
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump(blobs, f, protocol=2)
    before_head = model.controller.weight.clone()
    Checkpointer(model).load(str(path), checkpointables=[])
    assert torch.equal(
        model.backbone.bottom_up.layer2[0].conv1.weight,
        torch.from_numpy(blobs["res3_0_branch2a_w"]),
    )
    assert torch.equal(
        model.backbone.bottom_up.bn1.weight, torch.from_numpy(blobs["res_conv1_bn_s"])
    )
    assert torch.equal(model.controller.weight, before_head)


def test_detectron2_model_zoo_pickle_keeps_detectron2_names(tmp_path, tiny_config):
    model = build_model(tiny_config)
    weight = model.backbone.fpn.inner_blocks[0][0].weight.detach().numpy() + 1
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.fpn_lateral3.weight": weight}, "__author__": "zoo"}, f)
    assert set(read_model_weights(str(path))["model"]) == {"backbone.fpn.inner_blocks.0.0.weight"}


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"conv1_w": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        read_model_weights(str(path))


def test_torchvision_resnet_state_dict_goes_under_the_backbone(tmp_path, tiny_config):
    model = build_model(tiny_config)
    resnet = {k: v + 1 for k, v in model.backbone.bottom_up.state_dict().items()}
    resnet["fc.weight"] = torch.zeros(10, 4)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet, path)
    Checkpointer(model).load(str(path), checkpointables=[])
    assert torch.equal(
        model.backbone.bottom_up.layer1[0].conv2.weight, resnet["layer1.0.conv2.weight"]
    )


def _save_legacy_tar(state, path):
    """Writes ``state`` (float tensors) in PyTorch's pre-0.4 ``.tar`` format, whose loading
    needs unrestricted unpickling."""
    names = list(state)
    storages, tensors, main = io.BytesIO(), io.BytesIO(), io.BytesIO()
    pickle.dump(len(names), storages)
    pickle.dump(len(names), tensors)
    for i, name in enumerate(names):
        t = state[name].contiguous().float()
        pickle.dump((i, "cpu", torch.FloatStorage), storages)
        storages.write(struct.pack("<q", t.numel()) + t.numpy().tobytes())
        pickle.dump((len(names) + i, i, torch.FloatTensor), tensors)
        tensors.write(struct.pack("<i", t.dim()) + bytes(4))
        tensors.write(struct.pack(f"<{2 * t.dim() + 1}q", *t.shape, *t.stride(), 0))
    pickle.dump([], storages)

    class TensorRef(str):
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return str(len(names) + names.index(obj)) if isinstance(obj, TensorRef) else None

    Pickler(main).dump({name: TensorRef(name) for name in names})
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry, buffer in (("storages", storages), ("tensors", tensors), ("pickle", main)):
            info = tarfile.TarInfo(entry)
            info.size = len(buffer.getvalue())
            buffer.seek(0)
            tar.addfile(info, buffer)


def convert_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools/convert_weights.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_legacy_tar_file_is_refused_then_converted_when_trusted(tmp_path, tiny_config):
    model = build_model(tiny_config)
    resnet = {
        k: v + 1 for k, v in model.backbone.bottom_up.state_dict().items() if v.is_floating_point()
    }
    legacy = tmp_path / "resnet_legacy.pth"
    _save_legacy_tar(resnet, legacy)
    with pytest.raises(CheckpointError, match=r"legacy \.tar format.*--trust-pickle"):
        Checkpointer(model).load(str(legacy), checkpointables=[])

    assert convert_cli(legacy, tmp_path / "safe.pth").returncode != 0
    proc = convert_cli("--trust-pickle", legacy, tmp_path / "safe.pth")
    assert proc.returncode == 0, proc.stderr
    Checkpointer(model).load(str(tmp_path / "safe.pth"), checkpointables=[])
    assert torch.equal(
        model.backbone.bottom_up.layer1[0].conv2.weight, resnet["layer1.0.conv2.weight"]
    )


@pytest.mark.slow
def test_pickled_module_is_refused_and_converted_only_when_trusted(tmp_path, tiny_config):
    model = build_model(tiny_config)
    path = tmp_path / "whole_model.pth"
    torch.save(model.backbone.bottom_up, path)
    with pytest.raises(CheckpointError, match="arbitrary code.*--trust-pickle"):
        read_model_weights(str(path))
    proc = convert_cli("--trust-pickle", path, tmp_path / "safe.pth")
    assert proc.returncode == 0, proc.stderr
    converted = read_model_weights(str(tmp_path / "safe.pth"))["model"]
    assert set(converted) == {
        f"backbone.bottom_up.{k}" for k in model.backbone.bottom_up.state_dict()
    }


@pytest.mark.slow
def test_conversion_of_a_caffe2_pickle_gives_the_same_weights(tmp_path):
    model = build_model(tiny_cfg("MODEL.RESNETS.NORM", "FrozenBN"))
    path = tmp_path / "R-tiny.pkl"
    with open(path, "wb") as f:
        pickle.dump(_caffe2_blobs(model), f)
    proc = convert_cli(path, tmp_path / "R-tiny.pth")
    assert proc.returncode == 0, proc.stderr
    direct, converted = (
        read_model_weights(str(path))["model"],
        read_model_weights(str(tmp_path / "R-tiny.pth"))["model"],
    )
    assert direct.keys() == converted.keys()
    assert all(torch.equal(direct[k], converted[k]) for k in direct)


def _save_pickle(content, path):
    with open(path, "wb") as f:
        pickle.dump(content, f)


NO_NETWORK = {
    "empty_dict.pth": lambda p: torch.save({}, p),
    "empty_model.pth": lambda p: torch.save({"model": {}}, p),
    "optimizer_only.pth": lambda p: torch.save(
        {"optimizer": {"state": {}}, "iteration": torch.tensor(5)}, p
    ),
    "two_unrelated.pth": lambda p: torch.save(
        {"model": {"foo": torch.zeros(3), "bar": torch.ones(2)}}, p
    ),
    "classifier_only.pth": lambda p: torch.save(
        {"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, p
    ),
    "stem_only.pth": lambda p: torch.save(
        {"conv1.weight": torch.zeros(8, 3, 7, 7), "bn1.weight": torch.ones(8)}, p
    ),
    "two_arrays.pkl": lambda p: _save_pickle({"a": np.zeros(3), "b": np.ones(2)}, p),
}


@pytest.mark.parametrize("name", sorted(NO_NETWORK))
def test_conversion_without_a_network_is_an_error_naming_the_file_and_writes_nothing(
    tmp_path, name
):
    src, dst = tmp_path / name, tmp_path / "out.pth"
    NO_NETWORK[name](src)
    with pytest.raises(
        CheckpointError, match=re.escape(name) + r".*expected a network's state dict"
    ):
        convert_weight_file(str(src), str(dst))
    assert not dst.exists() and os.listdir(tmp_path) == [name]


@pytest.mark.slow
def test_conversion_without_a_network_exits_non_zero_from_the_command_line(tmp_path):
    src, dst = tmp_path / "optimizer_only.pth", tmp_path / "out.pth"
    NO_NETWORK[src.name](src)
    proc = convert_cli(src, dst)
    assert (
        proc.returncode != 0
        and "optimizer_only.pth" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    assert not dst.exists()


def test_one_network_model_loads_the_teacher_of_a_teacher_student_checkpoint(tmp_path, tiny_config):
    model = build_model(tiny_config)
    state = model.state_dict()
    checkpoint = {f"teacher.{k}": v + 1 if v.is_floating_point() else v for k, v in state.items()}
    checkpoint.update({f"student.{k}": v for k, v in state.items()})
    path = tmp_path / "boxteacher.pth"
    torch.save({"model": checkpoint}, path)
    Checkpointer(model).load(str(path), checkpointables=[])
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], checkpoint[f"teacher.{k}"]) for k in loaded)


REFERENCE_KEYS = (
    Path(os.environ.get("BOXTEACHER_FIXTURES", REPO.parent / "shared" / "fixtures"))
    / "reference-state-dict-r50.txt"
)


@pytest.mark.skipif(not REFERENCE_KEYS.is_file(), reason=f"{REFERENCE_KEYS} not found")
def test_every_official_boxteacher_r50_key_maps_onto_our_model(tmp_path):
    """The official BoxTeacher R-50 state-dict key list (detectron2 names, teacher. and student.)
    renames onto our model exactly: every key found with its shape, none left over."""
    official = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        key, shape = line.rsplit(" ", 1)
        official[key] = tuple(int(d) for d in shape.strip("()").split(",") if d)
    cfg = load_config(
        str(REPO / "configs/coco/boxteacher_r50_1x.yaml"),
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"],
    )
    model = build_model(cfg)
    path = tmp_path / "official.pth"
    torch.save(
        {"model": {k: torch.full(shape, 0.5) for k, shape in official.items()}, "iteration": 90000},
        path,
    )
    state = read_model_weights(str(path))["model"]
    ours = model.state_dict()
    assert len(state) == len(official) == len(ours) == 744
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    missing, unexpected = load_model_weights(model, state, str(path))
    assert not missing and not unexpected
