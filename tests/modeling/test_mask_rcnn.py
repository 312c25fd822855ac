"""torchvision's Mask R-CNN as a detector of the project and as BoxTeacher's student and teacher:
the RoI-grid losses, the pasting of RoI masks, the teacher protocol, training steps, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import maskrcnn_loss, project_masks_on_boxes

from boxteacher.build import build_model
from boxteacher.config import load_config
from boxteacher.engine.checkpoint import load_model_weights
from boxteacher.modeling.boxteacher import with_pseudo_labels
from boxteacher.modeling.mask_rcnn import MaskRCNN, MaskRCNNTeacherView
from boxteacher.modeling.roi_masks import (
    RoIMaskSupervision,
    box_masks_in_rois,
    paste_roi_maps,
)
from boxteacher.modeling.teacher import TeacherPass

from tiny_models import key_values, sample, tiny_cfg, two_view_batch

MASK_RCNN = key_values(
    {
        "MODEL.META_ARCHITECTURE": "MaskRCNN",
        "MODEL.RESNETS.STEM_OUT_CHANNELS": "64",
        "MODEL.RESNETS.RES2_OUT_CHANNELS": "64",
        "MODEL.FPN.OUT_CHANNELS": "16",
        "MODEL.ROI_BOX_HEAD.FC_DIM": "32",
        "MODEL.ROI_MASK_HEAD.CONV_DIM": "16",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST": "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "32",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": "0.0",
        "INPUT.MIN_SIZE_TEST": "64",
        "INPUT.MAX_SIZE_TEST": "64",
    }
)
BOXTEACHER = MASK_RCNN + key_values(
    {
        "MODEL.META_ARCHITECTURE": "BoxTeacher",
        "MODEL.BOX_TEACHER.STUDENT": "MaskRCNN",
        "MODEL.BOXINST.ENABLED": True,
    }
)


def masked_batch() -> list[dict]:
    return [
        sample(64, 64, [(8, 8, 40, 40), (30, 30, 60, 60)], [0, 2], seed=1),
        sample(48, 64, [(4, 4, 30, 40)], [1], seed=2),
    ]


def test_pasted_roi_maps_fill_their_box_and_nothing_beyond_one_cell():
    boxes = torch.tensor([[10.0, 20.0, 38.0, 48.0]])
    pasted = paste_roi_maps(torch.ones(1, 28, 28), boxes, (64, 64))[0]
    assert torch.allclose(
        pasted[21:47, 11:37], torch.ones(26, 26)
    )  # inside: one cell per pixel here
    assert pasted[:19].abs().max() == 0 and pasted[:, 39:].abs().max() == 0
    ramp = torch.arange(28.0).repeat(28, 1)  # value = column index
    pasted = paste_roi_maps(ramp[None], boxes, (64, 64))[0]
    assert torch.allclose(pasted[30, 11:37], torch.arange(1.0, 27.0))  # pixel x reads cell x - 10


def test_box_masks_on_the_roi_grid():
    rois = torch.tensor([[0.0, 0.0, 28.0, 28.0]])
    inside = box_masks_in_rois(rois, torch.tensor([[0.0, 0.0, 14.0, 28.0]]), 28)[0]
    assert inside[:, :14].all() and not inside[:, 14:].any()


def test_mask_loss_with_every_instance_masked_is_torchvisions():
    torch.manual_seed(0)
    masks = [torch.rand(2, 40, 50) > 0.5, torch.rand(1, 30, 30) > 0.5]
    rois = [
        torch.tensor([[2.0, 3.0, 30.0, 35.0], [0.0, 0.0, 49.0, 39.0], [5.0, 5.0, 20.0, 20.0]]),
        torch.tensor([[1.0, 1.0, 25.0, 28.0]]),
    ]
    matched = [torch.tensor([0, 1, 1]), torch.tensor([0])]
    logits = torch.randn(4, 3, 28, 28)
    labels = [torch.tensor([1, 2, 2]), torch.tensor([1])]  # of the matched instances
    expected = maskrcnn_loss(
        logits, rois, masks, [torch.tensor([1, 2]), torch.tensor([1])], matched
    )
    instances = [
        {"boxes": torch.zeros(2, 4), "masks": masks[0]},
        {"boxes": torch.zeros(1, 4), "masks": masks[1]},
    ]
    ours = RoIMaskSupervision(mask_key="masks").losses(
        logits[torch.arange(4), torch.cat(labels)],
        torch.cat(rois),
        [0, 0, 0, 1],
        torch.cat(matched),
        instances,
        [],
        0,
    )
    assert torch.allclose(ours["loss_mask"], expected)


def test_pseudo_mask_loss_is_weighted_per_instance_and_skips_instances_without_one():
    torch.manual_seed(0)
    logits = torch.randn(3, 28, 28)
    rois = torch.tensor([[0.0, 0.0, 28.0, 28.0]] * 3)
    pseudo = torch.zeros(2, 28, 28)
    pseudo[0, 5:20, 5:20] = 1
    pseudo[1, :, :10] = 1
    instances = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 28.0, 28.0]] * 2),
            "pseudo_masks": pseudo,
            "pseudo_weights": torch.tensor([0.25, 0.0]),
        }
    ]
    supervision = RoIMaskSupervision(mask_key="pseudo_masks")
    losses = supervision.losses(logits, rois, [0, 0, 0], torch.tensor([0, 0, 1]), instances, [], 0)
    targets = project_masks_on_boxes(
        pseudo, rois[:2], torch.tensor([0, 0]), 28
    )  # as torchvision samples masks
    per_roi = F.binary_cross_entropy_with_logits(logits[:2], targets, reduction="none").mean(
        dim=(1, 2)
    )
    assert torch.allclose(losses["loss_mask"], 0.25 * per_roi.sum() / 2)
    instances[0]["pseudo_masks"] = torch.stack(
        [pseudo[0], 1 - pseudo[1]]
    )  # the weight-0 instance changes
    again = supervision.losses(logits, rois, [0, 0, 0], torch.tensor([0, 0, 1]), instances, [], 0)
    assert torch.equal(again["loss_mask"], losses["loss_mask"])


def test_supervision_refuses_to_learn_nothing():
    with pytest.raises(ValueError, match="mask targets or the box terms"):
        RoIMaskSupervision(mask_key=None)


def test_mask_rcnn_trains_evaluates_and_round_trips_a_checkpoint():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*MASK_RCNN))
    assert isinstance(model, MaskRCNN)
    model.train()
    losses = model(masked_batch(), iteration=0)
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    sum(losses.values()).backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    model.eval()
    batch = [{**s, "height": 96, "width": 128} for s in masked_batch()]
    out = model(batch)[0]["instances"]
    assert out["masks"].shape[1:] == (96, 128) and out["masks"].dtype == torch.bool
    assert out["labels"].max() < 3 and len(out["boxes"]) == len(out["scores"]) > 0
    torch.manual_seed(1)
    other = build_model(tiny_cfg(*MASK_RCNN)).eval()
    load_model_weights(other, {"model": model.state_dict()}, "memory")
    again = other(batch)[0]["instances"]
    assert torch.equal(again["boxes"], out["boxes"]) and torch.equal(again["masks"], out["masks"])


def test_mask_rcnn_from_boxes_learns_from_the_box_terms():
    model = build_model(tiny_cfg(*MASK_RCNN, "MODEL.BOXINST.ENABLED", "True")).train()
    batch = [
        {**s, "instances": {k: v for k, v in s["instances"].items() if k != "masks"}}
        for s in masked_batch()
    ]
    losses = model(batch, iteration=0)
    assert {"loss_prj", "loss_pairwise"} <= set(losses) and "loss_mask" not in losses
    assert losses["loss_prj"] > 0


def test_mask_rcnn_teacher_view_follows_the_protocol():
    torch.manual_seed(0)
    detector = build_model(tiny_cfg(*MASK_RCNN))
    detector.train()
    view = MaskRCNNTeacherView(detector, TeacherPass(min_size=64, max_size=64, post_nms_topk=10))
    batch = two_view_batch()
    outputs = view.forward_teacher(batch)
    assert detector.training  # its mode is restored
    for out, s in zip(outputs, batch):
        m = out["boxes"].shape[0]
        assert 0 < m <= 10
        assert out["mask_probs"].shape == (m, *s["image"].shape[-2:])
        assert out["scores"].shape == out["mask_scores"].shape == (m,)
        h, w = s["image"].shape[-2:]
        assert (out["boxes"][:, 2] <= w).all() and (out["boxes"][:, 3] <= h).all()
        assert (out["mask_probs"] >= 0).all() and (out["mask_probs"] <= 1 + 1e-6).all()


def test_boxteacher_with_a_mask_rcnn_student_trains_on_its_pseudo_masks():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*BOXTEACHER))
    assert isinstance(model.student, MaskRCNN) and isinstance(model.teacher, MaskRCNN)
    assert isinstance(model.teacher_view, MaskRCNNTeacherView)
    model.train()
    batch = two_view_batch()
    labels = model.pseudo_label(batch)
    assert [tuple(x["masks"].shape) for x in labels] == [(2, 64, 64), (1, 48, 64)]
    losses = model.student(with_pseudo_labels(batch, labels), iteration=10000)
    assert {"loss_mask", "loss_mask_affinity", "loss_prj", "loss_pairwise"} <= set(losses)
    total = model(batch, iteration=0)
    sum(v for k, v in total.items() if k.startswith("loss")).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


def trained_network_files(
    tmp_path, overrides: list[str], name: str
) -> tuple[str, str, torch.nn.Module]:
    """A config file and a weight file of a network of ``overrides`` (as a trained one would
    leave), and the network."""
    cfg = tiny_cfg(*overrides)
    network = build_model(cfg)
    config_file, weights = tmp_path / f"{name}.yaml", tmp_path / f"{name}.pth"
    config_file.write_text(cfg.dump())
    torch.save({"model": network.state_dict()}, weights)
    return str(config_file), str(weights), network


@pytest.mark.parametrize("teacher, student", [("CondInst", "MaskRCNN"), ("MaskRCNN", "CondInst")])
def test_a_frozen_teacher_of_another_detector_teaches_a_student(tmp_path, teacher, student):
    from boxteacher.build import architecture_spec
    from boxteacher.modeling.meta_arch import CondInst

    torch.manual_seed(0)
    teacher_overrides = (
        MASK_RCNN if teacher == "MaskRCNN" else ["MODEL.META_ARCHITECTURE", "CondInst"]
    )
    config_file, weights, trained = trained_network_files(tmp_path, teacher_overrides, teacher)
    student_overrides = MASK_RCNN if student == "MaskRCNN" else []
    cfg = tiny_cfg(
        *student_overrides,
        "MODEL.META_ARCHITECTURE",
        "BoxTeacher",
        "MODEL.BOXINST.ENABLED",
        "True",
        "MODEL.BOX_TEACHER.STUDENT",
        student,
        "MODEL.BOX_TEACHER.TEACHER_CONFIG",
        config_file,
        "MODEL.BOX_TEACHER.TEACHER_WEIGHTS",
        weights,
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
    )
    assert not architecture_spec(cfg).ema_teacher  # no EMA hook
    model = build_model(cfg)
    kinds = {"CondInst": CondInst, "MaskRCNN": MaskRCNN}
    assert isinstance(model.teacher, kinds[teacher]) and isinstance(model.student, kinds[student])
    for name, value in trained.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[name], value), name
    model.train()
    losses = model(two_view_batch(), iteration=5000)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert "loss_mask" in losses and all(p.grad is None for p in model.teacher.parameters())
    model.on_weights_loaded(
        ["student.x"]
    )  # a one-network checkpoint does not overwrite the teacher
    assert all(
        torch.equal(model.teacher.state_dict()[k], v) for k, v in trained.state_dict().items()
    )
    model.eval()
    assert (
        not model.use_teacher_inference
    )  # the frozen teacher is not what trains: the student is evaluated
    again = build_model(cfg)
    load_model_weights(again, {"model": model.state_dict()}, "memory")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_frozen_teacher_needs_its_weights(tmp_path):
    config_file, _, _ = trained_network_files(
        tmp_path, ["MODEL.META_ARCHITECTURE", "CondInst"], "teacher"
    )
    cfg = tiny_cfg(*BOXTEACHER, "MODEL.BOX_TEACHER.TEACHER_CONFIG", config_file)
    with pytest.raises(ValueError, match="MODEL.BOX_TEACHER.TEACHER_WEIGHTS"):
        build_model(cfg)


def test_an_unknown_student_names_the_key():
    with pytest.raises(ValueError, match="MODEL.BOX_TEACHER.STUDENT"):
        build_model(tiny_cfg(*BOXTEACHER, "MODEL.BOX_TEACHER.STUDENT", "YOLO"))


# ---------------------------------------------------------------------------------------------
# The tools, with no case of their own for Mask R-CNN
# ---------------------------------------------------------------------------------------------
def write_shapes(folder) -> dict:
    """Two images with a filled rectangle each and their COCO json (category id 5)."""
    import cv2
    import numpy as np

    folder.mkdir()
    images, annotations = [], []
    for image_id, (h, w, box) in enumerate(
        [(64, 80, (10, 12, 40, 44)), (72, 64, (20, 8, 56, 40))], start=1
    ):
        pixels = np.full((h, w, 3), 30, np.uint8)
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = (0, 180, 240)
        cv2.imwrite(str(folder / f"{image_id}.png"), pixels)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        annotations.append(
            {
                "id": 10 * image_id,
                "image_id": image_id,
                "category_id": 5,
                "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
            }
        )
    return {"images": images, "annotations": annotations, "categories": [{"id": 5, "name": "box"}]}


def test_a_mask_rcnn_config_exports_pseudo_masks_with_its_own_network(tmp_path):
    """A one-network Mask R-CNN config labels with a Mask R-CNN teacher (in eval mode) holding the
    checkpoint's weights, through the exporter every detector uses."""
    from boxteacher.build import build_pseudo_labelling_model
    from boxteacher.engine.checkpoint import Checkpointer
    from boxteacher.pseudo_export import ExportSettings, PseudoMaskExporter

    torch.manual_seed(0)
    _, weights, trained = trained_network_files(tmp_path, MASK_RCNN, "maskrcnn")
    # A low assignment IoU: the randomly initialised teacher's detections then match the boxes.
    model = build_pseudo_labelling_model(tiny_cfg(*MASK_RCNN, "MODEL.BOX_TEACHER.IOU_THR", "0.05"))
    assert isinstance(model.teacher, MaskRCNN) and isinstance(
        model.teacher_view, MaskRCNNTeacherView
    )
    assert model.teacher_eval_mode
    Checkpointer(model).load(weights, checkpointables=[])
    assert all(
        torch.equal(model.teacher.state_dict()[k], v) for k, v in trained.state_dict().items()
    )
    data = write_shapes(tmp_path / "images")
    result = PseudoMaskExporter(model, ExportSettings()).export(data, str(tmp_path / "images"))
    exported = result.data["annotations"]
    assert [a["id"] for a in exported] == [10, 20] and all(
        a["pseudo_mask_matched"] for a in exported
    )
    for ann, image in zip(exported, data["images"]):
        assert ann["segmentation"]["size"] == [image["height"], image["width"]]


