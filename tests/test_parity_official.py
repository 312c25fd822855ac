"""Parity with the official BoxTeacher / AdelaiDet implementation on the fixtures of
``$BOXTEACHER_FIXTURES`` (default ``../shared/fixtures``): every folder holding ``expected.pt``
runs; tolerances are those of the fixture README (section 10)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from boxteacher.build import build_model
from boxteacher.config import get_cfg
from boxteacher.engine import load_model_weights, read_model_weights

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("BOXTEACHER_FIXTURES", REPO.parent / "shared" / "fixtures"))
FOLDERS = sorted(p.name for p in FIXTURES.glob("*") if (p / "expected.pt").is_file()) if FIXTURES.is_dir() else []

pytestmark = pytest.mark.skipif(not FOLDERS, reason=f"no parity fixture in {FIXTURES}")


def build(folder, *overrides, network=None):
    """The fixture's model from Base-BoxTeacher.yaml + its config.yaml, with the official
    weights (float16 -> float32 on load); ``network`` ("student.") loads one of the two
    networks into a single-network model."""
    cfg = get_cfg()
    cfg.merge_from_file(str(REPO / "configs/Base-BoxTeacher.yaml"))
    cfg.merge_from_file(str(FIXTURES / folder / "config.yaml"))
    cfg.merge_from_list(list(overrides))
    model = build_model(cfg)
    state = read_model_weights(str(FIXTURES / folder / "model_final_fp16.pth"))["model"]
    if network:
        state = {k[len(network):]: v for k, v in state.items() if k.startswith(network)}
    missing, unexpected = load_model_weights(model, state, folder)
    assert not missing and not unexpected
    return model


@pytest.fixture(scope="module", params=FOLDERS)
def fixture(request):
    torch.set_num_threads(2)
    folder = FIXTURES / request.param
    return {
        "name": request.param,
        "inputs": torch.load(folder / "inputs.pt", weights_only=True),
        "expected": torch.load(folder / "expected.pt", weights_only=True),
    }


def one_image(inputs, i):
    return [{"image": inputs[f"image_{i}"], "height": inputs[f"height_{i}"], "width": inputs[f"width_{i}"]}]


def training_batch(inputs, aug=True, masks=False):
    batch = []
    for i in range(inputs["num_images"]):
        sample = one_image(inputs, i)[0]
        if aug:
            sample["aug_image"] = inputs[f"aug_image_{i}"]
        sample["instances"] = {"boxes": inputs[f"gt_boxes_{i}"], "labels": inputs[f"gt_classes_{i}"]}
        if masks:
            sample["instances"]["masks"] = inputs[f"gt_masks_{i}"]
        batch.append(sample)
    return batch


def assert_losses(losses, expected, prefix):
    for name, value in losses.items():
        if not name.startswith("loss"):
            continue
        reference = expected[f"{prefix}/{name}"].item()
        assert value.item() == pytest.approx(reference, rel=1e-4, abs=1e-5), name


def grad_norm(model):
    return torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm().item()


def check_detections(result, expected, prefix, width):
    """Detections matched by (level, location, class) are the same set; boxes, scores and masks
    agree within the README's tolerances."""
    ours = {(int(lv), int(x), int(y), int(c)): k for k, (lv, (x, y), c) in enumerate(zip(
        result["fpn_levels"], result["locations"].tolist(), result["labels"]))}
    keys = [(int(lv), int(x), int(y), int(c)) for lv, (x, y), c in zip(
        expected[f"{prefix}/fpn_levels"], expected[f"{prefix}/locations"].tolist(), expected[f"{prefix}/classes"])]
    assert sorted(ours) == sorted(keys)
    index = torch.tensor([ours[k] for k in keys])
    torch.testing.assert_close(result["boxes"][index], expected[f"{prefix}/boxes"], atol=5e-3, rtol=0)
    torch.testing.assert_close(result["scores"][index], expected[f"{prefix}/scores"], atol=1e-4, rtol=0)
    masks = np.unpackbits(expected[f"{prefix}/masks_packed"].numpy(), axis=-1, count=width).astype(bool)
    agreement = (result["masks"][index].numpy() == masks).reshape(len(keys), -1).mean(axis=1)
    assert agreement.min() >= 0.999


