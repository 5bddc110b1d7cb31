"""The final evaluation's val clustering runs our k-means where the features are (the GPU on a GPU
run) and reproduces what `faiss.Kmeans` with its defaults gave before."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluate.metrics import clustering_scores
from train.monitor import _val_clustering


def _faiss_kmeans_scores(feats: torch.Tensor, labels: torch.Tensor, k: int, seed: int) -> dict[str, float]:
    """The previous implementation: faiss.Kmeans (defaults: 256 rows per centroid at most) on the host."""
    x = F.normalize(feats, dim=1).numpy().astype(np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=20, nredo=5, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(x)
    _, found = km.index.search(x, 1)
    return {f"val_{n}": v for n, v in clustering_scores(labels.numpy(), found[:, 0]).items()}


@pytest.mark.parametrize("n", [1500, 4000])  # below and above faiss's 256-rows-per-centroid subsampling
def test_val_clustering_equals_faiss_kmeans_with_its_defaults(n):
    g = torch.Generator().manual_seed(3)
    k = 10
    means = F.normalize(torch.randn(k, 24, generator=g), dim=1)
    labels = torch.randint(0, k, (n,), generator=g)
    feats = means[labels] + 1.2 * torch.randn(n, 24, generator=g) / 24**0.5
    ours = _val_clustering(feats, labels, k, seed=7, search="auto")
    assert ours == pytest.approx(_faiss_kmeans_scores(feats, labels, k, seed=7), abs=1e-9)
    assert 0.3 < ours["val_nmi"] < 1.0  # a real clustering, not a degenerate one
