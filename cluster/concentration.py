"""Prototype concentration phi (method.md §2.4; "density" in the official code, the PCL formula).

Computed from per-cluster aggregates (member count and sum of sqrt distances), so level 1 needs
only one all-reduce of two (M,) vectors instead of the official per-sample Python loop.
"""

from __future__ import annotations

import torch


def cluster_sums(labels: torch.Tensor, sq_dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster member count and sum of sqrt(squared L2 distance), both float64 (k,).

    Tiny negative squared distances (rounding in ||x||^2 + ||c||^2 - 2 x.c) are clamped to 0.
    """
    counts = torch.bincount(labels, minlength=k).double()
    dist = sq_dist.double().clamp_min(0).sqrt()
    sums = torch.zeros(k, dtype=torch.float64, device=labels.device).index_add_(0, labels, dist)
    return counts, sums


def concentration(counts: torch.Tensor, dist_sums: torch.Tensor, temperature: float,
                  level: int) -> torch.Tensor:
    """phi for one level (method.md §2.4), float32 (M,), mean exactly `temperature` (to float32).

    1. phi_m = mean(d_x) / ln(|S_m| + 10) for clusters with more than one member;
    2. singletons and empty clusters get the max of those;
    3. clip to the 10th and 90th percentiles over all M clusters (numpy's linear interpolation);
    4. rescale to mean `temperature`.

    Args:
        counts: (M,) members per cluster.
        dist_sums: (M,) sum over members of the (non-squared) L2 distance to the raw centroid.
        temperature: T, the target mean.
        level: 1-based level, for error messages.
    """
    counts, dist_sums = counts.double().cpu(), dist_sums.double().cpu()
    multi = counts > 1
    if not bool(multi.any()):
        raise ValueError(f"level {level}: every one of the {counts.numel()} clusters has at most one "
                         "member, so concentration is undefined; use fewer clusters at this level")
    phi = torch.zeros_like(dist_sums)
    phi[multi] = dist_sums[multi] / counts[multi] / torch.log(counts[multi] + 10)
    phi[~multi] = phi[multi].max()
    low, high = torch.quantile(phi, torch.tensor([0.1, 0.9], dtype=torch.float64))
    phi = phi.clamp(low, high)
    mean = phi.mean()
    if not bool(mean > 0):
        raise ValueError(f"level {level}: every cluster has zero spread (all members equal their "
                         "centroid), so concentration is undefined; check the features")
    return (temperature * phi / mean).float()
