"""Training loop, hooks and writers; exact resume (``boxteacher.engine``)."""

import json
import logging
import os
import random

import numpy as np
import pytest
import torch

from boxteacher.config import get_cfg
from boxteacher.engine import (
    Checkpointer,
    CommonMetricPrinter,
    EvalHook,
    EventStorage,
    HookBase,
    IterationTimer,
    JSONWriter,
    LRScheduler,
    NonFiniteLossError,
    PeriodicCheckpointer,
    PeriodicWriter,
    RNGState,
    SimpleTrainer,
    TensorboardXWriter,
    build_lr_scheduler,
    build_optimizer,
    resolve_data_seed,
)
from boxteacher.engine.trainer import amp_dtype
from boxteacher.utils.env import seed_all_rng
from boxteacher.utils.io import remove_stale_temporary_files

from tiny_models import ToyModel, toy_data


def _cfg(output_dir, max_iter, seed):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.SEED = seed
    cfg.SOLVER.BASE_LR = 0.05
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = (6,)
    cfg.SOLVER.WARMUP_ITERS = 3
    cfg.SOLVER.WARMUP_FACTOR = 0.1
    cfg.SOLVER.WEIGHT_DECAY_NORM = 1e-4
    return cfg


def _eval_function():
    torch.rand(100)  # evaluation consumes randomness; training must not see it
    np.random.rand(10)
    return {"val": {"AP": 42.0, "AP50": 60}}


def run_training(
    cfg,
    *,
    stop_at,
    resume=False,
    save_rng=True,
    period=5,
    eval_period=5,
    eval_function=_eval_function,
):
    """The assembly the project's Trainer does (see the engine report)."""
    remove_stale_temporary_files(cfg.OUTPUT_DIR)
    torch.manual_seed(0)
    model = ToyModel()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    trainer = SimpleTrainer(model, None, optimizer)
    extra_state = {"rng": RNGState()} if save_rng else {}
    checkpointer = Checkpointer(
        model, cfg.OUTPUT_DIR, scheduler=scheduler, **extra_state, **trainer.checkpointables()
    )
    seed_all_rng(1234)  # what default_setup does; a resumed run then restores the saved states
    extra = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    start_iter = extra.get("iteration", -1) + 1
    trainer.data_seed = resolve_data_seed(cfg, extra)
    trainer.data_loader = toy_data(trainer.data_seed, start_iter)
    json_writer = JSONWriter(f"{cfg.OUTPUT_DIR}/metrics.json", window=1)
    trainer.register_hooks(
        [
            IterationTimer(),
            LRScheduler(optimizer, scheduler),
            PeriodicCheckpointer(checkpointer, period, cfg.SOLVER.MAX_ITER),
            EvalHook(eval_period, eval_function),
            PeriodicWriter([json_writer, CommonMetricPrinter(cfg.SOLVER.MAX_ITER)], period=2),
        ]
    )
    trainer.train(start_iter, stop_at)
    return trainer, model, optimizer


def _read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_resume_is_exact(tmp_path):
    _, full, full_optimizer = run_training(_cfg(tmp_path / "full", 10, seed=7), stop_at=10)
    full_rng = torch.get_rng_state(), np.random.rand(), random.random()

    half_cfg = _cfg(tmp_path / "half", 10, seed=7)
    run_training(half_cfg, stop_at=5)
    half_cfg.SEED = -1  # the data seed must come from the checkpoint
    trainer, resumed, resumed_optimizer = run_training(half_cfg, stop_at=10, resume=True)

    assert trainer.start_iter == 5 and trainer.iter == 10 and trainer.data_seed == 7
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert resumed_optimizer.param_groups[0]["lr"] == full_optimizer.param_groups[0]["lr"]
    for p_full, p_resumed in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(
            full_optimizer.state[p_full]["momentum_buffer"],
            resumed_optimizer.state[p_resumed]["momentum_buffer"],
        )
    assert torch.equal(torch.get_rng_state(), full_rng[0])
    assert (np.random.rand(), random.random()) == full_rng[1:]
    # Metrics of the resumed run are appended after those of the first half.
    iterations = [m["iteration"] for m in _read_metrics(tmp_path / "half" / "metrics.json")]
    assert iterations == sorted(iterations) and iterations[-1] == 10


