"""What one rank reads in one epoch, computed from ``_info.json`` alone.

Both backends read the same thing: the split's tars concatenated in an epoch-dependent order
(train: a permutation seeded by (seed, epoch), so each rank sees other samples every epoch; eval:
the stored order), cut into ``world`` contiguous ranges the way DALI's sharded readers cut them
(``shard_id * N // num_shards``). Epoch length per rank:
  - train: ``N // (world * batch)`` batches on every rank (drop last, identical counts, or a rank
    that stops early deadlocks a collective);
  - eval: ``ceil(max range / batch)`` batches on every rank; positions past a rank's range are
    padding and are dropped before any caller sees them, so each sample appears exactly once.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.format import INFO_NAME, ShardFormatError, SplitManifest, split_info

# DALI .idx files written by `wds2idx` start with "v1.2 <num_samples>".
_INDEX_MAGIC = "v1.2"


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed from any tuple (seed, epoch, rank, purpose...), stable across processes."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rank_range(num_samples: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of `rank` in the concatenated stream: DALI's reader sharding formula."""
    return num_samples * rank // world, num_samples * (rank + 1) // world


@dataclass(frozen=True)
class ShardFile:
    tar: Path
    index: Path
    num_samples: int


@dataclass(frozen=True)
class EpochPlan:
    """The shards of a split in this epoch's read order, and this rank's share of them."""

    shards: list[ShardFile]
    num_samples: int
    rank: int
    world: int
    batch_size: int
    train: bool

    @property
    def range(self) -> tuple[int, int]:
        return rank_range(self.num_samples, self.rank, self.world)

    @property
    def rank_samples(self) -> int:
        start, stop = self.range
        return stop - start

    @property
    def num_batches(self) -> int:
        if self.train:
            return self.num_samples // (self.world * self.batch_size)
        largest = math.ceil(self.num_samples / self.world)
        return math.ceil(largest / self.batch_size)

    def valid_in_batch(self, batch: int) -> int:
        """How many leading samples of batch `batch` are real (eval pads the rest)."""
        if self.train:
            return self.batch_size
        return max(0, min(self.batch_size, self.rank_samples - batch * self.batch_size))


def load_shards(folder: str | os.PathLike, split: str) -> tuple[list[ShardFile], int]:
    """The split's shard files in stored order and its sample count, checked against the manifest
    (see `load_split`)."""
    _, shards = load_split(folder, split)
    return shards, sum(s.num_samples for s in shards)


def load_split(folder: str | os.PathLike, split: str) -> tuple[SplitManifest, list[ShardFile]]:
    """The split's manifest entry and its shard files in stored order, checked against each other:
    what a loader needs, and what the start-up checks of `hcsc-train` and `hcsc-eval` verify.

    Raises:
        ShardFormatError: a missing or truncated tar, a missing index, an index whose sample count
            differs from the manifest, or counts that do not add up; one line naming the file.
    """
    folder = Path(folder)
    entry = split_info(folder, split)
    fix = "rebuild or re-copy the shards (`hcsc-shards verify` checks a folder)"
    shards = []
    for s in entry.shards:
        tar, index = folder / s.name, folder / s.index
        if not tar.is_file():
            raise ShardFormatError(f"{tar}: shard listed in {INFO_NAME} is missing; {fix}")
        size = tar.stat().st_size
        if size != s.bytes:
            raise ShardFormatError(f"{tar}: {size} bytes, manifest says {s.bytes} (truncated?); {fix}")
        if not index.is_file():
            raise ShardFormatError(f"{index}: DALI index of {s.name} is missing; {fix}")
        counted = _index_count(index)
        if counted != s.num_samples:
            raise ShardFormatError(f"{index}: indexes {counted} samples, manifest says "
                                   f"{s.num_samples}; {fix}")
        shards.append(ShardFile(tar, index, s.num_samples))
    total = sum(s.num_samples for s in shards)
    if not shards or total != entry.num_samples:
        raise ShardFormatError(f"{folder / INFO_NAME}: split {split!r} lists {len(shards)} shards with "
                               f"{total} samples, but num_samples is {entry.num_samples}; {fix}")
    return entry, shards


def _index_count(index: Path) -> int:
    with open(index) as f:
        header = f.readline().split()
    if len(header) != 2 or header[0] != _INDEX_MAGIC or not header[1].isdigit():
        raise ShardFormatError(f"{index}: not a DALI webdataset index (header {' '.join(header)!r}); "
                               "regenerate it with `wds2idx`")
    return int(header[1])


def epoch_plan(shards: list[ShardFile], num_samples: int, *, train: bool, rank: int, world: int,
               epoch: int, seed: int, batch_size: int) -> EpochPlan:
    """This epoch's read order: train permutes whole shards with a (seed, epoch) generator (the
    builder already shuffled samples globally); eval keeps the stored order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    ordered = list(shards)
    if train:
        order = np.random.default_rng(derive_seed(seed, epoch, "shard-order")).permutation(len(shards))
        ordered = [shards[i] for i in order]
    return EpochPlan(ordered, num_samples, rank, world, batch_size, train)
