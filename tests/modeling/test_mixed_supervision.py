"""Mixed supervision (MODEL.BOXINST.GT_MASKS): masks where the data has them, boxes elsewhere, for
BoxInst and BoxTeacher: config checks, mapper, choice of the masked images, losses, pseudo
labels and a short training run."""

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from boxteacher.build import architecture_spec, build_model
from boxteacher.config import ArchitectureSpec
from boxteacher.config.supervision import gt_mask_mode
from boxteacher.data import DatasetMapper
from boxteacher.data.catalog import get_dataset_records
from boxteacher.data.mask_subset import (
    keep_masks_of,
    restrict_masks_to_fraction,
    select_mask_images,
)
from boxteacher.engine import setup_config
from boxteacher.engine.trainer import Trainer
from boxteacher.modeling.losses import dice_loss
from boxteacher.modeling.supervision import SupervisionKind
from boxteacher.utils.env import seed_all_rng

from tiny_models import REPO, label_one, sample, tiny_cfg

BOXINST_CONFIG = str(REPO / "configs/quickstart/boxinst_shapes.yaml")
BOXTEACHER_CONFIG = str(REPO / "configs/quickstart/boxteacher_shapes.yaml")
BOX_LOSSES = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_prj", "loss_pairwise"}
PSEUDO_LOSSES = {"loss_mask", "loss_mask_affinity", "num_pseudo_masks"}


def mixed_model(arch="boxinst", *overrides):
    options = [
        "MODEL.BOXINST.ENABLED",
        "True",
        "MODEL.BOXINST.GT_MASKS",
        "present",
        "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS",
        "1",
    ]
    if arch == "boxteacher":
        options += [
            "MODEL.META_ARCHITECTURE",
            "BoxTeacher",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "MODEL.BOX_TEACHER.WARMUP_ITERS",
            "1",
            "MODEL.FCOS.INFERENCE_TH_TEST",
            "0.0",
        ]
    return build_model(tiny_cfg(*options, *overrides))


def with_masks(x, has_mask):
    """``x`` whose instances' masks are annotation masks where ``has_mask`` (the left quarter of
    each box cut away, so that a mask is not its box) and all-False rows elsewhere."""
    instances = dict(x["instances"])
    masks = instances["masks"].clone()
    for mask, box in zip(masks, instances["boxes"]):
        x0, _, x1, _ = box.int().tolist()
        mask[:, x0 : x0 + (x1 - x0) // 4] = False
    has_mask = torch.tensor(has_mask, dtype=torch.bool).reshape(-1)
    instances["masks"] = masks & has_mask[:, None, None]
    instances["has_mask"] = has_mask
    return {**x, "instances": instances, "aug_image": 255 - x["image"]}


def two_images(masked_first, masked_second):
    return [
        with_masks(sample(64, 64, [(8, 8, 40, 40), (30, 30, 60, 60)], [0, 1]), masked_first),
        with_masks(sample(48, 64, [(4, 4, 30, 40)], [2], seed=1), masked_second),
    ]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, key",
    [
        (
            ["MODEL.BOXINST.ENABLED", "True", "MODEL.BOXINST.GT_MASKS", "some"],
            "MODEL.BOXINST.GT_MASKS",
        ),
        (
            ["MODEL.BOXINST.ENABLED", "True", "MODEL.BOXINST.GT_MASK_FRACTION", "1.5"],
            "MODEL.BOXINST.GT_MASK_FRACTION",
        ),
        (["MODEL.BOXINST.GT_MASKS", "present"], "MODEL.BOXINST.GT_MASKS"),  # CondInst
    ],
)
def test_bad_settings_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        build_model(tiny_cfg(*overrides))


