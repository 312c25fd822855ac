"""``Predictor`` and ``build_trained_model``: the trained model of a config on one image in
memory, exactly as the evaluation runs it on that image read from its file."""

import cv2
import numpy as np
import pytest
import torch

from boxteacher.build import build_model
from boxteacher.data import DatasetMapper
from boxteacher.engine import Predictor, build_trained_model

from tiny_models import tiny_cfg

TEST_SIZE = [
    "INPUT.MIN_SIZE_TEST",
    "48",
    "INPUT.MAX_SIZE_TEST",
    "80",
    "MODEL.FCOS.INFERENCE_TH_TEST",
    "0.0",
]


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*TEST_SIZE))
    path = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path), model.state_dict()


@pytest.mark.parametrize("image_format", ["BGR", "RGB"])
def test_the_predictor_equals_the_evaluation_on_the_image_file(tmp_path, weights, image_format):
    path, _ = weights
    cfg = tiny_cfg(*TEST_SIZE, "INPUT.FORMAT", image_format, "MODEL.WEIGHTS", path)
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "image.png"), image)
    predictor = Predictor(cfg)
    ours = predictor(image)

    model = build_trained_model(cfg)
    record = {"file_name": str(tmp_path / "image.png"), "image_id": 1, "height": 60, "width": 90}
    with torch.no_grad():
        expected = model([DatasetMapper.from_config(cfg, is_train=False)(record)])[0]["instances"]
    assert ours.keys() == expected.keys() and len(ours["scores"]) > 0
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    assert ours["masks"].shape[1:] == (60, 90)


def test_build_trained_model_loads_the_weights_in_eval_mode_and_needs_them(weights):
    path, state = weights
    model = build_trained_model(tiny_cfg(*TEST_SIZE, "MODEL.WEIGHTS", path))
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        build_trained_model(tiny_cfg())


def test_the_predictor_takes_only_uint8_colour_images(weights):
    predictor = Predictor(tiny_cfg(*TEST_SIZE, "MODEL.WEIGHTS", weights[0]))
    for bad in (
        np.zeros((20, 30), np.uint8),
        np.zeros((20, 30, 4), np.uint8),
        np.zeros((20, 30, 3), np.float32),
    ):
        with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\) BGR"):
            predictor(bad)
