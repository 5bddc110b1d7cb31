"""hierarchical_kmeans on one process: method.md §10 items 5-6, errors, warm start."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cluster.concentration import cluster_sums, concentration
from cluster.hierarchy import hierarchical_kmeans
from cluster.kmeans import assign
from cluster.prototypes import Prototypes
from core.config import ClusterConfig
from tests.cluster._data import planted

LEVELS = [20, 10, 5]
T = 0.2


@pytest.fixture(scope="module")
def result() -> tuple[torch.Tensor, torch.Tensor, Prototypes]:
    idx, feats = planted()
    return idx, feats, hierarchical_kmeans(idx, feats, num_samples=2000, num_clusters=LEVELS,
                                           cfg=ClusterConfig(), temperature=T)


def test_shapes_and_dtypes(result):
    _, _, protos = result
    assert [t.shape for t in protos.im2cluster] == [(2000,)] * 3
    assert all(t.dtype == torch.int64 for t in protos.im2cluster + protos.cluster2cluster)
    assert [t.shape for t in protos.centroids] == [(20, 16), (10, 16), (5, 16)]
    assert [t.shape for t in protos.density] == [(20,), (10,), (5,)]
    assert [t.shape for t in protos.cluster2cluster] == [(20,), (10,)]
    assert [t.shape for t in protos.logits] == [(20, 10), (10, 5)]
    for level, parent in enumerate(protos.cluster2cluster):
        assert parent.min() >= 0 and parent.max() < LEVELS[level + 1]


def test_parent_maps_are_consistent(result):
    _, _, protos = result
    for level, parent in enumerate(protos.cluster2cluster):
        assert torch.equal(protos.im2cluster[level + 1], parent[protos.im2cluster[level]])


def test_unit_centroids_and_bounded_similarities(result):
    _, _, protos = result
    for c in protos.centroids:
        torch.testing.assert_close(c.norm(dim=1), torch.ones(c.shape[0]))
    for level, a in enumerate(protos.logits):
        assert a.abs().max() <= 1
        torch.testing.assert_close(a, protos.centroids[level] @ protos.centroids[level + 1].T)


def test_assignments_are_nearest_raw_centroid_in_l2(result):
    idx, feats, protos = result
    dists = torch.cdist(feats, protos.raw_centroids[0])
    nearest = dists.argmin(dim=1)
    agree = (nearest == protos.im2cluster[0][idx]).float().mean()
    assert agree == 1.0
    parents = torch.cdist(protos.centroids[0], protos.raw_centroids[1]).argmin(dim=1)
    assert torch.equal(parents, protos.cluster2cluster[0])


def test_concentration_mean_is_the_temperature_at_every_level(result):
    _, _, protos = result
    for phi in protos.density:
        assert phi.double().mean().item() == pytest.approx(T, abs=1e-6)


def test_concentration_recomputed_from_the_assignments(result):
    idx, feats, protos = result
    labels, sq = assign(feats, protos.raw_centroids[0].numpy())
    assert torch.equal(labels, protos.im2cluster[0][idx])
    counts, sums = cluster_sums(labels, sq, 20)
    torch.testing.assert_close(protos.density[0], concentration(counts, sums, T, 1))


def test_upper_level_singletons_get_the_clipped_max():
    idx, feats = planted(n=600, centers=30, seed=3)
    protos = hierarchical_kmeans(idx, feats, num_samples=600, num_clusters=[30, 20, 4],
                                 cfg=ClusterConfig(nredo=1), temperature=T)
    sizes = torch.bincount(protos.cluster2cluster[0], minlength=20)
    assert (sizes <= 1).any(), "30 -> 20 clusters must leave singletons"
    phi = protos.density[1]
    assert torch.all(phi[sizes <= 1] == phi.max())
    assert protos.stats[1].smallest <= 1


def test_stats_are_reported(result):
    _, _, protos = result
    first = protos.stats[0]
    assert [s.level for s in protos.stats] == [1, 2, 3]
    assert first.points == 2000 and first.clusters == 20 and first.empty == 0
    assert first.largest >= 2000 / 20 >= first.smallest > 0
    assert first.final_objective > 0 and first.objective > 0 and first.seconds > 0


def test_to_keeps_the_warm_start_state(result):
    _, _, protos = result
    moved = protos.to("cpu")
    assert isinstance(moved, Prototypes) and len(moved.raw_centroids) == 3
    assert moved.stats == protos.stats


def test_warm_start_uses_previous_centroids_and_one_short_restart(result):
    idx, feats, protos = result
    cfg = ClusterConfig(warm_start=True, warm_start_niter=3)
    warm = hierarchical_kmeans(idx, feats, num_samples=2000, num_clusters=LEVELS, cfg=cfg,
                               temperature=T, previous=protos)
    assert all(s.warm for s in warm.stats)
    # from converged centroids on the same data, a short run stays (almost) where it was
    assert warm.stats[0].final_objective <= protos.stats[0].final_objective * (1 + 1e-4)
    cold = hierarchical_kmeans(idx, feats, num_samples=2000, num_clusters=LEVELS,
                               cfg=dataclasses.replace(cfg, nredo=1, niter=2), temperature=T, previous=None)
    assert not any(s.warm for s in cold.stats)


def test_idx_must_cover_every_sample_once():
    idx, feats = planted(n=200)
    bad = idx.clone()
    bad[0] = bad[1]
    with pytest.raises(ValueError, match=r"1 missing, 1 duplicated, 0 out of range"):
        hierarchical_kmeans(bad, feats, num_samples=200, num_clusters=[5, 2], cfg=ClusterConfig(),
                            temperature=T)


def test_too_few_samples_names_the_level():
    idx, feats = planted(n=200)
    with pytest.raises(ValueError, match="level 1: 200 samples cannot make 300 clusters"):
        hierarchical_kmeans(idx, feats, num_samples=200, num_clusters=[300, 2], cfg=ClusterConfig(),
                            temperature=T)
    with pytest.raises(ValueError, match="level 2: 5 level-1 clusters cannot make 6 clusters"):
        hierarchical_kmeans(idx, feats, num_samples=200, num_clusters=[5, 6], cfg=ClusterConfig(),
                            temperature=T)


def test_non_finite_features_are_counted():
    idx, feats = planted(n=200)
    feats = feats.clone()
    feats[3, 0], feats[7, 5] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 feature rows are NaN or infinite"):
        hierarchical_kmeans(idx, feats, num_samples=200, num_clusters=[5, 2], cfg=ClusterConfig(),
                            temperature=T)


def test_spherical_option_gives_unit_raw_centroids():
    idx, feats = planted(n=500)
    cfg = dataclasses.replace(ClusterConfig(), spherical=True, nredo=1)
    protos = hierarchical_kmeans(idx, feats, num_samples=500, num_clusters=[10, 4], cfg=cfg, temperature=T)
    np.testing.assert_allclose(protos.raw_centroids[0].norm(dim=1).numpy(), 1, atol=1e-6)
