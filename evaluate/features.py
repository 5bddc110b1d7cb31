"""Trunk features of a shard split through the eval pipeline, on every rank (spec 7.1).

The eval loader yields every sample exactly once across ranks with its dataset index, so each
rank extracts only its share; `gather_by_idx` assembles a whole split in dataset order when a
command needs it on every rank (kNN queries, labels for clustering scores).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline import build_loader
from shards.format import split_info
from train import dist
from train.config import DataConfig
from train.logging import progress

log = logging.getLogger(__name__)


@dataclass
class SplitFeatures:
    """This rank's rows of a split: dataset indices, features (n_local, d) and class ids."""

    idx: torch.Tensor
    feats: torch.Tensor
    cls: torch.Tensor
    num_samples: int
    class_names: list[str]


def data_config(shards: str, *, backend: str = "dali", image_size: int = 224, resize: int = 256,
                interpolation: str = "bilinear", batch_size: int = 128, workers: int = 4,
                min_scale: float = 0.08) -> DataConfig:
    """A `DataConfig` for evaluation: `batch_size` per rank serves both eval and linear mode.

    ``min_scale`` 0.08 is torchvision's RandomResizedCrop default, the linear protocol (spec 7.1).
    ``interpolation`` is the eval-mode resize filter (bicubic for kNN and clustering, spec 7.1).
    """
    return DataConfig(shards=str(shards), backend=backend, image_size=image_size, eval_resize=resize,
                      eval_interpolation=interpolation,
                      batch_size=batch_size, eval_batch_size=batch_size, workers=workers,
                      min_scale=min_scale, max_scale=1.0, blur=False)


@torch.no_grad()
def extract(net: Callable[[torch.Tensor], torch.Tensor], data: DataConfig, split: str, *,
            seed: int = 0, normalize: bool = False) -> SplitFeatures:
    """Run `net` over `split` (eval transform: resize + center crop) on this rank's share.

    Args:
        net: images (B, 3, H, W) -> features (B, d); the caller sets eval mode and the device.
        data: loader settings (`data_config`).
        split: split name in the shard folder's ``_info.json``.
        seed: passed to the loader (the eval transform draws no random numbers).
        normalize: L2-normalise each row.
    """
    info = split_info(data.shards, split)
    device = dist.device()
    loader = build_loader(data, split=split, mode="eval", rank=dist.rank(), world=dist.world(), epoch=0,
                          seed=seed, device=device)
    idx, feats, cls = [], [], []
    try:
        for batch in progress(loader, total=len(loader), desc=f"features {split}"):
            feats.append(net(batch.views[0]).float())
            idx.append(batch.idx.to(device, torch.int64))
            cls.append(batch.cls.to(device, torch.int64))
    finally:
        loader.close()
    if feats:
        out = torch.cat(feats)
        if normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        idx_t, cls_t = torch.cat(idx), torch.cat(cls)
    else:  # a rank whose share is empty (more ranks than samples)
        out = torch.zeros(0, 0, device=device)
        idx_t = cls_t = torch.zeros(0, dtype=torch.int64, device=device)
    return SplitFeatures(idx_t, out, cls_t, int(info["num_samples"]), list(info.get("class_names", [])))


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


def agree_dim(feats: torch.Tensor) -> int:
    """Feature width from the ranks that have rows (a rank may have none)."""
    mine = int(feats.shape[1]) if feats.shape[0] else None
    dims = {d for d in dist.all_gather_object(mine) if d is not None}
    if len(dims) != 1:
        raise ValueError(f"evaluation: ranks disagree on the feature width or none has rows ({dims})")
    return dims.pop()


def fix_empty(feats: torch.Tensor, dim: int) -> torch.Tensor:
    """A (0, dim) tensor for a rank without rows, so collectives see consistent shapes."""
    return feats if feats.shape[0] else feats.new_zeros((0, dim))
