"""`build_loader`: the one entry point the trainer and the clustering step call.

A loader is built per (split, mode, epoch) and yields `Batch` objects for batches
``start_batch .. len(loader) - 1`` of that epoch. Its length comes from ``_info.json`` only.
Resume is a deterministic replay: both backends draw every random number from generators
seeded by (seed, epoch, rank[, batch]), so starting at batch k yields exactly the batches k..
of an uninterrupted run, pixels included (DALI replays the first k batches through the graph,
since its per-sample generators advance with every batch; the torch backend seeds each batch on
its own and skips the first k batches before decoding).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from core import dist
from core.cli import UserError
from core.config import DataConfig
from pipeline.batch import Batch
from pipeline.plan import EpochPlan, epoch_plan, load_shards
from shards.format import digits_to_int

if TYPE_CHECKING:
    from pipeline.dali_loader import DaliLoader

log = logging.getLogger(__name__)
Mode = Literal["train", "eval", "linear"]


@dataclass(frozen=True)
class SkippedSample:
    """A sample that could not be decoded: its tar, key and the decoder's complaint."""

    shard: str
    key: str
    reason: str


class Loader(abc.ABC):
    """Iterable of `Batch`; ``len()`` is batches per epoch per rank (equal on every rank).

    Attributes:
        skipped: number of corrupt samples skipped so far (each also logged with shard and key).
        skipped_samples: the `SkippedSample` records behind `skipped`.
    """

    def __init__(self, plan: EpochPlan, start_batch: int, device: torch.device) -> None:
        if not 0 <= start_batch <= plan.num_batches:
            raise ValueError(f"start_batch {start_batch} outside 0..{plan.num_batches}")
        self.plan = plan
        self.start_batch = start_batch
        self.device = device
        self.skipped_samples: list[SkippedSample] = []

    @property
    def skipped(self) -> int:
        return len(self.skipped_samples)

    def __len__(self) -> int:
        return self.plan.num_batches

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        """Batches `start_batch` .. `len(self) - 1` of the epoch."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release threads and buffers (DALI pipelines, DataLoader workers)."""

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record_skip(self, shard: str, key: str, reason: str) -> None:
        log.warning("corrupt image skipped: shard %s key %s (%s)", shard, key, reason)
        self.skipped_samples.append(SkippedSample(shard, key, reason))

    def _refill(self, kept: int) -> torch.Tensor:
        """Row order that brings a train batch that lost corrupt samples back to full size.

        A skipped sample must not shorten a train batch: every rank all-gathers equal-sized keys
        for the queue (model/momentum.py), so its slot repeats a kept sample of the same batch.
        """
        if kept == 0:
            raise RuntimeError(f"every sample of a train batch on rank {self.plan.rank} is corrupt; "
                               "run `hcsc-shards verify --decode` on the shards")
        return torch.arange(self.plan.batch_size) % kept

    def _batch(self, views: list[torch.Tensor], cls_digits: torch.Tensor, idx_digits: torch.Tensor,
               rows: torch.Tensor) -> Batch:
        """Keep `rows` (bool [B]: real, decodable samples) and move everything to the device."""
        nb = self.device.type == "cuda"
        if not rows.all():  # the common case keeps every row and copies nothing
            keep = rows.nonzero().squeeze(1)
            if self.plan.train:
                keep = keep[self._refill(keep.numel())]
            views = [v.index_select(0, keep.to(v.device)) for v in views]
            idx_digits, cls_digits = idx_digits.index_select(0, keep), cls_digits.index_select(0, keep)
        return Batch([v.to(self.device, non_blocking=nb) for v in views],
                     digits_to_int(idx_digits).to(self.device, non_blocking=nb),
                     digits_to_int(cls_digits).to(self.device, non_blocking=nb))


class BackendUnavailable(UserError):
    """``data.backend=dali`` on a host where NVIDIA DALI cannot be imported."""


def _dali_loader() -> type[DaliLoader]:
    """The DALI loader class, or one line naming the setting and both fixes: a run configured for
    DALI never falls back to the torch loader silently (the backends differ in speed several
    times over, and a run's record should say which one produced its batches)."""
    try:
        from pipeline.dali_loader import DaliLoader
    except (ImportError, OSError) as err:  # not installed, or a wheel whose libraries do not load here
        raise BackendUnavailable(
            f"data.backend=dali but NVIDIA DALI cannot be imported ({type(err).__name__}: {err}); "
            "install it (pip install nvidia-dali-cuda130) or set data.backend=torch") from err
    return DaliLoader


def check_backend(cfg: DataConfig) -> None:
    """Raise `BackendUnavailable` now if `cfg.backend` cannot run here (for start-up checks)."""
    if cfg.backend == "dali":
        _dali_loader()


def build_loader(cfg: DataConfig, *, split: str, mode: Mode, rank: int, world: int, epoch: int,
                 seed: int, start_batch: int = 0, device: torch.device | None = None) -> Loader:
    """A loader over `split` of the shard folder `cfg.shards` for one epoch on one rank.

    Args:
        cfg: data section of the config (backend, sizes, scales, batch sizes, workers).
        split: split name in ``_info.json``.
        mode: "train" (2 or 6 augmented views, shuffled, drop last), "eval" (one resized,
            center-cropped view, stored order, every sample exactly once across ranks) or
            "linear" (linear-probe training, method.md §7.1: one RandomResizedCrop scale 0.08-1 + flip
            view; shuffled and drop last as train).
        rank, world: this rank and the number of ranks.
        epoch, seed: together seed the shard order, the shuffle and every augmentation.
        start_batch: first batch to yield (resume); batches before it are replayed, not yielded.
        device: where views, idx and cls land; default this rank's device (`core.dist.device`).

    Raises:
        ShardFormatError: a missing, truncated or inconsistent shard or manifest (one line).
        BackendUnavailable: ``data.backend=dali`` and DALI cannot be imported (one line).
    """
    if mode not in ("train", "eval", "linear"):
        raise ValueError(f"mode must be 'train', 'eval' or 'linear', got {mode!r}")
    dali_loader = _dali_loader() if cfg.backend == "dali" else None
    shards, total = load_shards(cfg.shards, split)
    train = mode != "eval"
    plan = epoch_plan(shards, total, train=train, rank=rank, world=world, epoch=epoch, seed=seed,
                      batch_size=cfg.batch_size if train else cfg.eval_batch_size)
    device = device or dist.device()
    if dali_loader is not None:
        return dali_loader(cfg, plan, seed=seed, epoch=epoch, start_batch=start_batch, device=device,
                           linear=mode == "linear")
    from pipeline.reference import TorchLoader

    return TorchLoader(cfg, plan, seed=seed, epoch=epoch, start_batch=start_batch, device=device,
                       linear=mode == "linear")
