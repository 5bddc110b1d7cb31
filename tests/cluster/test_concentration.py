"""Concentration phi (method.md §2.4, 10 item 6): hand-computed toy, the official per-sample loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cluster.concentration import cluster_sums, concentration


def _official_loop(labels, sq_dist, k, temperature):
    """The PCL/HCSC per-sample loop (method.md §2.4), written naively."""
    members = [[] for _ in range(k)]
    for i, c in enumerate(labels):
        members[c].append(sq_dist[i])
    density = np.zeros(k)
    for c, dist in enumerate(members):
        if len(dist) > 1:
            density[c] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + 10)
    dmax = density.max()
    for c, dist in enumerate(members):
        if len(dist) <= 1:
            density[c] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    return temperature * density / density.mean()


def _phi(labels, sq_dist, k, temperature=0.2):
    counts, sums = cluster_sums(torch.as_tensor(labels), torch.as_tensor(sq_dist), k)
    return concentration(counts, sums, temperature, level=1)


def test_toy_example_by_hand():
    # cluster 0: distances 1, 3 -> mean 2 / ln 12; cluster 1: 2, 2, 2 -> 2 / ln 13;
    # cluster 2: singleton -> max of the others = 2 / ln 12. Percentiles over [a, b, a] with a > b:
    # P10 = b + 0.2 (a - b), P90 = a; so phi~ = [a, P10, a], rescaled to mean 0.5.
    labels = [0, 0, 1, 1, 1, 2]
    sq_dist = [1.0, 9.0, 4.0, 4.0, 4.0, 0.25]
    a, b = 2 / math.log(12), 2 / math.log(13)
    p10 = b + 0.2 * (a - b)
    raw = torch.tensor([a, p10, a], dtype=torch.float64)
    expected = 0.5 * raw / raw.mean()
    torch.testing.assert_close(_phi(labels, sq_dist, 3, 0.5), expected.float(), rtol=1e-6, atol=0)


def test_matches_the_official_loop_with_singletons_and_empty_clusters():
    rng = np.random.default_rng(0)
    k = 50
    labels = rng.integers(0, 40, 600)  # clusters 40..49 empty
    labels[:3] = [40, 41, 42]  # ...and three singletons
    labels = labels.astype(np.int64)
    sq_dist = rng.uniform(0, 2, 600).astype(np.float32)
    ours = _phi(labels, sq_dist, k)
    ref = _official_loop(labels, sq_dist, k, 0.2)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6)
    assert ours.mean().item() == pytest.approx(0.2, abs=1e-6)
    # singletons and empties got the max, which the clip then brought to P90 (method.md §10.6)
    assert torch.all(ours[40:] == ours.max())


def test_clip_bounds_and_mean():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 100, 5000)
    sq_dist = rng.exponential(1.0, 5000).astype(np.float32)
    phi = _phi(labels, sq_dist, 100, 0.2).double()
    counts, sums = cluster_sums(torch.as_tensor(labels), torch.as_tensor(sq_dist), 100)
    pre = sums / counts / torch.log(counts + 10)
    low, high = np.percentile(pre.numpy(), [10, 90])
    clipped_mean = pre.clamp(low, high).mean().item()
    assert phi.mean().item() == pytest.approx(0.2, abs=1e-6)
    assert phi.min().item() == pytest.approx(0.2 * low / clipped_mean, rel=1e-6)
    assert phi.max().item() == pytest.approx(0.2 * high / clipped_mean, rel=1e-6)


def test_negative_rounding_distances_are_clamped():
    counts, sums = cluster_sums(torch.tensor([0, 0]), torch.tensor([-1e-7, 4.0]), 1)
    assert counts.item() == 2 and sums.item() == 2.0


def test_all_singletons_is_a_clear_error():
    with pytest.raises(ValueError, match="level 2: every one of the 3 clusters has at most one member"):
        concentration(torch.ones(3), torch.ones(3), 0.2, level=2)
