"""The labelled + unlabelled batches of semi-supervised training
(``build_semi_supervised_loader``): composition, independence of the streams, exact resume."""

import logging
from itertools import islice

import pytest
import torch

from boxteacher.config import ArchitectureSpec, get_cfg
from boxteacher.data import (
    build_train_loader,
    generate_shapes_dataset,
    register_coco_instances,
    register_unlabeled_images,
)
from boxteacher.data.build import (
    build_semi_supervised_loader,
    get_unlabeled_records,
    unlabeled_seed,
)
from boxteacher.data.shapes import shapes_paths

SPEC = ArchitectureSpec(box_supervised=True, student_view=True, teacher_student=True)


@pytest.fixture(scope="module")
def semi_cfg(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("semi"))
    generate_shapes_dataset(root, num_train=12, num_val=6, seed=0)
    register_coco_instances("semi_labeled", *shapes_paths(root, "train"))
    register_unlabeled_images("semi_unlabeled", shapes_paths(root, "val")[1])
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("semi_labeled",)
    cfg.INPUT.MIN_SIZE_TRAIN = (48, 64)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.AUG_TYPE = "strong"
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def take(loader, count):
    return list(islice(loader, count))


def same_batches(a, b):
    return len(a) == len(b) and all(
        [x["file_name"] for x in p] == [y["file_name"] for y in q]
        and all(
            torch.equal(x["image"], y["image"]) and torch.equal(x["aug_image"], y["aug_image"])
            for x, y in zip(p, q)
        )
        for p, q in zip(a, b)
    )


def test_a_batch_is_the_labelled_batch_then_marked_unlabelled_images(semi_cfg):
    batches = take(build_semi_supervised_loader(semi_cfg, SPEC, ["semi_unlabeled"], 3, seed=5), 4)
    labeled = take(build_train_loader(semi_cfg, SPEC, seed=5), 4)
    assert same_batches([b[:2] for b in batches], labeled)
    for batch in batches:
        assert [x.get("unlabeled", False) for x in batch] == [False, False, True, True, True]
        for x in batch[2:]:
            assert "/val/" in x["file_name"] and x["instances"]["boxes"].shape == (0, 4)
            assert x["image"].shape == x["aug_image"].shape
    unlabeled = [x for b in batches for x in b[2:]]
    assert any(not torch.equal(x["image"], x["aug_image"]) for x in unlabeled)  # the student view
    unlabeled_files = [x["file_name"] for x in unlabeled]
    assert len(set(unlabeled_files)) > 3  # drawn afresh every batch


def test_a_resumed_loader_gives_the_batches_of_an_uninterrupted_one(semi_cfg):
    whole = take(build_semi_supervised_loader(semi_cfg, SPEC, ["semi_unlabeled"], 2, seed=5), 6)
    resumed = take(
        build_semi_supervised_loader(semi_cfg, SPEC, ["semi_unlabeled"], 2, seed=5, start_iter=3), 3
    )
    assert same_batches(whole[3:], resumed)
    other = take(build_semi_supervised_loader(semi_cfg, SPEC, ["semi_unlabeled"], 2, seed=6), 6)
    assert not same_batches([b[2:] for b in whole], [b[2:] for b in other])
    assert unlabeled_seed(5) == unlabeled_seed(5) != unlabeled_seed(6) and unlabeled_seed(5) != 5


def test_unlabelled_records_drop_annotations_and_missing_files(semi_cfg, tmp_path, caplog):
    records = get_unlabeled_records(["semi_labeled"])  # a labelled set used as unlabelled images
    assert len(records) == 12 and all(r["annotations"] == [] for r in records)
    (tmp_path / "pile").mkdir()
    register_unlabeled_images("semi_empty", str(tmp_path / "pile"))
    with pytest.raises(ValueError, match="has no images"):
        get_unlabeled_records(["semi_empty"])
    with caplog.at_level(logging.WARNING):
        records = get_unlabeled_records(["semi_unlabeled"])
    assert len(records) == 6 and not caplog.records