def test_the_mapper_rasterises_masks_only_in_mixed_supervision():
    def mapper(*overrides):
        cfg = tiny_cfg("MODEL.BOXINST.ENABLED", "True", "DATASETS.TRAIN", "()", *overrides)
        return DatasetMapper.from_config(cfg, is_train=True, spec=architecture_spec(cfg))

    assert not mapper().with_masks
    assert mapper("MODEL.BOXINST.GT_MASKS", "present").masks_optional
    assert mapper("MODEL.BOXINST.GT_MASKS", "fraction").with_masks
    assert gt_mask_mode(tiny_cfg(), ArchitectureSpec()) == "ignore"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_the_mapper_keeps_masks_only_where_present(tmp_path):
    cv2.imwrite(str(tmp_path / "image.png"), np.full((60, 100, 3), 90, np.uint8))
    record = {
        "file_name": str(tmp_path / "image.png"),
        "image_id": 3,
        "height": 60,
        "width": 100,
        "annotations": [
            {
                "bbox": [10.0, 10.0, 40.0, 30.0],
                "category_id": 0,
                "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]],
            },
            {"bbox": [60.0, 30.0, 30.0, 20.0], "category_id": 1},
            {"bbox": [5.0, 40.0, 20.0, 10.0], "category_id": 1, "segmentation": []},
        ],
    }
    before = copy.deepcopy(record)
    mapper = DatasetMapper(
        True, min_sizes=(120,), max_size=1000, with_masks=True, masks_optional=True
    )
    outputs = [mapper(record, np.random.default_rng(seed)) for seed in range(8)]
    assert record == before
    flips = set()
    for out in outputs:
        inst = out["instances"]
        assert inst["has_mask"].tolist() == [True, False, False]
        assert inst["masks"].shape == (3, 120, 200) and inst["masks"].dtype == torch.bool
        assert not inst["masks"][1:].any()  # never a mask made from a box
        ys, xs = np.nonzero(inst["masks"][0].numpy())
        np.testing.assert_allclose(
            [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], inst["boxes"][0], atol=1.5
        )
        flips.add(bool(inst["boxes"][0, 0] > 100))
    assert flips == {False, True}  # aligned with and without a flip
    with pytest.raises(ValueError, match="masks_optional"):
        DatasetMapper(True, min_sizes=(120,), max_size=1000, with_masks=False, masks_optional=True)


def records_with_masks():
    """10 images: 0-7 with an annotation mask (image 7's is a crowd region's only, so 7 do)."""
    polygon = [[0, 0, 4, 0, 4, 4]]
    records = []
    for i in range(10):
        annotations = [{"bbox": [0, 0, 4, 4], "category_id": 0, "iscrowd": int(i == 7)}]
        if i < 8:
            annotations[0]["segmentation"] = polygon
        annotations.append({"bbox": [5, 5, 4, 4], "category_id": 0})  # box only
        records.append(
            {
                "image_id": 100 + i,
                "file_name": f"{i}.png",
                "height": 10,
                "width": 10,
                "annotations": annotations,
            }
        )
    return records


def test_the_masked_images_are_chosen_by_the_seed_and_saved(tmp_path):
    records = records_with_masks()
    before = copy.deepcopy(records)
    chosen = select_mask_images(records, 0.5, seed=3)
    assert len(chosen) == round(0.5 * 7) and set(chosen) <= {100 + i for i in range(7)}
    assert chosen == select_mask_images(records, 0.5, seed=3)
    assert any(select_mask_images(records, 0.5, seed=s) != chosen for s in (4, 5))
    assert (
        select_mask_images(records, 0.0, 3) == [] and len(select_mask_images(records, 1.0, 3)) == 7
    )

    restricted = restrict_masks_to_fraction(records, 0.5, 3, str(tmp_path))
    assert records == before
    saved = json.loads((tmp_path / "mask_image_ids.json").read_text())
    assert saved == {"fraction": 0.5, "seed": 3, "num_images_with_masks": 7, "image_ids": chosen}
    assert restricted == keep_masks_of(records, chosen)
    for record in restricted:
        kept = any("segmentation" in a for a in record["annotations"])
        assert kept == (record["image_id"] in chosen)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def spy_on_mask_losses(model) -> dict:
    """What the model's mask supervision is given in its next training forward (``logits``,
    ``sampled``, ``targets``)."""
    seen = {}
    losses = model.supervision.losses

    def spy(logits, sampled, targets, iteration):
        seen.update(logits=logits, sampled=sampled, targets=targets)
        return losses(logits, sampled, targets, iteration)

    model.supervision.losses = spy
    return seen


