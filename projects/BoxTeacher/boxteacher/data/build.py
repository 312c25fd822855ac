"""Training and test data loaders built from a config.

Training batch t is a pure function of (datasets, config, seed, t): the sampler fixes which records
it holds (see ``samplers.py``) and image j of the global batch is mapped with
``numpy.random.default_rng([seed, t, j])``, whatever the number of workers or processes.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config.architecture import ArchitectureSpec
from ..config.supervision import gt_mask_mode
from ..utils.comm import get_rank, get_world_size
from .catalog import Metadata, get_dataset_records, get_metadata
from .mapper import DatasetMapper
from .mask_subset import restrict_masks_to_fraction
from .samplers import InferenceSampler, TrainingBatchSampler, aspect_ratio_flags

logger = logging.getLogger(__name__)

# Images tried in a row for one batch slot before an unreadable dataset is an error.
_MAX_TRIES = 10
# Paths listed in a warning about missing images.
_LISTED_FILES = 5


def get_train_metadata(cfg) -> Metadata:
    """Metadata of ``cfg.DATASETS.TRAIN`` (``thing_classes`` etc.); the datasets must have the
    same classes."""
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty: name at least one registered dataset.")
    first = get_metadata(names[0])
    for name in names[1:]:
        if get_metadata(name).thing_classes != first.thing_classes:
            raise ValueError(
                f"Training datasets '{names[0]}' and '{name}' have different classes "
                f"({first.thing_classes} vs {get_metadata(name).thing_classes})."
            )
    return first


def get_train_records(cfg) -> list[dict]:
    """The records of all ``cfg.DATASETS.TRAIN``, without images that have no file or (with
    DATALOADER.FILTER_EMPTY_ANNOTATIONS) no non-crowd annotation."""
    get_train_metadata(cfg)
    records = [r for name in cfg.DATASETS.TRAIN for r in get_dataset_records(name)]
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        kept = [r for r in records if any(not a.get("iscrowd", 0) for a in r["annotations"])]
        logger.info(
            "Dropped %d of %d training images without non-crowd annotations.",
            len(records) - len(kept),
            len(records),
        )
        records = kept
    missing = [r["file_name"] for r in records if not os.path.exists(r["file_name"])]
    if missing:
        logger.warning(
            "%d training images do not exist and are left out: %s%s",
            len(missing),
            missing[:_LISTED_FILES],
            " ..." if len(missing) > _LISTED_FILES else "",
        )
        missing_set = set(missing)
        records = [r for r in records if r["file_name"] not in missing_set]
    if not records:
        raise ValueError(f"No training images left in {list(cfg.DATASETS.TRAIN)}.")
    return records


def build_train_loader(
    cfg, spec: ArchitectureSpec, *, seed: int, start_iter: int = 0
) -> Iterator[list[dict]]:
    """An infinite iterator over this process's training batches (lists of
    ``SOLVER.IMS_PER_BATCH / world_size`` mapped dicts), starting at iteration ``start_iter``,
    mapped for the architecture of ``spec`` (see ``DatasetMapper.from_config``).

    With ``MODEL.BOXINST.GT_MASKS "fraction"``, ``seed`` also chooses the images that keep their
    masks (see ``mask_subset.py``)."""
    records = get_train_records(cfg)
    if gt_mask_mode(cfg, spec) == "fraction":
        records = restrict_masks_to_fraction(
            records, cfg.MODEL.BOXINST.GT_MASK_FRACTION, seed, cfg.OUTPUT_DIR
        )
    mapper = DatasetMapper.from_config(cfg, is_train=True, spec=spec)
    return _batches(cfg, records, mapper, cfg.SOLVER.IMS_PER_BATCH, seed, start_iter)


def get_unlabeled_records(dataset_names: Sequence[str]) -> list[dict]:
    """The records of the datasets ``dataset_names`` as unlabelled images: without annotations
    (a labelled dataset may serve as unlabelled images too) and without images that have no
    file. Raises ``ValueError`` when no image is left."""
    records = [
        {**r, "annotations": []} for name in dataset_names for r in get_dataset_records(name)
    ]
    missing = {r["file_name"] for r in records if not os.path.exists(r["file_name"])}
    if missing:
        logger.warning(
            "%d unlabelled images do not exist and are left out: %s%s",
            len(missing),
            sorted(missing)[:_LISTED_FILES],
            " ..." if len(missing) > _LISTED_FILES else "",
        )
        records = [r for r in records if r["file_name"] not in missing]
    if not records:
        raise ValueError(f"No unlabelled images in {list(dataset_names)}.")
    return records


def unlabeled_seed(seed: int) -> int:
    """The seed of the unlabelled stream of a run of data seed ``seed``: drawn from it, so that
    the two streams are independent and both follow from the run's seed."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def build_semi_supervised_loader(
    cfg,
    spec: ArchitectureSpec,
    unlabeled_datasets: Sequence[str],
    unlabeled_batch_size: int,
    *,
    seed: int,
    start_iter: int = 0,
) -> Iterator[list[dict]]:
    """Batches of labelled and unlabelled images: batch t is the labelled batch t of
    ``build_train_loader`` followed by this process's share of ``unlabeled_batch_size``
    (global) images of ``unlabeled_datasets``, mapped as training images (same sizes, flips and
    student view) and marked ``"unlabeled": True``, with no instances. The unlabelled stream has
    its own sampler and seed (``unlabeled_seed``), so batch t of either stream is a pure function
    of the seed and t: a resumed run sees the batches an uninterrupted one would."""
    labeled = build_train_loader(cfg, spec, seed=seed, start_iter=start_iter)
    mapper = DatasetMapper.from_config(cfg, is_train=True, spec=spec)
    unlabeled = _batches(
        cfg,
        get_unlabeled_records(unlabeled_datasets),
        mapper,
        unlabeled_batch_size,
        unlabeled_seed(seed),
        start_iter,
    )
    for labeled_batch, unlabeled_batch in zip(labeled, unlabeled):
        yield labeled_batch + [{**x, "unlabeled": True} for x in unlabeled_batch]


