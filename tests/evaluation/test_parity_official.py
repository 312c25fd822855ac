"""Parity with the official BoxTeacher / AdelaiDet implementation on the fixtures of
``$BOXTEACHER_FIXTURES`` (default ``../shared/fixtures``): every folder holding ``expected.pt``
runs, every recorded quantity must be within the tolerance of the fixtures' README (section
10). The comparisons are those of ``boxteacher.evaluation.parity``, which ``tools/parity_report.py``
prints as a table (fixture reading and tolerances: ``boxteacher.evaluation.parity_fixtures``)."""

import pytest
import torch

from boxteacher.evaluation.parity import (
    compare_adelaidet,
    compare_inference,
    compare_training,
    format_table,
)
from boxteacher.evaluation.parity_fixtures import (
    Fixture,
    fixture_folders,
    fixtures_root,
)

from tiny_models import REPO

ROOT = fixtures_root(REPO.parent / "shared" / "fixtures")
FOLDERS = fixture_folders(ROOT)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FOLDERS, reason=f"no parity fixture in {ROOT}"),
]


@pytest.fixture(scope="module", params=FOLDERS, ids=lambda folder: folder.name)
def fixture(request):
    torch.set_num_threads(2)
    return Fixture.load(request.param, REPO / "configs" / "Base-BoxTeacher.yaml")


def assert_within_tolerance(rows, required):
    quantities = {r.quantity for r in rows}
    assert required <= quantities, required - quantities
    out_of_tolerance = [r for r in rows if not r.ok]
    assert not out_of_tolerance, "\n" + format_table(out_of_tolerance)


def test_parity_student_and_teacher_inference(fixture):
    assert_within_tolerance(
        compare_inference(fixture),
        {
            "ResNet outputs",
            "FPN outputs",
            "head cls_logits",
            "head bbox_reg",
            "head ctrness",
            "head top_feats",
            "mask_feats",
            "detection set (level, location, class)",
            "boxes (px)",
            "scores (mask-aware)",
            "mask_probs stride 4",
            "binary masks",
            "BoxTeacher evaluates with its teacher",
        },
    )


@pytest.mark.parametrize(
    "legacy", [True, False], ids=["official_assignment", "corrected_assignment"]
)
def test_parity_boxteacher_training_step(fixture, legacy):
    required = {
        "loss_mask",
        "loss_mask_affinity",
        "loss_prj",
        "loss_pairwise",
        "total loss",
        "num_pseudo_masks",
        "assignment weights",
        "total gradient norm",
        "teacher parameters without gradient",
    }
    if legacy:
        required |= {
            "student mask logits",
            "teacher detection set (level, location, class)",
            "teacher ranking scores",
            "mask-branch BN statistics after the step",
            "mask_head._iter after the step",
        }
    assert_within_tolerance(compare_training(fixture, legacy), required)


@pytest.mark.parametrize("boxinst", [True, False], ids=["boxinst", "condinst"])
def test_parity_adelaidet_boxinst_and_condinst_losses(fixture, boxinst):
    required = {
        "loss_fcos_cls",
        "loss_fcos_loc",
        "loss_fcos_ctr",
        "total loss",
        "total gradient norm",
    }
    required |= {"loss_prj", "loss_pairwise"} if boxinst else {"loss_mask"}
    assert_within_tolerance(compare_adelaidet(fixture, boxinst), required)
