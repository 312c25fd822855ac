"""The losses of the three quick starts (and of mixed supervision) at iterations 1 and 10 of a
small run, pinned: a refactor of the models or the engine must not change them. One CPU thread,
no loader workers and fixed seeds make a run repeat exactly; the tolerances leave room for other
PyTorch builds only. A change of float rounding alone (e.g. an order of summation) keeps the
values to 6-7 digits for a few iterations, then lets them drift by up to tens of percent at
iteration 10 (see below). Re-pin after a change meant to change a number or its rounding, and
say why in the commit.

The mixed-supervision runs are the most sensitive: their iteration-10 values were re-pinned when
the supervision became criteria (issue 15). Their first step stayed bitwise equal; at the first
batch mixing masked and box-only positives the losses and gradients changed in their last bits
(the box-only positives' share is now their mean instead of 1 minus the masked ones' mean, and
the Dice term takes the sigmoid of the masked positives' logits alone, whose vectorised backward
rounds differently), and ten iterations of this tiny run amplify that to a few percent. The
three quick starts stayed bitwise equal for 20 iterations.

The iteration-10 values of every run with a pairwise term were re-pinned when that term moved to
a canvas of the instances' regions (issue 14): its sums are taken in another order, so losses
and gradients change in their last bits from the first step (iteration 1 is unchanged to 7
digits, the losses agree to 6 digits up to iterations 4-6), then this tiny run's drift takes
over (it sits on the edge of collapse: its pairwise losses fall to about 0 by iteration 10). The
term itself is checked against the unfold oracle to 1e-10 in float64 (test_modeling_boxinst).

The iteration-10 values depend on the CPU as well: the same code and PyTorch build (2.14.1) give
the pinned iteration-1 values to 7 digits on an AMD EPYC with AVX512 kernels but iteration-10
values up to 2x apart from those of the machine the pins were first taken on (its kernels sum in
another order, and the drift above does the rest). Iteration 1 is pinned everywhere; iteration
10 against the values of the machine's CPU (``PLATFORM_ITERATION_10``), the first machine's
values elsewhere."""

from pathlib import Path

import pytest
import torch

from boxteacher.config import load_config
from boxteacher.engine.trainer import Trainer
from boxteacher.utils.env import seed_all_rng

from tiny_models import REPO

pytestmark = pytest.mark.usefixtures(
    "shapes_datasets"
)  # the built-in datasets under a temporary root
RUN = [
    "MODEL.DEVICE",
    "cpu",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "10",
    "SOLVER.WARMUP_ITERS",
    "5",
    "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS",
    "5",
    "MODEL.BOX_TEACHER.WARMUP_ITERS",
    "5",
    "SEED",
    "0",
    "DATASETS.TEST",
    "()",
]
MIXED = ["MODEL.BOXINST.GT_MASKS", "fraction", "MODEL.BOXINST.GT_MASK_FRACTION", "0.5"]

# name -> (config, extra options, {loss: (value at iteration 1, value at iteration 10)})
PINNED = {
    "condinst": (
        "condinst_shapes.yaml",
        [],
        {
            "loss_fcos_cls": (1.147965, 2.275508),
            "loss_fcos_ctr": (0.6754206, 0.6681781),
            "loss_fcos_loc": (0.9364485, 0.5112455),
            "loss_mask": (0.7990026, 0.8347252),
        },
    ),
    "boxinst": (
        "boxinst_shapes.yaml",
        [],
        {
            "loss_fcos_cls": (1.147965, 3.523527),
            "loss_fcos_ctr": (0.6754206, 0.6905001),
            "loss_fcos_loc": (0.9364485, 0.7324274),
            "loss_pairwise": (0.1322474, 6.285755e-06),
            "loss_prj": (0.9897379, 1.259772),
        },
    ),
    "boxteacher": (
        "boxteacher_shapes.yaml",
        [],
        {
            "loss_fcos_cls": (1.065603, 1.172046),
            "loss_fcos_ctr": (0.6865533, 0.7146221),
            "loss_fcos_loc": (0.9376559, 0.5452073),
            "loss_mask": (0.0, 0.3667362),
            "loss_mask_affinity": (0.0, 4.336504e-09),
            "loss_pairwise": (0.1334829, 3.829877e-08),
            "loss_prj": (0.974856, 1.259661),
        },
    ),
    "boxinst_mixed": (
        "boxinst_shapes.yaml",
        MIXED,
        {
            "loss_fcos_cls": (1.147965, 1.271714),
            "loss_fcos_ctr": (0.6754206, 0.665529),
            "loss_fcos_loc": (0.9364485, 0.5360098),
            "loss_gt_mask": (0.7990026, 0.8216705),
            "loss_pairwise": (0.0, 0.0),
            "loss_prj": (0.0, 0.0),
        },
    ),
    "boxteacher_mixed": (
        "boxteacher_shapes.yaml",
        MIXED,
        {
            "loss_fcos_cls": (1.065603, 1.188783),
            "loss_fcos_ctr": (0.6865533, 0.6743734),
            "loss_fcos_loc": (0.9376559, 0.6423452),
            "loss_gt_mask": (0.8240594, 0.8309601),
            "loss_mask": (0.08240594, 0.41548),
            "loss_mask_affinity": (0.01334226, 0.01372006),
            "loss_pairwise": (0.0, 0.0),
            "loss_prj": (0.0, 0.0),
        },
    ),
}


