"""Exactly-once feature extraction for clustering (spec 2.2, 10 item 12).

The eval loader already yields every sample exactly once across ranks (padding dropped by idx),
so each rank keeps only its own rows: no dense N x d all-reduce and no duplicate summing (the
official code's "norm > 1.5, divide by 2" repair is not needed).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from pipeline.batch import Batch
from train import dist
from train.logging import progress


def extract_features(embed: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[Batch], *,
                     num_batches: int | None = None,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Embed the first view of every batch; return this rank's (idx, features).

    The caller puts the model in eval mode and passes `model.embed_momentum` (the momentum
    encoder with its MLP head, spec 2.2).

    Args:
        embed: maps views (B, 3, H, W) to embeddings (B, d).
        loader: yields `Batch` objects; only `views[0]` and `idx` are read.
        num_batches: batches to read (also the progress-bar total); None reads the loader to
            its end.
        desc: progress-bar label.

    Returns:
        idx int64 (n_local,) and features float32 (n_local, d), L2-normalised, on the device
        that computed them. A rank that saw no batch returns (0,) and (0, 0) tensors on
        `dist.device()`; `hierarchical_kmeans` takes d from the other ranks.

    Raises:
        ValueError: when any embedding row is NaN or infinite (names how many).
    """
    idx_parts: list[torch.Tensor] = []
    feat_parts: list[torch.Tensor] = []
    with torch.no_grad():
        batches = loader if num_batches is None else itertools.islice(loader, num_batches)
        for batch in progress(batches, total=num_batches, desc=desc):
            feats = embed(batch.views[0]).float()
            idx_parts.append(batch.idx.to(device=feats.device, dtype=torch.int64))
            feat_parts.append(feats)
    if not feat_parts:
        device = dist.device()
        return (torch.zeros(0, dtype=torch.int64, device=device),
                torch.zeros(0, 0, dtype=torch.float32, device=device))
    idx, feats = torch.cat(idx_parts), torch.cat(feat_parts)
    if feats.ndim != 2 or feats.shape[0] != idx.shape[0]:
        raise ValueError(f"extract_features: embed returned shape {tuple(feats.shape)} for "
                         f"{idx.shape[0]} samples; expected (batch, dim)")
    bad = int((~torch.isfinite(feats)).any(dim=1).sum())
    if bad:
        raise ValueError(f"extract_features: {bad} of {feats.shape[0]} embeddings on rank {dist.rank()} "
                         "are NaN or infinite; check the checkpoint and the learning rate")
    # The head already normalises; normalise again so clustering never sees drifted norms.
    return idx, F.normalize(feats, dim=1)
