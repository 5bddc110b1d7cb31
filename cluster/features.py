"""The one feature extractor: clustering, the trainer's kNN monitor and `hcsc-eval` all use it.

The eval loader yields every sample of a split exactly once across ranks, with its dataset index
(docs/method.md §2.2, §10 item 12), so each rank keeps only its own rows: no dense N x d
all-reduce and no duplicate summing (the official code's "norm > 1.5, divide by 2" repair is not
needed). A rank whose share is empty (more ranks than batches) gets a (0, d) tensor with the width
the other ranks found, so every later collective sees consistent shapes. `gather_by_idx`
assembles a whole split in dataset order where a command needs it on every rank.

The embedding runs under `torch.inference_mode` (no autograd bookkeeping at all); the returned
tensors are made outside it, so they are ordinary tensors that later code may modify in place or
use in autograd. For clustering (`split_features(..., cluster=cfg.cluster)`) the pass may use a
larger batch (`cluster.feature_batch_size`; the caller's eval-mode BatchNorm makes each row's
embedding independent of its batch) and bf16 autocast on CUDA (`cluster.feature_precision`); the
features stay fp32 either way.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from core import dist
from core.config import FEATURE_PRECISIONS, ClusterConfig, ConfigError, DataConfig
from core.errors import StopCheck, stop_if_requested
from core.logs import progress
from pipeline import build_loader
from pipeline.batch import Batch
from shards.format import split_info

Embed = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SplitFeatures:
    """This rank's rows of a split.

    Attributes:
        idx: int64 (n_local,) dataset indices; over all ranks each of 0..num_samples-1 once.
        feats: float32 (n_local, d); n_local may be 0, d is the same on every rank.
        cls: int64 (n_local,) class ids.
        num_samples: rows over all ranks.
        class_names: the split's class names (empty when not read from a manifest).
    """

    idx: torch.Tensor
    feats: torch.Tensor
    cls: torch.Tensor
    num_samples: int
    class_names: list[str] = field(default_factory=list)


@torch.no_grad()
def extract_features(embed: Embed, loader: Iterable[Batch], *, num_batches: int | None = None,
                     normalize: bool = False, desc: str = "features",
                     precision: str = "fp32", should_stop: StopCheck | None = None) -> SplitFeatures:
    """Embed the first view of every batch on this rank; call on every rank (one collective).

    The caller sets eval mode: clustering passes `HCSC.embed_momentum` (the momentum encoder with
    its head, docs/method.md §2.2), the kNN monitor and `hcsc-eval` a trunk.

    Args:
        embed: maps views (B, 3, H, W) to embeddings (B, d).
        loader: yields `Batch` objects; only `views[0]`, `idx` and `cls` are read.
        num_batches: batches to read (also the progress-bar total); None reads to the end.
        normalize: L2-normalise every row (clustering and the cluster evaluation do).
        desc: progress-bar label.
        precision: "fp32", or "bf16" (autocast of `embed`; CUDA only); the rows come back fp32.
        should_stop: a collective stop check, asked after every batch (every rank reads the same
            number of batches); `StopRequested` on every rank when it says stop.

    Returns:
        `SplitFeatures` on the device that computed them (`dist.device()` for an empty rank).

    Raises:
        ValueError: when an embedding row is NaN or infinite (names how many), or no rank
            saw any row; `ConfigError` (a ValueError) for bf16 without CUDA.
    """
    autocast = _autocast(precision)
    idx_parts: list[torch.Tensor] = []
    feat_parts: list[torch.Tensor] = []
    cls_parts: list[torch.Tensor] = []
    if num_batches is None and hasattr(loader, "__len__"):
        num_batches = len(loader)  # type: ignore[arg-type]
    batches = loader if num_batches is None else itertools.islice(loader, num_batches)
    for batch in progress(batches, total=num_batches, desc=desc):
        with torch.inference_mode(), autocast:
            feats = embed(batch.views[0])
        # inference tensors; `torch.cat` below, outside inference mode, makes ordinary ones of them
        feats = feats.float()
        if feats.ndim != 2 or feats.shape[0] != len(batch):
            raise ValueError(f"extract_features: embed returned shape {tuple(feats.shape)} for "
                             f"{len(batch)} samples; expected (batch, dim)")
        feat_parts.append(feats)
        idx_parts.append(batch.idx.to(device=feats.device, dtype=torch.int64))
        cls_parts.append(batch.cls.to(device=feats.device, dtype=torch.int64))
        stop_if_requested(should_stop, desc)
    mine = (sum(p.shape[0] for p in feat_parts), feat_parts[0].shape[1] if feat_parts else None)
    everyone = dist.all_gather_object(mine)
    dim = _one_width([d for n, d in everyone if n])
    if not feat_parts:
        device = dist.device()
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return SplitFeatures(empty, torch.zeros(0, dim, device=device), empty.clone(),
                             sum(n for n, _ in everyone))
    feats = torch.cat(feat_parts)
    bad = int((~torch.isfinite(feats)).any(dim=1).sum())
    if bad:
        raise ValueError(f"extract_features: {bad} of {feats.shape[0]} embeddings on rank {dist.rank()} "
                         "are NaN or infinite; check the checkpoint and the learning rate")
    if normalize:
        feats = F.normalize(feats, dim=1)
    return SplitFeatures(torch.cat(idx_parts), feats, torch.cat(cls_parts), sum(n for n, _ in everyone))


def split_features(embed: Embed, data: DataConfig, split: str, *, epoch: int = 0, seed: int = 0,
                   normalize: bool = False, desc: str | None = None,
                   cluster: ClusterConfig | None = None,
                   should_stop: StopCheck | None = None) -> SplitFeatures:
    """`extract_features` over the eval loader of `split` (resize + center crop, no randomness).

    Args:
        embed: as in `extract_features`; the caller sets eval mode and owns the device.
        data: loader settings (shards folder, backend, sizes, eval batch size).
        split: a split of the shard folder's manifest.
        epoch, seed: passed to the loader (the eval transform draws no random numbers; the epoch
            only names the plan).
        normalize: L2-normalise every row.
        desc: progress-bar label (default "features <split>").
        cluster: the clustering pass's settings: `feature_batch_size` images per rank per step
            (0 = 4 x `data.eval_batch_size`) and `feature_precision`. None (the kNN monitor, the
            evaluations): `data.eval_batch_size` in fp32.
        should_stop: as in `extract_features`.
    """
    precision = "fp32"
    if cluster is not None:
        data = dataclasses.replace(data, eval_batch_size=feature_batch_size(cluster, data))
        precision = cluster.feature_precision
    _autocast(precision)  # a refused precision stops before the loader starts its workers
    info = split_info(data.shards, split)
    loader = build_loader(data, split=split, mode="eval", rank=dist.rank(), world=dist.world(),
                          epoch=epoch, seed=seed, device=dist.device())
    try:
        out = extract_features(embed, loader, normalize=normalize, desc=desc or f"features {split}",
                               precision=precision, should_stop=should_stop)
    finally:
        loader.close()
    out.class_names = list(info.class_names)
    return out


def feature_batch_size(cluster: ClusterConfig, data: DataConfig) -> int:
    """Images per rank per step of the clustering feature pass (`cluster.feature_batch_size`).

    0 means 4 x `data.eval_batch_size`: the pass keeps no activations for a backward, so it fits
    several eval batches in the memory of one training step, and fewer, larger steps keep the GPU
    busier.
    """
    return cluster.feature_batch_size or 4 * data.eval_batch_size


def _autocast(precision: str) -> AbstractContextManager:
    """The autocast region of the feature pass for `cluster.feature_precision` = `precision`."""
    if precision not in FEATURE_PRECISIONS:
        raise ConfigError(f"cluster.feature_precision: must be one of {FEATURE_PRECISIONS}, "
                          f"got {precision!r}")
    if precision == "fp32":
        return nullcontext()
    device = dist.device()
    if device.type != "cuda":
        # refused rather than ignored: CPU bf16 autocast is slow on most CPUs and would change
        # the features without a GPU to gain from it
        raise ConfigError(f"cluster.feature_precision: bf16 needs CUDA (autocast on the GPU), but this "
                          f"rank computes on {device}; set cluster.feature_precision=fp32")
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def agree_dim(feats: torch.Tensor) -> int:
    """Feature width from the ranks that have rows (a rank may have none); call on every rank."""
    mine = int(feats.shape[1]) if feats.ndim == 2 and feats.shape[0] > 0 else None
    return _one_width(list(dist.all_gather_object(mine)))


def _one_width(widths: list[int | None]) -> int:
    found = {d for d in widths if d is not None}
    if len(found) != 1:
        raise ValueError(f"features: ranks disagree on the feature width ({sorted(found)}) or no rank "
                         "has any row; check the eval loader and the split's size")
    return found.pop()


def gather_by_idx(idx: torch.Tensor, values: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Every rank's rows placed at their dataset index: (num_samples, ...) on every rank.

    Raises:
        ValueError: when the indices over all ranks are not exactly 0..num_samples-1 once each.
    """
    all_idx = dist.all_gather_cat(idx)
    all_values = dist.all_gather_cat(values)
    inside = (all_idx >= 0) & (all_idx < num_samples)
    hist = torch.bincount(all_idx[inside], minlength=num_samples)
    if all_idx.numel() != num_samples or not bool(inside.all()) or bool((hist != 1).any()):
        raise ValueError(f"evaluation: the eval loader returned {all_idx.numel()} rows for {num_samples} "
                         f"samples ({int((hist == 0).sum())} missing); the shards' idx must be 0..N-1, "
                         "each once (check with `hcsc-shards verify`)")
    out = all_values.new_zeros((num_samples, *all_values.shape[1:]))
    out[all_idx] = all_values
    return out
