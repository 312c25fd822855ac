"""Multi-process launching on the CPU with gloo (``boxteacher.engine.launch``)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from boxteacher.config import get_cfg
from boxteacher.engine import (
    Checkpointer,
    EvalHook,
    JSONWriter,
    LRScheduler,
    PeriodicCheckpointer,
    PeriodicWriter,
    RNGState,
    SimpleTrainer,
    build_lr_scheduler,
    build_optimizer,
    create_ddp_model,
    resolve_data_seed,
    resolve_device,
)
from boxteacher.engine.launch import launch
from boxteacher.utils import comm
from boxteacher.utils.env import seed_all_rng

from tiny_models import ToyModel, toy_data


def _all_reduce_main(out_dir):
    """Runs in each spawned process."""
    value = torch.tensor([float(comm.get_rank() + 1)])
    dist.all_reduce(value)
    record = {
        "sum": value.item(),
        "world_size": comm.get_world_size(),
        "local_rank": comm.get_local_rank(),
        "backend": dist.get_backend(),
    }
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(record, f)


@pytest.mark.slow
def test_two_cpu_processes_all_reduce(tmp_path):
    launch(_all_reduce_main, num_gpus_per_machine=2, dist_url="auto", args=(str(tmp_path),))
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["sum"] == 3.0 and record["world_size"] == 2 and record["local_rank"] == rank
        if not torch.cuda.is_available():
            assert record["backend"] == "gloo"


def _ddp_train_main(out_dir):
    """Four DDP iterations of the toy model, as the project's Trainer assembles them."""
    rank = comm.get_rank()
    seed_all_rng(100 + rank)
    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER = 4
    model = ToyModel()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    ddp_model = create_ddp_model(model)
    trainer = SimpleTrainer(ddp_model, toy_data(rank, 0), optimizer)
    checkpointer = Checkpointer(
        ddp_model,
        out_dir,
        save_to_disk=comm.is_main_process(),
        scheduler=scheduler,
        rng=RNGState(),
        **trainer.checkpointables(),
    )
    trainer.data_seed = resolve_data_seed(cfg, {})
    hooks = [
        LRScheduler(optimizer, scheduler),
        PeriodicCheckpointer(checkpointer, period=2),
        EvalHook(0, lambda: {"val": {"AP": 1.0}} if comm.is_main_process() else {}),
    ]
    if comm.is_main_process():
        hooks.append(PeriodicWriter([JSONWriter(os.path.join(out_dir, "metrics.json"))], 1))
    trainer.register_hooks(hooks)
    trainer.train(0, 4)
    torch.save(model.state_dict(), os.path.join(out_dir, f"weights_rank{rank}.pt"))


@pytest.mark.slow
def test_two_process_ddp_training(tmp_path):
    launch(_ddp_train_main, num_gpus_per_machine=2, dist_url="auto", args=(str(tmp_path),))
    weights = [torch.load(tmp_path / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["iteration"] == 3 and isinstance(final["data_seed"], int)
    assert not any(key.startswith("module.") for key in final["model"])
    rng = final["rng"]["per_rank"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [0, 1, 2, 3, 4]
    assert all("total_loss" in m and m["num_things"] == 100.0 for m in lines[:4])
    assert lines[-1] == {"iteration": 4, "val/AP": 1.0}


_FAILING_SCRIPT = """
import torch.distributed as dist
from boxteacher.engine.launch import launch
from boxteacher.utils import comm

def main():
    if comm.get_rank() == 1:
        raise ValueError("boom in rank 1")
    dist.barrier()  # rank 0 would wait forever for rank 1

if __name__ == "__main__":
    launch(main, num_gpus_per_machine=2, dist_url="auto")
"""


@pytest.mark.slow
def test_child_exception_fails_the_launch(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(_FAILING_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "boom in rank 1" in result.stderr


def test_single_process_and_torchrun_env_run_in_this_process(monkeypatch):
    calls = []
    launch(calls.append, num_gpus_per_machine=1, args=("plain",))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    launch(calls.append, num_gpus_per_machine=8, args=("torchrun",))
    assert calls == ["plain", "torchrun"] and not dist.is_initialized()


def test_auto_url_needs_one_machine():
    with pytest.raises(ValueError, match="one machine"):
        launch(print, num_gpus_per_machine=2, num_machines=2, dist_url="auto")


def test_resolve_device_on_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="MODEL.DEVICE 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
