"""Atomic saving, ``weights_only`` loading and tolerant weight loading (``engine.checkpoint``)."""

import argparse
import logging
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from boxteacher.config import get_cfg
from boxteacher.engine.checkpoint import (
    Checkpointer,
    MultiNetworkCheckpointing,
    RNGState,
    atomic_open,
    load_model_weights,
)
from boxteacher.engine.solver import build_lr_scheduler, build_optimizer
from boxteacher.engine.weight_files import CheckpointError
from boxteacher.utils.io import remove_stale_temporary_files

LOGGER = "boxteacher.engine.checkpoint"


class _Net(nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.backbone = nn.Linear(2, width)
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 1)


def _checkpointer(tmp_path, model=None):
    model = model or _Net()
    cfg = get_cfg()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    return Checkpointer(
        model, str(tmp_path), optimizer=optimizer, scheduler=scheduler, rng=RNGState()
    )


def test_saved_file_is_weights_only_and_unprefixed(tmp_path):
    torch.manual_seed(0)
    model = nn.DataParallel(_Net())  # keys of the wrapper start with "module."
    _checkpointer(tmp_path, model).save("model_0000009", iteration=9, data_seed=1234)
    data = torch.load(tmp_path / "model_0000009.pth", map_location="cpu", weights_only=True)
    assert set(data) == {"model", "optimizer", "scheduler", "rng", "iteration", "data_seed"}
    assert data["iteration"] == 9 and data["data_seed"] == 1234
    assert sorted(data["model"]) == sorted(model.module.state_dict())
    assert torch.equal(data["model"]["head.weight"], model.module.head.weight)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer = _checkpointer(tmp_path)
    checkpointer.save("model_0000004", iteration=4)
    good = (tmp_path / "model_0000004.pth").read_bytes()

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_0000009", iteration=9)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert (tmp_path / "model_0000004.pth").read_bytes() == good


def test_atomic_open_text(tmp_path):
    path = str(tmp_path / "last_checkpoint")
    with atomic_open(path, "w") as f:
        f.write("a.pth")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("b.p")
            raise RuntimeError("crash")
    assert open(path).read() == "a.pth" and os.listdir(tmp_path) == ["last_checkpoint"]


@pytest.mark.parametrize("content", ["pickle", "garbage"])
def test_unreadable_file_is_named(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "pickle":
        torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, path)  # arbitrary object
    else:
        path.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(CheckpointError, match="weights.pth"):
        _checkpointer(tmp_path / "out").load(str(path))


