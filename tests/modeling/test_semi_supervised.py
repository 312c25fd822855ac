"""BoxTeacher with unlabelled samples (``BoxTeacher(unlabeled=PseudoInstanceFilter(...))``): one
teacher pass, the labelled losses plus lambda_u times the losses on the pseudo instances."""

import pytest
import torch

from boxteacher.build import architecture_spec, build_model
from boxteacher.engine import Checkpointer
from boxteacher.engine.trainer import Trainer, build_training_data, train_teacher_first
from boxteacher.modeling.boxteacher import with_pseudo_instances, with_pseudo_labels
from boxteacher.modeling.pseudo_instances import PseudoInstanceFilter

from tiny_models import TINY_BOXTEACHER, tiny_cfg, two_view_batch

FILTER = PseudoInstanceFilter(score_high=0.3, score_low=0.1, min_mask_area=1)


def semi_model(unlabeled_start_iter=0):
    """A tiny BoxTeacher whose teacher detects (every location a candidate) in eval mode, so that
    its detections of an image do not depend on the rest of the batch."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*TINY_BOXTEACHER, "MODEL.FCOS.INFERENCE_TH_TEST", "0.0"))
    with torch.no_grad():
        model.teacher.proposal_generator.fcos_head.bbox_pred.bias.fill_(1.0)
    model.student.load_state_dict(model.teacher.state_dict())
    model.teacher_eval_mode = True
    model.unlabeled, model.unlabeled_weight = FILTER, 2.0
    model.unlabeled_start_iter = unlabeled_start_iter
    return model.train()


def semi_batch():
    labeled = two_view_batch(0)
    unlabeled = [
        {
            **x,
            "unlabeled": True,
            "instances": {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        }
        for x in two_view_batch(1)
    ]
    return labeled + unlabeled


def test_the_losses_are_the_labelled_ones_plus_lambda_u_times_the_pseudo_instance_ones():
    model = semi_model()
    batch = semi_batch()
    torch.manual_seed(1)
    losses = model(batch, iteration=5)

    torch.manual_seed(1)
    with torch.no_grad():
        predictions = model.teacher_view.forward_teacher(batch)
    labeled = model.student(
        with_pseudo_labels(batch[:2], model.assign(batch[:2], predictions[:2])), 5
    )
    instances = [FILTER(p) for p in predictions[2:]]
    assert (
        sum(len(i["labels"]) for i in instances) > 0
        and sum(len(i["ignore_boxes"]) for i in instances) > 0
    )
    # FCOS's normaliser of the unlabelled pass: at least the labelled positives per image
    positives = labeled["num_fcos_positives"].item()
    unlabeled = model.student(with_pseudo_instances(batch[2:], instances), 5, positives)
    for key, value in labeled.items():
        if key.startswith("loss"):
            torch.testing.assert_close(losses[key], value + 2.0 * unlabeled[key], msg=key)
    expected = [sum(len(i[k]) for i in instances) / 2 for k in ("labels", "ignore_boxes")]
    assert [
        losses["num_unlabeled_instances"].item(),
        losses["num_ignore_regions"].item(),
    ] == expected

    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    total.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())


def test_before_the_start_iteration_unlabelled_samples_sit_out():
    model = semi_model(unlabeled_start_iter=10)
    batch = semi_batch()
    torch.manual_seed(1)
    early = model(batch, iteration=9)
    torch.manual_seed(1)
    labeled_only = model(batch[:2], iteration=9)
    assert early.keys() == labeled_only.keys()
    for key in early:
        torch.testing.assert_close(early[key], labeled_only[key], msg=key)


def test_unlabelled_samples_need_a_filter_and_labelled_company():
    model = semi_model()
    with pytest.raises(ValueError, match="needs labelled samples"):
        model(semi_batch()[2:], iteration=0)
    model.unlabeled = None
    with pytest.raises(ValueError, match="no pseudo-instance filter"):
        model(semi_batch(), iteration=0)


def test_pseudo_instances_carry_what_the_student_learns_from():
    found = FILTER(
        {
            "boxes": torch.tensor([[0.0, 0, 8, 8], [2, 2, 6, 6]]),
            "scores": torch.tensor([0.9, 0.2]),
            "labels": torch.tensor([1, 2]),
            "mask_probs": torch.ones(2, 8, 8),
            "mask_scores": torch.tensor([0.7, 0.4]),
        }
    )
    (sample,) = with_pseudo_instances([{"image": torch.zeros(3, 8, 8), "unlabeled": True}], [found])
    instances = sample["instances"]
    assert set(instances) == {"boxes", "labels", "pseudo_masks", "pseudo_weights", "ignore_boxes"}
    assert instances["labels"].tolist() == [1] and instances["pseudo_weights"].tolist() == [
        pytest.approx(0.7)
    ]
    assert instances["ignore_boxes"].tolist() == [[2.0, 2, 6, 6]] and sample["unlabeled"]


def test_the_config_builds_the_filter_and_refuses_unlabelled_images_it_cannot_learn_from():
    cfg = tiny_cfg(
        *TINY_BOXTEACHER, "DATASETS.UNLABELED", "('shapes_val',)", "MODEL.SEMI.SCORE_HIGH", "0.6"
    )
    model = build_model(cfg)
    assert model.unlabeled == PseudoInstanceFilter(score_high=0.6, score_low=0.5, min_mask_area=5)
    assert model.unlabeled_weight == 2.0 and model.unlabeled_start_iter == 1
    assert build_model(tiny_cfg(*TINY_BOXTEACHER)).unlabeled is None
    with pytest.raises(ValueError, match="MODEL.SEMI.SCORE_LOW .* MODEL.SEMI.SCORE_HIGH"):
        build_model(
            tiny_cfg(
                *TINY_BOXTEACHER, "DATASETS.UNLABELED", "('x',)", "MODEL.SEMI.SCORE_LOW", "0.9"
            )
        )
    condinst = tiny_cfg(
        "DATASETS.TRAIN", "('shapes_train',)", "DATASETS.UNLABELED", "('shapes_val',)"
    )
    with pytest.raises(ValueError, match="DATASETS.UNLABELED is set, but CondInst does not learn"):
        build_training_data(condinst, architecture_spec(condinst), seed=0, start_iter=0)


def test_a_pretrained_teacher_is_loaded_and_kept_when_the_student_gets_its_weights(tmp_path):
    torch.manual_seed(1)
    trained = build_model(tiny_cfg("MODEL.BOXINST.ENABLED", "True"))
    torch.save({"model": trained.state_dict()}, tmp_path / "teacher.pth")
    torch.manual_seed(2)
    torch.save(
        {"model": build_model(tiny_cfg("MODEL.BOXINST.ENABLED", "True")).state_dict()},
        tmp_path / "student.pth",
    )
    semi = [
        *TINY_BOXTEACHER,
        "DATASETS.UNLABELED",
        "('shapes_val',)",
        "MODEL.SEMI.BURN_IN_ITERS",
        "5",
    ]
    model = build_model(
        tiny_cfg(*semi, "MODEL.SEMI.TEACHER_WEIGHTS", str(tmp_path / "teacher.pth"))
    )
    assert model.pretrained_teacher and model.unlabeled_start_iter == 0
    expected = trained.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.teacher.state_dict().items())
    Checkpointer(model).load(str(tmp_path / "student.pth"), checkpointables=[])
    assert all(torch.equal(v, expected[k]) for k, v in model.teacher.state_dict().items())
    assert not torch.equal(
        model.student.state_dict()["backbone.fpn.extra_blocks.p7.weight"],
        expected["backbone.fpn.extra_blocks.p7.weight"],
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["MODEL.SEMI.BURN_IN_ITERS", "5"],
        ["MODEL.SEMI.TEACHER_WEIGHTS", "t.pth"],
    ],
)
def test_burn_in_and_teacher_weights_go_together(overrides):
    with pytest.raises(
        ValueError, match="TEACHER_WEIGHTS and MODEL.SEMI.BURN_IN_ITERS > 0 go together"
    ):
        build_model(tiny_cfg(*TINY_BOXTEACHER, *overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["DATASETS.UNLABELED", "('shapes_val',)"],  # no burn-in
        ["MODEL.SEMI.BURN_IN_ITERS", "5"],  # no unlabelled images
        [
            *("DATASETS.UNLABELED", "('shapes_val',)", "MODEL.SEMI.BURN_IN_ITERS", "5"),
            *("MODEL.SEMI.TEACHER_WEIGHTS", "t.pth"),
        ],
    ],
)
def test_training_the_teacher_first_needs_a_burn_in_unlabelled_images_and_no_teacher_weights(
    overrides,
):
    cfg = tiny_cfg(*TINY_BOXTEACHER, "MODEL.SEMI.TRAIN_TEACHER", "True", *overrides)
    with pytest.raises(ValueError, match="MODEL.SEMI.TRAIN_TEACHER trains the teacher"):
        train_teacher_first(cfg, resume=False)


def test_with_train_teacher_the_model_builds_before_its_teacher_exists():
    """Stage 1 trains the teacher (train_teacher_first); the network builds without it (e.g. for
    an evaluation of the final weights with the same config)."""
    semi = [*TINY_BOXTEACHER, "DATASETS.UNLABELED", "('shapes_val',)"]
    model = build_model(
        tiny_cfg(*semi, "MODEL.SEMI.TRAIN_TEACHER", "True", "MODEL.SEMI.BURN_IN_ITERS", "5")
    )
    assert not model.pretrained_teacher


def test_evaluation_by_the_other_network_inside_the_block():
    model = build_model(tiny_cfg(*TINY_BOXTEACHER))
    assert model.inference_network == "teacher"
    with model.inference_by("student"):
        assert model.inference_network == "student" and not model.use_teacher_inference
    assert model.use_teacher_inference
    with pytest.raises(ValueError, match="'teacher' or 'student'"):
        with model.inference_by("ema"):
            pass


def test_evaluating_both_networks_needs_a_teacher_student_architecture(tmp_path):
    cfg = tiny_cfg(
        *("MODEL.BOX_TEACHER.EVAL_BOTH", "True", "DATASETS.TRAIN", "('shapes_train',)"),
        *("OUTPUT_DIR", str(tmp_path)),
    )
    with pytest.raises(ValueError, match="MODEL.BOX_TEACHER.EVAL_BOTH evaluates a teacher"):
        Trainer(cfg)


def test_unlabelled_images_without_pseudo_instances_weigh_as_labelled_background():
    """With no pseudo instance, every location of the unlabelled images is a negative: their
    classification loss is normalised by the labelled positives (as in one batch of both), not
    by one, which would push the student to detect nothing."""
    model = semi_model()
    model.unlabeled = PseudoInstanceFilter(score_high=1.0, score_low=1.0, min_mask_area=1)
    batch = semi_batch()
    torch.manual_seed(1)
    losses = model(batch, iteration=5)
    torch.manual_seed(1)
    with torch.no_grad():
        predictions = model.teacher_view.forward_teacher(batch)
    labeled = model.student(
        with_pseudo_labels(batch[:2], model.assign(batch[:2], predictions[:2])), 5
    )
    empty = with_pseudo_instances(batch[2:], [model.unlabeled(p) for p in predictions[2:]])
    alone = model.student(empty, 5)
    assert alone["num_fcos_positives"].item() == 0 and labeled["num_fcos_positives"].item() > 1
    expected = alone["loss_fcos_cls"] / labeled["num_fcos_positives"]
    torch.testing.assert_close(losses["loss_fcos_cls"], labeled["loss_fcos_cls"] + 2.0 * expected)