def detections_with_keys(model, inputs, i):
    """Inference output of one image plus the FCOS keys of its detections."""
    sample = one_image(inputs, i)
    result = model(sample)[0]["instances"]
    images, sizes = model.preprocess(sample)
    raw = model.detect(images)[0]
    h, w = sizes[0]
    kept = (raw["boxes"][:, 2].clamp(0, w) > raw["boxes"][:, 0].clamp(0, w)) & (
        raw["boxes"][:, 3].clamp(0, h) > raw["boxes"][:, 1].clamp(0, h))
    return {**result, "fpn_levels": raw["fpn_levels"][kept], "locations": raw["locations"][kept]}


@torch.no_grad()
def test_parity_student_and_teacher_inference(fixture):
    inputs, expected = fixture["inputs"], fixture["expected"]
    model = build(fixture["name"])
    model.eval()
    for network, section in ((model.student, "a"), (model.teacher, "b")):
        for i in range(inputs["num_images"]):
            if section == "a":
                images, _ = network.preprocess(one_image(inputs, i))
                mask_feats, outputs, top_feats, _ = network.run_heads(images)
                torch.testing.assert_close(mask_feats, expected[f"a/img{i}/mask_feats"], atol=2e-4, rtol=1e-5)
                for level in range(len(outputs.logits)):
                    head = f"a/img{i}/head/p{level + 3}"
                    torch.testing.assert_close(outputs.logits[level], expected[f"{head}/cls_logits"], atol=2e-4, rtol=1e-5)
                    torch.testing.assert_close(outputs.bbox_reg[level], expected[f"{head}/bbox_reg"], atol=5e-4, rtol=0)
                    torch.testing.assert_close(top_feats[level], expected[f"{head}/top_feats"], atol=2e-4, rtol=1e-5)
            result = detections_with_keys(network, inputs, i)
            check_detections(result, expected, f"{section}/img{i}/det", inputs[f"width_{i}"])
    # The BoxTeacher model itself evaluates with the teacher.
    result = model(one_image(inputs, 0))[0]["instances"]
    teacher_result = model.teacher(one_image(inputs, 0))[0]["instances"]
    assert torch.equal(result["scores"], teacher_result["scores"])


@pytest.mark.parametrize("legacy, prefix", [(True, "c"), (False, "c/fixed")])
def test_parity_boxteacher_training_step(fixture, legacy, prefix):
    inputs, expected = fixture["inputs"], fixture["expected"]
    model = build(fixture["name"], "MODEL.BOX_TEACHER.LEGACY_ASSIGNMENT", str(legacy))
    model.train()
    losses = model(training_batch(inputs))
    assert_losses(losses, expected, f"{prefix}/losses")
    assert losses["num_pseudo_masks"].item() == expected[f"{prefix}/num_pseudo_masks"].item()
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert grad_norm(model) == pytest.approx(expected[f"{prefix}/grad_norm_total"].item(), rel=1e-4)
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.mask_head._iter.item() == expected["c/after/student_iter"].item()
    assert model.teacher.mask_head._iter.item() == expected["c/after/teacher_iter"].item()


@pytest.mark.parametrize("boxinst", [True, False], ids=["boxinst", "condinst"])
def test_parity_adelaidet_boxinst_and_condinst_losses(fixture, boxinst):
    inputs, expected = fixture["inputs"], fixture["expected"]
    model = build(fixture["name"], "MODEL.META_ARCHITECTURE", "CondInst", "MODEL.BOXINST.ENABLED", str(boxinst),
                  network="student.")
    model.train()
    losses = model(training_batch(inputs, aug=False, masks=not boxinst))
    section = "d/boxinst" if boxinst else "d/condinst"
    assert_losses(losses, expected, f"{section}/losses")
    sum(losses.values()).backward()
    assert grad_norm(model) == pytest.approx(expected[f"{section}/grad_norm_total"].item(), rel=1e-4)
