"""``boxteacher.data.split``: a labelled fraction of a COCO json and the unlabelled rest."""

import copy
import json
from pathlib import Path

import pytest

from boxteacher.data import get_dataset_records, get_metadata, is_registered
from boxteacher.data.split import split_coco, split_file_names


def coco(num_images: int) -> dict:
    images = [
        {"id": 10 + i, "file_name": f"{i}.png", "height": 8, "width": 8} for i in range(num_images)
    ]
    annotations = [
        {
            "id": 100 + k,
            "image_id": 10 + k // 2,
            "category_id": 3,
            "bbox": [0, 0, 4, 4],
            "iscrowd": 0,
        }
        for k in range(2 * num_images)
    ]
    return {
        "info": {"year": 2026},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 3, "name": "c"}],
    }


def test_the_split_is_a_seeded_partition_of_the_images():
    data = coco(20)
    before = copy.deepcopy(data)
    split = split_coco(data, 0.3, seed=1)
    assert data == before  # not modified
    labeled_ids = [im["id"] for im in split.labeled["images"]]
    unlabeled_ids = [im["id"] for im in split.unlabeled["images"]]
    assert len(labeled_ids) == 6 and labeled_ids == split.labeled_image_ids == sorted(labeled_ids)
    assert sorted(labeled_ids + unlabeled_ids) == [im["id"] for im in data["images"]]
    assert unlabeled_ids == sorted(unlabeled_ids)  # the input's order
    assert {a["image_id"] for a in split.labeled["annotations"]} == set(labeled_ids)
    assert len(split.labeled["annotations"]) == 12 and split.unlabeled["annotations"] == []
    for part in (split.labeled, split.unlabeled):
        assert part["categories"] == data["categories"] and part["info"] == data["info"]
    assert split_coco(data, 0.3, seed=1) == split  # reproducible
    assert split_coco(data, 0.3, seed=2).labeled_image_ids != split.labeled_image_ids


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_a_fraction_outside_zero_one_is_an_error(fraction):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_coco(coco(10), fraction, seed=1)


def test_a_fraction_that_empties_a_part_is_an_error():
    with pytest.raises(ValueError, match="no labelled image"):
        split_coco(coco(10), 0.01, seed=1)
    with pytest.raises(ValueError, match="no unlabelled image"):
        split_coco(coco(10), 0.99, seed=1)


def test_file_names_tell_fraction_and_seed():
    assert split_file_names("a/instances_train2017.json", 0.1, 1) == (
        "instances_train2017_10pct_seed1_labeled.json",
        "instances_train2017_10pct_seed1_unlabeled.json",
    )
    assert split_file_names("x.json", 0.004, 3)[0] == "x_0.4pct_seed3_labeled.json"


def test_the_builtin_splits_are_the_split_tools_with_seed_1(shapes_datasets):
    records = get_dataset_records("shapes_train")
    data = json.loads(
        (Path(shapes_datasets) / "shapes/annotations/instances_train.json").read_text()
    )
    labeled = get_dataset_records("shapes_train_30pct")
    unlabeled = get_dataset_records("shapes_train_30pct_unlabeled")
    assert [r["image_id"] for r in labeled] == split_coco(data, 0.3, seed=1).labeled_image_ids
    assert len(labeled) + len(unlabeled) == len(records) and len(labeled) == round(
        0.3 * len(records)
    )
    assert {r["image_id"] for r in labeled}.isdisjoint(r["image_id"] for r in unlabeled)
    assert all(r["annotations"] for r in labeled) and all(not r["annotations"] for r in unlabeled)
    assert (
        get_metadata("shapes_train_30pct").thing_classes
        == get_metadata("shapes_train").thing_classes
    )
    assert get_metadata("shapes_train_30pct_unlabeled").unlabeled
    assert is_registered("coco_2017_train_10pct") and is_registered(
        "coco_2017_train_10pct_unlabeled"
    )
