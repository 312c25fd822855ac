"""Samplers whose output depends only on the dataset, the seed and the iteration.

Training draws from one global stream of batches: consecutive shuffled permutations of the record
indices (one per epoch, from ``numpy.random.default_rng(seed)``) are dealt into groups (with
aspect-ratio grouping: landscape and portrait), and a group emits a global batch whenever it holds
``global_batch_size`` indices. Iteration t's global batch is therefore a pure function of
(records, batch size, seed, t); every rank takes its own contiguous slice of it, so the union over
ranks does not depend on the world size, and resuming at t replays the stream without any I/O.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

# Indices drawn per chunk of the stream (whole epochs, at least one): large chunks vectorise the
# replay of the stream when resuming. The stream depends on it: changing it breaks the resuming
# of runs started before.
_CHUNK_SIZE = 1 << 16


def aspect_ratio_flags(records: Sequence[dict]) -> np.ndarray:
    """bool [N]: True for landscape (width >= height) records, from their metadata."""
    return np.array([r["width"] >= r["height"] for r in records], dtype=bool)


def index_stream(size: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of the infinite index stream: shuffled permutations of range(size), one per epoch,
    whole epochs per chunk."""
    rng = np.random.default_rng(seed)
    epochs = np.tile(np.arange(size, dtype=np.int64), (max(1, _CHUNK_SIZE // size), 1))
    while True:
        yield rng.permuted(epochs, axis=1).ravel()


def global_batches(group_ids: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """The infinite stream of global batches (int64 [batch_size] record indices).

    ``group_ids`` [N] (bool or int) assigns records to groups; a batch holds one group only,
    and batches come out in the order in which they fill up.
    """
    group_ids = np.asarray(group_ids)
    groups = np.unique(group_ids)
    carry = {g: np.empty(0, dtype=np.int64) for g in groups}
    for chunk in index_stream(len(group_ids), seed):
        chunk_groups = group_ids[chunk]
        batches, completed_at = [], []
        for g in groups:
            positions = np.flatnonzero(chunk_groups == g)
            members = np.concatenate([carry[g], chunk[positions]])
            # Carried-over members come before this chunk; they never complete a batch alone.
            positions = np.concatenate([np.full(len(carry[g]), -1), positions])
            full = len(members) // batch_size * batch_size
            batches.append(members[:full].reshape(-1, batch_size))
            completed_at.append(positions[batch_size - 1 : full : batch_size])
            carry[g] = members[full:]
        order = np.argsort(np.concatenate(completed_at), kind="stable")
        yield from np.concatenate(batches)[order]


class TrainingBatchSampler(Sampler):
    """Yields ``(t, slot_offset, indices)`` for t = start_iter, start_iter + 1, ... forever.

    ``indices`` (list of ints) is this rank's slice of global batch t: global slots
    [slot_offset, slot_offset + global_batch_size // world_size). Pass constant
    ``aspect_flags`` (e.g. all False) to batch without aspect-ratio grouping.
    """

    def __init__(
        self,
        aspect_flags: Sequence[bool] | np.ndarray,
        global_batch_size: int,
        seed: int,
        start_iter: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(aspect_flags) == 0:
            raise ValueError("Cannot sample from an empty dataset.")
        if global_batch_size <= 0 or global_batch_size % world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({global_batch_size}) must be a positive multiple of the "
                f"number of processes ({world_size})."
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}).")
        if seed < 0 or start_iter < 0:
            raise ValueError(f"seed ({seed}) and start_iter ({start_iter}) must be >= 0.")
        self._flags = np.asarray(aspect_flags, dtype=bool)
        self._batch_size = global_batch_size
        self._seed = seed
        self._start_iter = start_iter
        self._per_rank = global_batch_size // world_size
        self._offset = rank * self._per_rank

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        stream = global_batches(self._flags, self._batch_size, self._seed)
        batches = islice(stream, self._start_iter, None)
        for t, batch in enumerate(batches, start=self._start_iter):
            yield t, self._offset, batch[self._offset : self._offset + self._per_rank].tolist()


class InferenceSampler(Sampler):
    """Indices 0..size-1 in order, split into contiguous shards, one per rank (their sizes
    differ by at most one)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}).")
        shard, extra = divmod(size, world_size)
        self._begin = rank * shard + min(rank, extra)
        self._end = self._begin + shard + (rank < extra)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._begin, self._end))

    def __len__(self) -> int:
        return self._end - self._begin