def _batches(
    cfg,
    records: list[dict],
    mapper: DatasetMapper,
    global_batch_size: int,
    seed: int,
    start_iter: int,
) -> Iterator[list[dict]]:
    """This process's share of the global batches of ``records`` from ``start_iter`` on."""
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        groups = aspect_ratio_flags(records)
    else:
        groups = np.zeros(len(records), dtype=bool)
    sampler = TrainingBatchSampler(
        groups, global_batch_size, seed, start_iter, get_rank(), get_world_size()
    )
    workers = cfg.DATALOADER.NUM_WORKERS
    loader = DataLoader(
        TrainingBatches(records, mapper, seed),
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_as_list,
        persistent_workers=workers > 0,
        worker_init_fn=_init_worker,
        # Its own generator: creating the iterator must not draw from the global torch RNG,
        # whose state a resumed run restores from the checkpoint.
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def build_test_loader(cfg, dataset_name: str) -> DataLoader:
    """Batches of one mapped test image (a list of one dict) of ``dataset_name``, this
    process's contiguous shard of the dataset, in order."""
    records = get_dataset_records(dataset_name)
    dataset = MappedRecords(records, DatasetMapper.from_config(cfg, is_train=False))
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=InferenceSampler(len(dataset), get_rank(), get_world_size()),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=_as_list,
        worker_init_fn=_init_worker,
    )


class SerializedList:
    """A read-only list stored as pickled bytes in one numpy buffer.

    Worker processes forked from the main one share the buffer instead of touching (and so
    copying) millions of Python objects; every item access returns a fresh copy.
    """

    def __init__(self, items: Sequence[Any]) -> None:
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        begin = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._data[begin : int(self._ends[index])]))


class TrainingBatches(Dataset):
    """``dataset[(t, slot_offset, indices)]`` -> the mapped records of those indices.

    Image j uses ``default_rng([seed, t, slot_offset + j])``. A record whose image cannot be read
    is replaced by one drawn from that same generator (deterministic: which worker has already
    seen the failure only saves a read).
    """

    def __init__(self, records: Sequence[dict], mapper: DatasetMapper, seed: int) -> None:
        self._records = SerializedList(records)
        self._mapper = mapper
        self._seed = seed
        self._unreadable: set[int] = set()

    def __getitem__(self, key: tuple[int, int, list[int]]) -> list[dict]:
        t, offset, indices = key
        return [
            self._map(index, np.random.default_rng([self._seed, t, offset + j]))
            for j, index in enumerate(indices)
        ]

    def _map(self, index: int, rng: np.random.Generator) -> dict:
        for _ in range(_MAX_TRIES):
            if index not in self._unreadable:
                out = self._mapper(self._records[index], rng)
                if out is not None:
                    return out
                self._unreadable.add(index)
            index = int(rng.integers(len(self._records)))
        files = [self._records[i]["file_name"] for i in sorted(self._unreadable)[:_LISTED_FILES]]
        raise RuntimeError(
            f"{_MAX_TRIES} images in a row could not be read; unreadable so far "
            f"({len(self._unreadable)}): {files}"
        )


class MappedRecords(Dataset):
    """``dataset[i]`` -> the test-mapped record i."""

    def __init__(self, records: Sequence[dict], mapper: DatasetMapper) -> None:
        self._records = SerializedList(records)
        self._mapper = mapper

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._mapper(self._records[index])


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)