def test_the_demo_and_the_training_pictures_of_a_mask_rcnn(tmp_path):
    import json

    from boxteacher.build import architecture_spec
    from boxteacher.demo import run_demo
    from boxteacher.engine import Predictor
    from boxteacher.engine.visualization import (
        draw_training_picture,
        network_outputs,
        preserved_model_state,
    )

    config_file, weights, _ = trained_network_files(
        tmp_path, [*MASK_RCNN, "DATASETS.TEST", "()"], "maskrcnn"
    )
    write_shapes(tmp_path / "images")
    predictor = Predictor(load_config(config_file, ["MODEL.WEIGHTS", weights]))
    assert (
        run_demo(predictor, [str(tmp_path / "images" / "1.png")], str(tmp_path / "out"), 0.0)[0]
        == 1
    )
    recorded = json.loads((tmp_path / "out/results.json").read_text())
    assert recorded and all(r["segmentation"]["size"] == [64, 80] for r in recorded)
    assert (tmp_path / "out/1.png").is_file()

    torch.manual_seed(0)
    cfg = tiny_cfg(*BOXTEACHER)
    model = build_model(cfg).train()
    batch = two_view_batch()
    with torch.no_grad(), preserved_model_state(model):
        outputs = network_outputs(model, batch, 0.0, architecture_spec(cfg))
    picture = draw_training_picture(batch[0], outputs, ["a", "b", "c"], "BGR")
    assert (
        picture.shape[1] == 3 * batch[0]["image"].shape[-1]
    )  # ground truth, pseudo labels, predictions
    assert outputs["pseudo_labels"]["masks"].shape[0] == len(batch[0]["instances"]["boxes"])