def test_resume_without_rng_state_differs(tmp_path):
    _, full, _ = run_training(_cfg(tmp_path / "full", 10, seed=7), stop_at=10, save_rng=False)
    cfg = _cfg(tmp_path / "half", 10, seed=7)
    run_training(cfg, stop_at=5, save_rng=False)
    _, resumed, _ = run_training(cfg, stop_at=10, resume=True, save_rng=False)
    assert not torch.equal(full.net[0].weight, resumed.net[0].weight)


def test_metrics_checkpoints_and_eval_results(tmp_path):
    cfg = _cfg(tmp_path, 10, seed=3)
    run_training(cfg, stop_at=10, period=4, eval_period=4)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == [
        "model_0000003.pth",
        "model_0000007.pth",
        "model_final.pth",
    ]
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["iteration"] == 9 and final["data_seed"] == 3

    metrics = _read_metrics(tmp_path / "metrics.json")
    assert [m["iteration"] for m in metrics] == [1, 3, 5, 7, 9, 10]
    evals = [(m["iteration"], m["val/AP"], m["val/AP50"]) for m in metrics if "val/AP" in m]
    assert evals == [(3, 42.0, 60.0), (7, 42.0, 60.0), (10, 42.0, 60.0)]  # each once
    for m in metrics[:-1]:
        assert m["total_loss"] == pytest.approx(m["loss_mse"] + m["loss_reg"], rel=1e-6)
        assert m["num_things"] == 100.0  # logged, not summed into the loss
        assert {"lr", "time", "data_time"} <= set(m)
    assert metrics[0]["lr"] == pytest.approx(0.05 * (0.1 + 0.9 / 3))  # lr of iteration 1