def test_missing_and_unexpected_keys_are_logged(caplog):
    source, target = _Net(), _Net()
    state = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("head.")}
    state["extra.weight"] = torch.zeros(2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        missing, unexpected = load_model_weights(target, state, "ckpt.pth")
    assert sorted(missing) == ["head.bias", "head.weight"]
    assert unexpected == ["extra.weight"]
    assert "head" in caplog.text and "extra.weight" in caplog.text
    assert torch.equal(target.backbone.weight, source.backbone.weight)


def test_shape_mismatch_is_skipped_with_warning(caplog):
    source, target = _Net(width=4), _Net(width=3)
    target_head_before = target.head.weight.clone()
    state = {"model": {"module." + k: v for k, v in source.state_dict().items()}}
    state["model"]["module.norm.num_batches_tracked"] = torch.tensor(7)  # fits
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_model_weights(target, state, "other_width.pth")
    assert "Skip loading 'head.weight'" in caplog.text and "(1, 4)" in caplog.text
    assert torch.equal(target.head.weight, target_head_before)
    assert target.norm.num_batches_tracked.item() == 7


def test_nothing_matched_is_an_error():
    with pytest.raises(CheckpointError, match="another model.*'resnet.pth'|'resnet.pth'.*another"):
        load_model_weights(_Net(), {"conv1.weight": torch.zeros(3)}, "resnet.pth")


class _TwoNets(nn.Module):
    """Two networks (``MultiNetworkCheckpointing``): one-network weights load into ``first``."""

    single_network_prefix = "first."

    def __init__(self):
        super().__init__()
        self.first, self.second = _Net(), _Net()
        self.loaded: list[str] = []

    def on_weights_loaded(self, loaded_keys):
        self.loaded = list(loaded_keys)


def test_a_model_of_several_networks_follows_the_checkpoint_protocol():
    model, source = _TwoNets(), _Net()
    assert isinstance(model, MultiNetworkCheckpointing) and not isinstance(
        source, MultiNetworkCheckpointing
    )
    missing, unexpected = load_model_weights(model, source.state_dict(), "one_network.pth")
    assert missing == [] and unexpected == []  # the keys of "second." are left to on_weights_loaded
    assert model.loaded == ["first." + k for k in source.state_dict()]
    assert torch.equal(model.first.head.weight, source.head.weight)
    assert not torch.equal(model.second.head.weight, source.head.weight)


def test_resume_or_load(tmp_path):
    torch.manual_seed(0)
    trained = _checkpointer(tmp_path / "run")
    trained.checkpointables["optimizer"].state[trained.model.head.weight] = {
        "momentum_buffer": torch.ones(1, 3)
    }
    random.seed(5)
    np.random.seed(5)
    trained.save("model_final", iteration=99, data_seed=42)
    expected = (torch.rand(3), random.random(), np.random.rand())

    # Weights only (not resuming): a bare state dict, no optimizer state, nothing returned.
    torch.save(trained.model.state_dict(), tmp_path / "bare.pth")
    fresh = _checkpointer(tmp_path / "new")
    assert fresh.resume_or_load(str(tmp_path / "bare.pth"), resume=True) == {}
    assert torch.equal(fresh.model.head.weight, trained.model.head.weight)
    assert not fresh.checkpointables["optimizer"].state

    # Resuming: everything, including the RNG states, and the extra fields.
    resumed = _checkpointer(tmp_path / "run")
    torch.manual_seed(123)
    extra = resumed.resume_or_load("ignored.pth", resume=True)
    assert extra == {"iteration": 99, "data_seed": 42}
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (
        expected[0].tolist(),
        expected[1],
        expected[2],
    )
    state = resumed.checkpointables["optimizer"].state[resumed.model.head.weight]
    assert torch.equal(state["momentum_buffer"], torch.ones(1, 3))


def test_a_checkpoint_with_non_finite_weights_loads_with_a_warning_naming_them(tmp_path, caplog):
    state = _Net().state_dict()
    state["backbone.weight"][0, 0] = float("nan")
    state["head.bias"][0] = float("inf")
    path = str(tmp_path / "diverged.pth")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_model_weights(_Net(), {"model": state}, path)
    warnings = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warnings) == 1
    assert path in warnings[0] and "2 of 9 tensors (backbone.weight, head.bias)" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_model_weights(_Net(), {"model": _Net().state_dict()}, path)
    assert not [r for r in caplog.records if "NaN or infinite" in r.getMessage()]


def test_weights_holding_nan_are_not_saved(tmp_path):
    model = _Net()
    checkpointer = _checkpointer(tmp_path, model)
    checkpointer.save("model_0000004", iteration=4)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"model_0000009\.pth.*1 of 9 tensors \(head\.weight\)"
    ):
        checkpointer.save("model_0000009", iteration=9)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"


def test_stale_temporary_files_of_atomic_writes_are_removed(tmp_path, caplog):
    # What a kill during atomic_open("model_final.pth") and a tag write leaves behind.
    (tmp_path / "model_final.pth.tmp").write_bytes(b"partial")
    (tmp_path / "last_checkpoint.tmp").write_text("model_0000009.pth")
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "other.tmp").write_text("not ours")  # sub-folders are left alone
    (tmp_path / "model_0000009.pth").write_bytes(b"kept")

    with caplog.at_level(logging.INFO, logger="boxteacher.utils.io"):
        removed = remove_stale_temporary_files(str(tmp_path))
    assert removed == [str(tmp_path / "last_checkpoint.tmp"), str(tmp_path / "model_final.pth.tmp")]
    assert sorted(os.listdir(tmp_path)) == ["inference", "model_0000009.pth"]
    assert (tmp_path / "inference" / "other.tmp").is_file()
    assert all(path in caplog.text for path in removed)
    assert remove_stale_temporary_files(str(tmp_path / "missing")) == []
