"""Small planted-cluster data shared by the clustering tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def planted(n: int = 2000, d: int = 16, centers: int = 40, noise: float = 0.35, seed: int = 0):
    """(idx, features): n unit vectors around `centers` random directions, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(centers, d, generator=g), dim=1)
    labels = torch.randint(0, centers, (n,), generator=g)
    feats = F.normalize(means[labels] + noise * torch.randn(n, d, generator=g) / d**0.5, dim=1)
    idx = torch.randperm(n, generator=g)
    return idx, feats[idx]
