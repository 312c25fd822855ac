"""Training pictures (VIS_PERIOD): what they show, where they go, and that drawing them leaves
training bit for bit as it was."""

import os
from pathlib import Path

import cv2
import pytest
import torch
from torch import nn

from boxteacher.build import architecture_spec, build_model
from boxteacher.config import load_config
from boxteacher.data.builtin import register_builtin_datasets
from boxteacher.engine.train_loop import unwrap_model
from boxteacher.engine.trainer import Trainer
from boxteacher.engine.visualization import (
    draw_training_picture,
    network_outputs,
    preserved_model_state,
)
from boxteacher.utils.env import seed_all_rng

from tiny_models import REPO, TINY_MODEL_OVERRIDES, sample

BOXTEACHER = str(REPO / "configs/quickstart/boxteacher_shapes.yaml")
TINY_RUN = TINY_MODEL_OVERRIDES + [
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "3",
    "SEED",
    "0",
    "DATASETS.TEST",
    "()",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "128",
]


@pytest.fixture(scope="module", autouse=True)
def datasets_root(tmp_path_factory):
    """The built-in shapes dataset under a temporary root."""
    root = str(tmp_path_factory.mktemp("datasets"))
    register_builtin_datasets(root)
    yield root
    register_builtin_datasets()


def image_tags(output_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for events in output_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        tags += accumulator.Tags()["images"]
    return tags


def train_boxteacher(output_dir: Path, vis_period: int) -> dict[str, torch.Tensor]:
    seed_all_rng(0)
    cfg = load_config(
        BOXTEACHER, TINY_RUN + ["VIS_PERIOD", str(vis_period), "OUTPUT_DIR", str(output_dir)]
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return unwrap_model(trainer.model).state_dict()


@pytest.fixture
def one_thread():
    """Two CPU threads may sum floats in a different order from run to run (BoxTeacher's
    weights differ in the last bits after two iterations); one thread is exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_boxteacher_pictures_are_written_and_leave_training_unchanged(tmp_path, one_thread):
    with_pictures = train_boxteacher(tmp_path / "vis", vis_period=1)
    without = train_boxteacher(tmp_path / "plain", vis_period=0)

    # Student and teacher, parameters and buffers (BatchNorm statistics, mask_head._iter).
    assert with_pictures.keys() == without.keys()
    assert any(k.startswith("teacher.") and "running_mean" in k for k in with_pictures)
    different = [k for k in with_pictures if not torch.equal(with_pictures[k], without[k])]
    assert not different, different

    pictures = sorted(os.listdir(tmp_path / "vis/vis"))
    assert pictures == ["iter_0000000.png", "iter_0000001.png", "iter_0000002.png"]
    picture = cv2.imread(str(tmp_path / "vis/vis" / pictures[-1]))
    assert picture is not None and picture.shape[1] > 2 * picture.shape[0]  # three panels
    assert "training_visualization" in image_tags(tmp_path / "vis")

    assert not (tmp_path / "plain/vis").exists()
    assert image_tags(tmp_path / "plain") == []


def test_condinst_picture_has_two_panels_in_rgb(tiny_config):
    seed_all_rng(0)
    cfg = tiny_config
    model = build_model(cfg)
    model.train()
    batch = [sample(64, 96, [(10, 10, 40, 50)], [1])]
    batch[0]["image"][:, 60:, 80:] = torch.tensor([10, 20, 200], dtype=torch.uint8)[
        :, None, None
    ]  # BGR red
    with torch.no_grad(), preserved_model_state(model):
        outputs = network_outputs(model, batch, 0.3, architecture_spec(cfg))
    assert model.training

    picture = draw_training_picture(batch[0], outputs, ["a", "b", "c"], "BGR")
    title_height = picture.shape[0] - 64
    assert picture.shape[1] == 2 * 96 and title_height >= 0
    assert picture[title_height + 62, 94].tolist() == [200, 20, 10]  # RGB
    assert set(outputs["predictions"]) == {"boxes", "scores", "labels", "masks"}
    assert (outputs["predictions"]["scores"] >= 0.3).all()


def test_preserved_model_state_restores_modes_and_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model.eval()
    model[1].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with preserved_model_state(model):
        model.train()
        model(torch.randn(2, 3, 5, 5))
        assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    assert not model.training and not model[0].training and model[1].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
