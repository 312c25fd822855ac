"""Samplers (determinism, resume, world-size independence, aspect grouping, sharding) and the
train / test loaders (same data for any number of workers, bad images replaced)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from boxteacher.config import ArchitectureSpec, get_cfg
from boxteacher.data import (
    InferenceSampler,
    TrainingBatchSampler,
    build_test_loader,
    build_train_loader,
    generate_shapes_dataset,
    get_train_metadata,
    get_train_records,
    register_datasets_from_config,
)
from boxteacher.data.build import TrainingBatches
from boxteacher.data.mapper import DatasetMapper
from boxteacher.data.samplers import index_stream
from boxteacher.data.shapes import shapes_paths

# The data needs of the default architecture (mask-supervised CondInst), which the configs use.
CONDINST = ArchitectureSpec()

# pycocotools' decode trips a NumPy 2 deprecation warning; not ours to fix.


def _take(sampler, n: int) -> list:
    return list(islice(iter(sampler), n))


# ----------------------------------------------------------------------------- samplers
def test_sampler_deterministic_for_a_seed():
    flags = np.arange(50) % 3 == 0
    first = _take(TrainingBatchSampler(flags, 8, seed=5), 40)
    assert first == _take(TrainingBatchSampler(flags, 8, seed=5), 40)
    assert first != _take(TrainingBatchSampler(flags, 8, seed=6), 40)
    assert [t for t, _, _ in first] == list(range(40))


@pytest.mark.parametrize("size", [3, 50, 70000])
def test_sampler_resume_replays_the_stream(size):
    flags = np.arange(size) % 4 == 1
    full = _take(TrainingBatchSampler(flags, 6, seed=1), 60)
    assert _take(TrainingBatchSampler(flags, 6, seed=1, start_iter=37), 23) == full[37:]


def test_sampler_resume_far_is_cheap():
    flags = np.arange(118_000) % 5 == 0
    start = time.perf_counter()
    t, _, indices = next(iter(TrainingBatchSampler(flags, 16, seed=0, start_iter=300_000)))
    assert time.perf_counter() - start < 3.0
    assert t == 300_000 and len(indices) == 16


def test_sampler_ranks_split_the_global_batch():
    flags = np.arange(40) % 2 == 0
    whole = _take(TrainingBatchSampler(flags, 8, seed=3), 20)
    rank0 = _take(TrainingBatchSampler(flags, 8, seed=3, rank=0, world_size=2), 20)
    rank1 = _take(TrainingBatchSampler(flags, 8, seed=3, rank=1, world_size=2), 20)
    for (t, offset, indices), (t0, o0, i0), (t1, o1, i1) in zip(whole, rank0, rank1):
        assert t == t0 == t1 and (offset, o0, o1) == (0, 0, 4)
        assert i0 + i1 == indices and len(i0) == 4
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        TrainingBatchSampler(flags, 6, seed=0, world_size=4)


def test_sampler_aspect_grouping_and_epochs():
    rng = np.random.default_rng(0)
    flags = rng.random(30) < 0.3
    batches = [indices for _, _, indices in _take(TrainingBatchSampler(flags, 4, seed=2), 60)]
    assert all(len(set(flags[b])) == 1 for b in batches)
    assert {flags[b[0]] for b in batches} == {False, True}
    counts = np.bincount(np.concatenate(batches), minlength=30)
    assert counts.min() >= 6 and counts.max() <= 10  # 240 draws from 8 whole epochs of 30
    # Without grouping (one group) batches are consecutive chunks of whole permutations.
    chunks = [
        i for _, _, b in _take(TrainingBatchSampler(np.zeros(12, bool), 4, seed=2), 6) for i in b
    ]
    assert (
        sorted(chunks[:12]) == sorted(chunks[12:]) == list(range(12)) and chunks[:12] != chunks[12:]
    )


def test_sampler_matches_a_plain_bucket_loop():
    """The vectorised grouping equals the obvious loop: deal the index stream into buckets,
    emit a bucket when it is full."""
    flags = np.random.default_rng(1).random(23) < 0.4
    expected, buckets = [], {False: [], True: []}
    for index in np.concatenate(list(islice(index_stream(23, 9), 2))).tolist():
        bucket = buckets[bool(flags[index])]
        bucket.append(index)
        if len(bucket) == 5:
            expected.append(list(bucket))
            bucket.clear()
    got = [
        indices for _, _, indices in _take(TrainingBatchSampler(flags, 5, seed=9), len(expected))
    ]
    assert len(expected) > 100 and got == expected


@pytest.mark.parametrize("size, world_size", [(10, 3), (2, 3), (7, 1)])
def test_inference_sampler_covers_each_index_once(size, world_size):
    shards = [list(InferenceSampler(size, rank, world_size)) for rank in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(size))
    lengths = [len(InferenceSampler(size, rank, world_size)) for rank in range(world_size)]
    assert lengths == [len(shard) for shard in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ----------------------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def messy_dataset(tmp_path_factory) -> tuple[str, str, dict]:
    """Shapes images with: one crowd-only image, one without annotations, one missing file and
    one corrupt file. Returns (json, image folder, file names of those four)."""
    root = tmp_path_factory.mktemp("loader")
    generate_shapes_dataset(str(root), num_train=20, num_val=3, seed=4)
    json_file, image_root = shapes_paths(str(root), "train")
    data = json.loads(Path(json_file).read_text())
    images = data["images"]
    special = {
        "crowd": images[0]["file_name"],
        "empty": images[1]["file_name"],
        "missing": images[2]["file_name"],
        "corrupt": images[3]["file_name"],
    }
    for ann in data["annotations"]:
        if ann["image_id"] == images[0]["id"]:
            ann["iscrowd"] = 1
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != images[1]["id"]]
    (Path(image_root) / special["missing"]).unlink()
    (Path(image_root) / special["corrupt"]).write_bytes(b"\x89PNG broken")
    messy_json = root / "messy.json"
    messy_json.write_text(json.dumps(data))
    return str(messy_json), image_root, special


def _cfg(json_file: str, image_root: str, workers: int = 0):
    cfg = get_cfg()
    cfg.DATASETS.REGISTER = [["test_loader_messy", json_file, image_root]]
    cfg.DATASETS.TRAIN = ("test_loader_messy",)
    cfg.INPUT.MIN_SIZE_TRAIN = (48, 64)
    cfg.INPUT.MAX_SIZE_TRAIN = 200
    cfg.INPUT.MIN_SIZE_TEST = 56
    cfg.INPUT.MAX_SIZE_TEST = 200
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = workers
    register_datasets_from_config(cfg)
    return cfg


def _assert_same_batches(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert [d["file_name"] for d in batch_a] == [d["file_name"] for d in batch_b]
        for da, db in zip(batch_a, batch_b):
            assert torch.equal(da["image"], db["image"])
            for key in ("boxes", "labels", "masks"):
                assert torch.equal(da["instances"][key], db["instances"][key])


def test_train_records_are_filtered(messy_dataset, caplog):
    json_file, image_root, special = messy_dataset
    with caplog.at_level(logging.INFO, logger="boxteacher.data.build"):
        records = get_train_records(_cfg(json_file, image_root))
    names = {Path(r["file_name"]).name for r in records}
    assert len(records) == 17 and special["corrupt"] in names
    assert not names & {special["crowd"], special["empty"], special["missing"]}
    assert "Dropped 2 of 20" in caplog.text
    assert special["missing"] in caplog.text and "do not exist" in caplog.text


def test_train_loader_same_data_for_any_worker_count(messy_dataset, caplog):
    json_file, image_root, special = messy_dataset
    cfg = _cfg(json_file, image_root)
    with caplog.at_level(logging.WARNING, logger="boxteacher.data.mapper"):
        first = list(islice(build_train_loader(cfg, CONDINST, seed=11), 12))
    assert special["corrupt"] in caplog.text and "could not be decoded" in caplog.text
    again = list(islice(build_train_loader(cfg, CONDINST, seed=11), 12))
    _assert_same_batches(first, again)
    assert all(len(batch) == 4 for batch in first)
    assert special["corrupt"] not in {Path(d["file_name"]).name for batch in first for d in batch}
    sizes = {min(d["image"].shape[1:]) for batch in first for d in batch}
    assert sizes == {48, 64}
    resumed = list(islice(build_train_loader(cfg, CONDINST, seed=11, start_iter=7), 5))
    _assert_same_batches(first[7:], resumed)
    with_workers = list(
        islice(build_train_loader(_cfg(json_file, image_root, workers=2), CONDINST, seed=11), 12)
    )
    _assert_same_batches(first, with_workers)
    other_seed = next(build_train_loader(cfg, CONDINST, seed=12))
    assert [d["file_name"] for d in other_seed] != [d["file_name"] for d in first[0]]


def test_batch_content_does_not_depend_on_the_world_size(messy_dataset):
    json_file, image_root, special = messy_dataset
    cfg = _cfg(json_file, image_root)
    records = get_train_records(cfg)
    corrupt = next(i for i, r in enumerate(records) if r["file_name"].endswith(special["corrupt"]))
    dataset = TrainingBatches(records, DatasetMapper.from_config(cfg, True, spec=CONDINST), seed=3)
    indices = [5, corrupt, 7, 7]
    whole = dataset[(5, 0, indices)]
    halves = dataset[(5, 0, indices[:2])] + dataset[(5, 2, indices[2:])]
    _assert_same_batches([whole], [halves])
    assert not whole[1]["file_name"].endswith(special["corrupt"])
    # Slots 2 and 3 hold the same record but draw their own size and flip.
    shapes = {tuple(dataset[(t, 0, [7, 7])][j]["image"].shape) for t in range(10) for j in (0, 1)}
    assert len(shapes) == 2


def test_train_metadata_must_agree(messy_dataset, tmp_path):
    json_file, image_root, _ = messy_dataset
    data = json.loads(Path(json_file).read_text())
    data["categories"][0]["name"] = "disc"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    cfg = _cfg(json_file, image_root)
    assert get_train_metadata(cfg).thing_classes == ["circle", "triangle", "square"]
    cfg.DATASETS.REGISTER.append(["test_loader_other", str(other), image_root])
    cfg.DATASETS.TRAIN = ("test_loader_messy", "test_loader_other")
    register_datasets_from_config(cfg)
    with pytest.raises(
        ValueError, match="'test_loader_messy' and 'test_loader_other' have different"
    ):
        get_train_metadata(cfg)


def test_test_loader_yields_every_image_once(messy_dataset, tmp_path):
    json_file, image_root, _ = messy_dataset
    kept = tmp_path / "images"
    shutil.copytree(image_root, kept)
    data = json.loads(Path(json_file).read_text())
    data["images"] = [im for im in data["images"] if (kept / im["file_name"]).is_file()][4:]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    val_json = tmp_path / "val.json"
    val_json.write_text(json.dumps(data))
    cfg = _cfg(json_file, image_root)
    cfg.DATASETS.REGISTER = [["test_loader_val", str(val_json), str(kept)]]
    register_datasets_from_config(cfg)
    batches = list(build_test_loader(cfg, "test_loader_val"))
    assert [b[0]["image_id"] for b in batches] == [im["id"] for im in data["images"]]
    for (out,), info in zip(batches, data["images"]):
        assert "instances" not in out
        assert (out["height"], out["width"]) == (info["height"], info["width"])
        assert min(out["image"].shape[1:]) == 56