def test_every_instance_masked_reproduces_condinst_loss_mask():
    torch.manual_seed(0)
    mixed = mixed_model()
    condinst = build_model(tiny_cfg())
    condinst.load_state_dict(mixed.state_dict())
    mixed.train()
    condinst.train()
    batch = two_images([True, True], [True])
    seen = spy_on_mask_losses(mixed)
    losses = mixed(batch, iteration=0)
    assert seen["sampled"]["gt_inds"].numel() > 0
    images, sizes = condinst.preprocess(batch)
    gt = [condinst._instances_to_device(x) for x in batch]
    targets = condinst.mask_targets(batch, gt, images.shape[-2:], sizes)
    expected = condinst.supervision.losses(seen["logits"], seen["sampled"], targets, 0)["loss_mask"]
    torch.testing.assert_close(losses["loss_gt_mask"], expected)
    assert losses["loss_gt_mask"].item() > 0
    # The box terms cover the box-only instances: none here.
    assert losses["loss_prj"].item() == 0 and losses["loss_prj"].requires_grad


@pytest.mark.parametrize("arch", ["boxinst", "boxteacher"])
@pytest.mark.parametrize("masked", [False, True], ids=["boxes-only", "masks-only"])
def test_a_batch_of_box_only_or_of_masked_instances_trains(arch, masked):
    torch.manual_seed(0)
    model = mixed_model(arch)
    model.train()
    losses = model(two_images([masked, masked], [masked]), iteration=0)
    counts = {"num_gt_masks", "num_box_only"} | (
        {"num_teacher_masks"} if arch == "boxteacher" else set()
    )
    pseudo = PSEUDO_LOSSES if arch == "boxteacher" else set()
    assert (
        set(losses) == BOX_LOSSES | {"loss_gt_mask", "num_fcos_positives"} | counts | pseudo
    )  # the same set every batch
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["num_gt_masks"].item() == (3 if masked else 0)
    by_teacher = losses["num_teacher_masks"].item() if arch == "boxteacher" else 0
    assert losses["num_box_only"].item() + by_teacher == (0 if masked else 3)
    unused = ("loss_prj", "loss_pairwise") if masked else ("loss_gt_mask",)
    for name in unused:
        assert losses[name].item() == 0.0 and losses[name].requires_grad
    used = "loss_gt_mask" if masked else "loss_prj"
    assert losses[used].item() > 0
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    student = model.student if arch == "boxteacher" else model
    assert all(p.grad is not None for p in student.controller.parameters())
    assert student.mask_branch.parameters().__next__().grad.abs().sum() > 0


def test_each_group_of_positives_weighs_its_share():
    torch.manual_seed(0)
    model = mixed_model("boxinst")
    model.train()
    seen = spy_on_mask_losses(model)
    losses = model(two_images([True, False], [False]), iteration=0)  # one masked instance of three
    sampled, targets = seen["sampled"], seen["targets"]
    masked = targets["kinds"][sampled["gt_inds"]] == SupervisionKind.MASK
    assert 0 < int(masked.sum()) < masked.numel()
    probs = seen["logits"].sigmoid()
    box_targets, mask_targets = targets["criteria"]
    gt_masks = mask_targets["masks"][sampled["gt_inds"]]
    box_masks = box_targets["box_masks"][sampled["gt_inds"]].unsqueeze(1)
    per_positive_dice = dice_loss(probs[masked], gt_masks[masked])
    per_positive_projection = sum(
        dice_loss(probs[~masked].amax(dim=d), box_masks[~masked].amax(dim=d)) for d in (2, 3)
    )
    # sums over each group divided by all positives: each positive weighs as in CondInst / BoxInst
    torch.testing.assert_close(losses["loss_gt_mask"], per_positive_dice.sum() / masked.numel())
    torch.testing.assert_close(losses["loss_prj"], per_positive_projection.sum() / masked.numel())


def test_box_terms_on_masked_instances_when_asked():
    torch.manual_seed(0)
    model = mixed_model("boxinst", "MODEL.BOXINST.BOX_TERMS_ON_MASKED", "True")
    model.train()
    losses = model(two_images([True, True], [True]), iteration=0)
    assert losses["loss_prj"].item() > 0 and losses["loss_gt_mask"].item() > 0


def test_box_supervision_without_mixed_mode_keeps_its_loss_names():
    model = build_model(tiny_cfg("MODEL.BOXINST.ENABLED", "True"))
    model.train()
    losses = model(two_images([True, False], [False]), iteration=0)
    assert set(losses) == BOX_LOSSES | {"num_fcos_positives"}