def test_non_finite_loss_stops_with_one_line_and_no_checkpoint_of_the_diverging_step(
    tmp_path, caplog
):
    model = ToyModel(nan_at_call=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainer(model, toy_data(0, 0), optimizer)
    trainer.register_hooks([PeriodicCheckpointer(Checkpointer(model, str(tmp_path)), period=1)])
    with caplog.at_level(logging.INFO, logger="boxteacher.engine"):
        with pytest.raises(
            NonFiniteLossError, match=r"iteration 3: loss_mse=nan, loss_reg=\S+, num_things=100$"
        ):
            trainer.train(0, 10)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None  # the caller prints the one traceback
    assert "\n" not in errors[0].getMessage() and "iteration 3" in errors[0].getMessage()

    # The weights of the diverging step were not changed, and its checkpoint not written.
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert (
        not (tmp_path / "model_0000003.pth").exists()
        and not (tmp_path / "model_final.pth").exists()
    )
    saved = torch.load(tmp_path / "model_0000002.pth", weights_only=True)["model"]
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


class _Killed(BaseException):
    """A kill of the process, simulated: no ``except Exception`` stops it."""


_UNPATCHED = (torch.save, Checkpointer.tag_last_checkpoint, JSONWriter.write)


class _KillSwitch:
    """Records the side effects of a training in order; "kills" the run at event ``kill_at``
    and at every event after it (a killed process does nothing more)."""

    def __init__(self, kill_at=None):
        self.events, self.kill_at = [], kill_at

    def __call__(self, event):
        self.events.append(event)
        if self.kill_at is not None and len(self.events) > self.kill_at:
            raise _Killed(event)

    def install(self, monkeypatch):
        """Events: writing a file of a checkpoint, tagging it, writing metrics, evaluating."""
        save, tag, write = _UNPATCHED

        def killable_save(obj, f, *args, **kwargs):
            self(f"save {os.path.basename(f.name)}")
            save(obj, f, *args, **kwargs)

        def killable_tag(checkpointer, name):
            self(f"tag {name}")
            tag(checkpointer, name)

        def killable_write(writer):
            self("metrics")
            write(writer)

        monkeypatch.setattr(torch, "save", killable_save)
        monkeypatch.setattr(Checkpointer, "tag_last_checkpoint", killable_tag)
        monkeypatch.setattr(JSONWriter, "write", killable_write)

    def eval_function(self):
        self("eval")
        return _eval_function()


FINAL_SEQUENCE = [
    "metrics",  # of the last step
    "save model_0000009.pth.tmp",
    "tag model_0000009.pth",
    "save model_final.pth.tmp",
    "tag model_final.pth",
    "eval",
    "metrics",
]


def _final_weights(output_dir):
    return torch.load(output_dir / "model_final.pth", weights_only=True)["model"]


def test_a_kill_at_any_step_of_the_final_sequence_then_resume_ends_like_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    """MAX_ITER a multiple of the checkpoint period (the COCO recipes): the periodic checkpoint
    of the last iteration is followed by model_final, the evaluation and the last metrics."""
    straight = _KillSwitch()
    straight.install(monkeypatch)
    run_training(
        _cfg(tmp_path / "straight", 10, seed=7), stop_at=10, eval_function=straight.eval_function
    )
    assert straight.events[-len(FINAL_SEQUENCE) :] == FINAL_SEQUENCE
    expected = _final_weights(tmp_path / "straight")

    first_final_event = len(straight.events) - len(FINAL_SEQUENCE)
    for step, event in enumerate(FINAL_SEQUENCE):
        cfg = _cfg(tmp_path / f"killed_at_{step}", 10, seed=7)
        switch = _KillSwitch(kill_at=first_final_event + step)
        switch.install(monkeypatch)
        with pytest.raises(_Killed, match=event):
            run_training(cfg, stop_at=10, eval_function=switch.eval_function)
        output = tmp_path / f"killed_at_{step}"
        if event.startswith("save "):  # what a kill leaves (the exception let atomic_open clean up)
            (output / event.split()[1]).write_bytes(b"partial")

        resumed = _KillSwitch()
        resumed.install(monkeypatch)
        trainer, _, _ = run_training(
            cfg, stop_at=10, resume=True, eval_function=resumed.eval_function
        )
        assert trainer.iter == 10 and "eval" in resumed.events, event
        assert (output / "last_checkpoint").read_text() == "model_final.pth", event
        final = _final_weights(output)
        assert all(torch.equal(value, final[key]) for key, value in expected.items()), event
        assert not list(output.glob("*.tmp")), event
        metrics = _read_metrics(output / "metrics.json")
        assert any(m["iteration"] == 9 and "total_loss" in m for m in metrics), event
        assert metrics[-1]["iteration"] == 10 and metrics[-1]["val/AP"] == 42.0, event


class _Recorder(HookBase):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def before_train(self):
        self.log.append(f"before_train:{self.name}")

    def after_train(self):
        self.log.append(f"after_train:{self.name}:{self.trainer.iter}")

    def before_step(self):
        self.log.append(f"before_step:{self.name}:{self.trainer.iter}")

    def after_step(self):
        self.log.append(f"after_step:{self.name}:{self.trainer.iter}")


def test_hook_order():
    log = []

    class Trainer(SimpleTrainer):
        def run_step(self):
            log.append(f"run_step:{self.iter}")

    model = ToyModel()
    trainer = Trainer(model, toy_data(0, 0), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.register_hooks([_Recorder("a", log), None, _Recorder("b", log)])
    trainer.train(5, 7)
    assert log == [
        "before_train:a",
        "before_train:b",
        "before_step:a:5",
        "before_step:b:5",
        "run_step:5",
        "after_step:a:5",
        "after_step:b:5",
        "before_step:a:6",
        "before_step:b:6",
        "run_step:6",
        "after_step:a:6",
        "after_step:b:6",
        "after_train:a:7",
        "after_train:b:7",
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_on_cpu_autocasts_and_scales_the_loss_in_float16_only(tmp_path, dtype):
    model = ToyModel()
    trainer = SimpleTrainer(
        model, toy_data(0, 0), torch.optim.SGD(model.parameters(), lr=0.1), amp_dtype=dtype
    )
    with trainer.autocast():
        assert model.net(torch.zeros(1, 4)).dtype == dtype
    assert set(trainer.checkpointables()) == (
        {"optimizer", "grad_scaler"} if dtype == torch.float16 else {"optimizer"}
    )
    trainer.train(0, 3)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    Checkpointer(model, str(tmp_path), **trainer.checkpointables()).save("model_final")
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert ("grad_scaler" in saved) == (dtype == torch.float16)


def test_amp_precision_from_the_config():
    cfg = get_cfg()
    assert amp_dtype(cfg, torch.device("cpu")) is None
    cfg.SOLVER.AMP.ENABLED = True
    assert amp_dtype(cfg, torch.device("cpu")) == torch.bfloat16  # "auto"
    cfg.SOLVER.AMP.PRECISION = "float16"
    assert amp_dtype(cfg, torch.device("cpu")) == torch.float16
    cfg.SOLVER.AMP.PRECISION = "fp8"
    with pytest.raises(ValueError, match=r"SOLVER\.AMP\.PRECISION.*'fp8'"):
        amp_dtype(cfg, torch.device("cpu"))


@pytest.mark.parametrize("value", ["n/a", [1.0]])
def test_eval_hook_rejects_bad_values(value):
    model = ToyModel()
    trainer = SimpleTrainer(model, toy_data(0, 0), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.register_hooks([EvalHook(1, lambda: {"segm": {"AP": value}})])
    with pytest.raises(ValueError, match="segm/AP"):
        trainer.train(0, 3)


def test_eval_hook_leaves_out_undefined_metrics():
    model = ToyModel()
    trainer = SimpleTrainer(model, toy_data(0, 0), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.register_hooks([EvalHook(0, lambda: {"segm": {"AP": 12.5, "APl": float("nan")}})])
    trainer.train(0, 2)
    assert trainer.storage.history("segm/AP").latest() == 12.5
    assert "segm/APl" not in trainer.storage.histories()


def test_printer_and_tensorboard(tmp_path, caplog):
    with EventStorage(start_iter=9) as storage:
        storage.put_scalars(total_loss=1.5, loss_a=1.0)
        storage.put_scalars(time=0.5, data_time=0.01)
        storage.put_scalar("lr", 0.02, smoothing_hint=False)
        storage.put_image("vis", torch.zeros(4, 5, 3, dtype=torch.uint8))
        with caplog.at_level(logging.INFO, logger="boxteacher.engine.events"):
            CommonMetricPrinter(max_iter=100).write()
        writer = TensorboardXWriter(str(tmp_path))
        writer.write()
        writer.close()
        assert storage.images() == []
    line = (
        "eta: 0:00:45  iter: 9  total_loss: 1.5  loss_a: 1  time: 0.5000  data_time: 0.0100  "
        "lr: 0.02"
    )
    assert line in caplog.text
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_on_cuda_checkpoints_the_grad_scaler(tmp_path):
    model = ToyModel().cuda()
    data = ((x.cuda(), y.cuda()) for x, y in toy_data(0, 0))
    trainer = SimpleTrainer(
        model, data, torch.optim.SGD(model.parameters(), lr=0.01), amp_dtype=torch.float16
    )
    assert set(trainer.checkpointables()) == {"optimizer", "grad_scaler"}
    trainer.train(0, 3)
    Checkpointer(model, str(tmp_path), **trainer.checkpointables()).save("model_final")
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert saved["grad_scaler"]["scale"] > 0