# Iteration-10 values of other CPUs:
# (model name prefix, torch CPU capability) -> name -> loss -> value.
PLATFORM_ITERATION_10 = {
    ("AMD EPYC", "AVX512"): {
        "condinst": {
            "loss_fcos_cls": 2.192502,
            "loss_fcos_ctr": 0.6977593,
            "loss_fcos_loc": 0.5044063,
            "loss_mask": 0.8361145,
        },
        "boxinst": {
            "loss_fcos_cls": 1.707781,
            "loss_fcos_ctr": 0.6736514,
            "loss_fcos_loc": 0.8001225,
            "loss_pairwise": 2.407879e-10,
            "loss_prj": 1.259774,
        },
        "boxteacher": {
            "loss_fcos_cls": 0.8375036,
            "loss_fcos_ctr": 0.7067607,
            "loss_fcos_loc": 0.656459,
            "loss_mask": 0.3398397,
            "loss_mask_affinity": 2.273367e-07,
            "loss_pairwise": 0.004960919,
            "loss_prj": 1.245874,
        },
        "boxinst_mixed": {
            "loss_fcos_cls": 1.258162,
            "loss_fcos_ctr": 0.6814294,
            "loss_fcos_loc": 0.5513483,
            "loss_gt_mask": 0.792591,
            "loss_pairwise": 0.0,
            "loss_prj": 0.0,
        },
        "boxteacher_mixed": {
            "loss_fcos_cls": 0.915468,
            "loss_fcos_ctr": 0.6656998,
            "loss_fcos_loc": 0.5578482,
            "loss_gt_mask": 0.8341256,
            "loss_mask": 0.4170628,
            "loss_mask_affinity": 0.03292289,
            "loss_pairwise": 0.0,
            "loss_prj": 0.0,
        },
    },
}


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    except OSError:
        return ""


def iteration_10_values(name: str) -> dict[str, float]:
    """The pinned iteration-10 losses of run ``name`` on this machine's CPU."""
    model, capability = cpu_model_name(), torch.backends.cpu.get_cpu_capability()
    for (prefix, platform_capability), values in PLATFORM_ITERATION_10.items():
        if model.startswith(prefix) and capability == platform_capability:
            return values[name]
    return {loss: last for loss, (_, last) in PINNED[name][2].items()}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses_at_iterations_1_and_10(
    config: str, extra: list[str], output_dir: Path
) -> dict[str, tuple[float, float]]:
    seed_all_rng(0)
    trainer = Trainer(
        load_config(
            str(REPO / "configs/quickstart" / config), RUN + extra + ["OUTPUT_DIR", str(output_dir)]
        )
    )
    trainer.resume_or_load(resume=False)
    trainer.train()
    names = [name for name in trainer.storage.histories() if name.startswith("loss_")]
    values = {}
    for name in names:
        history = dict(
            (iteration, value) for value, iteration in trainer.storage.history(name).values()
        )
        values[name] = (history[0], history[9])
    return values


@pytest.mark.parametrize("name", list(PINNED))
def test_losses_at_iterations_1_and_10_are_pinned(name, tmp_path, one_thread):
    config, extra, pinned = PINNED[name]
    measured = losses_at_iterations_1_and_10(config, extra, tmp_path)
    assert set(measured) == set(pinned), f"{name}: {sorted(measured)}"
    last = iteration_10_values(name)
    for loss, (first, _) in pinned.items():
        assert measured[loss][0] == pytest.approx(first, rel=1e-5, abs=1e-7), (
            name,
            loss,
            measured[loss],
        )
        assert measured[loss][1] == pytest.approx(last[loss], rel=1e-4, abs=1e-7), (
            name,
            loss,
            measured[loss],
        )