# ---------------------------------------------------------------------------------------------
# BoxTeacher's pseudo labels
# ---------------------------------------------------------------------------------------------
def test_masked_instances_keep_their_mask_and_get_no_teacher_detection():
    model = mixed_model("boxteacher")
    x = with_masks(sample(64, 64, [(8, 8, 40, 40), (10, 10, 42, 42)], [0, 0]), [True, False])
    before = {k: v.clone() for k, v in x["instances"].items()}
    probs = torch.zeros(1, 64, 64)
    probs[0, 9:40, 9:40] = 0.9
    # One detection, on the masked box (IoU 1); its IoU with the box-only one is 0.78.
    prediction = {
        "boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]),
        "scores": torch.tensor([0.9]),
        "mask_scores": torch.tensor([0.7]),
        "mask_probs": probs,
    }
    labelled = label_one(model, x, prediction)
    assert labelled["pseudo_weights"].tolist() == pytest.approx([1.0, 0.7])
    assert torch.equal(labelled["pseudo_masks"][0], x["instances"]["masks"][0])  # its ground truth
    assert torch.equal(
        labelled["pseudo_masks"][1], probs[0] > 0.5
    )  # the detection went to the other box
    assert all(torch.equal(v, before[k]) for k, v in x["instances"].items())  # input not modified

    # Without masks the same detection labels the box it overlaps best.
    boxes_only = {**x, "instances": {k: x["instances"][k] for k in ("boxes", "labels")}}
    plain = label_one(model, boxes_only, prediction)
    assert plain["pseudo_weights"].tolist() == pytest.approx([0.7, 0.0])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train_a_few_iterations(config, opts):
    seed_all_rng(0)
    trainer = Trainer(
        setup_config(
            config,
            [
                "MODEL.DEVICE",
                "cpu",
                "DATALOADER.NUM_WORKERS",
                "0",
                "SOLVER.IMS_PER_BATCH",
                "4",
                "SOLVER.MAX_ITER",
                "3",
                "DATASETS.TEST",
                "()",
                "SEED",
                "5",
                *opts,
            ],
        )
    )
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_boxteacher_trains_on_a_dataset_where_half_the_images_have_masks(tmp_path, shapes_datasets):
    get_dataset_records("shapes_train")  # generates the shapes dataset if needed
    coco = json.loads(
        (Path(shapes_datasets) / "shapes/annotations/instances_train.json").read_text()
    )
    for ann in coco["annotations"]:
        if ann["image_id"] % 2:
            del ann["segmentation"]
    half = tmp_path / "half_masks.json"
    half.write_text(json.dumps(coco))
    register = str([["half_masks", str(half), str(Path(shapes_datasets) / "shapes/train")]])
    trainer = train_a_few_iterations(
        BOXTEACHER_CONFIG,
        [
            "DATASETS.REGISTER",
            register,
            "DATASETS.TRAIN",
            "('half_masks',)",
            "MODEL.BOXINST.GT_MASKS",
            "present",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
    )
    for name in (
        "loss_gt_mask",
        "loss_prj",
        "loss_mask",
        "num_gt_masks",
        "num_teacher_masks",
        "num_box_only",
    ):
        values = [v for v, _ in trainer.storage.history(name).values()]
        assert len(values) == 3 and all(np.isfinite(values)), name
    assert sum(v for v, _ in trainer.storage.history("num_gt_masks").values()) > 0


@pytest.mark.slow
def test_a_fraction_of_the_masks_trains_boxinst_and_saves_the_image_ids(tmp_path, shapes_datasets):
    trainer = train_a_few_iterations(
        BOXINST_CONFIG,
        [
            "MODEL.BOXINST.GT_MASKS",
            "fraction",
            "MODEL.BOXINST.GT_MASK_FRACTION",
            "0.5",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
    )
    saved = json.loads((tmp_path / "mask_image_ids.json").read_text())
    assert saved["seed"] == trainer.data_seed == 5
    assert len(saved["image_ids"]) == round(0.5 * saved["num_images_with_masks"]) > 0
    values = [v for v, _ in trainer.storage.history("loss_gt_mask").values()]
    assert len(values) == 3 and all(np.isfinite(values))
