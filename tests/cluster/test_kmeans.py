"""cluster/kmeans.py on one process agrees with faiss.Clustering (same data, same initialisation)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from cluster.kmeans import assign, kmeans


def _faiss(x, k, *, niter=20, nredo=1, seed=0, max_ppc=1000, min_ppc=10, spherical=False, init=None,
           early_stop=True):
    clus = faiss.Clustering(x.shape[1], k)
    if not early_stop:  # faiss 1.7 (the official code's) always ran niter iterations
        clus.early_stop_threshold = -1.0
    clus.niter, clus.nredo, clus.seed, clus.spherical = niter, nredo, seed, spherical
    clus.max_points_per_centroid, clus.min_points_per_centroid = max_ppc, min_ppc
    if init is not None:  # faiss: centroids set before train() are the initialisation
        faiss.copy_array_to_vector(init.ravel(), clus.centroids)
    index = faiss.IndexFlatL2(x.shape[1])
    clus.train(x, index)
    stats = clus.iteration_stats
    last = stats.at(stats.size() - 1)
    _, labels = index.search(x, 1)
    return faiss.vector_to_array(clus.centroids).reshape(k, -1), labels[:, 0], last.obj


def _ours(x, k, *, niter=20, nredo=1, seed=0, max_ppc=1000, min_ppc=10, spherical=False, init=None):
    km = kmeans(torch.from_numpy(x), torch.arange(len(x)), num_samples=len(x), k=k, niter=niter,
                nredo=nredo, seed=seed, max_points_per_centroid=max_ppc, min_points_per_centroid=min_ppc,
                spherical=spherical, init=init, distributed=False)
    labels, _ = assign(torch.from_numpy(x), km.centroids)
    return km.centroids, labels.numpy(), km.objective, km


def _data(n=2000, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _assert_agree(ours, ref, atol=2e-6):
    np.testing.assert_allclose(ours[0], ref[0], atol=atol)
    np.testing.assert_array_equal(ours[1], ref[1])
    assert ours[2] == pytest.approx(ref[2], rel=1e-5)


@pytest.mark.parametrize(("nredo", "seed"), [(1, 0), (3, 1), (5, 3)])
def test_own_initialisation_and_restarts_match_faiss(nredo, seed):
    x = _data(seed=seed)
    _assert_agree(_ours(x, 20, nredo=nredo, seed=seed), _faiss(x, 20, nredo=nredo, seed=seed))


def test_stopping_at_convergence_equals_running_every_iteration():
    # k close to n converges in a few iterations; faiss without early stop runs all 20
    x = _data(n=300, seed=8)
    ours = _ours(x, 200, nredo=2)
    assert ours[3].iterations < 20
    _assert_agree(ours, _faiss(x, 200, nredo=2, early_stop=False))


def test_restart_choice_is_the_lowest_objective_like_faiss():
    x = _data(seed=1)
    ours = _ours(x, 20, nredo=3, seed=0, niter=3)
    runs = [_ours(x, 20, nredo=1, niter=3, init=_faiss_init(x, 20, seed=0, redo=r))[2] for r in range(3)]
    assert ours[3].restart == int(np.argmin(runs)) and ours[2] == min(runs)
    _assert_agree(ours, _faiss(x, 20, nredo=3, seed=0, niter=3))


def _faiss_init(x, k, seed, redo):
    perm = np.zeros(len(x), dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), len(x), seed + 1 + redo * 15486557)
    return x[perm[:k]].copy()


def test_provided_initial_centroids_match_faiss():
    x = _data(seed=2)
    init = _data(n=20, seed=9)
    _assert_agree(_ours(x, 20, init=init), _faiss(x, 20, init=init))


def test_provided_initialisation_continues_across_restarts_like_faiss():
    x = _data(seed=4)
    init = x[:20].copy()
    _assert_agree(_ours(x, 20, nredo=2, niter=4, init=init), _faiss(x, 20, nredo=2, niter=4, init=init))


def test_subsampling_above_max_points_per_centroid_matches_faiss():
    x = _data(seed=5)
    ours, ref = _ours(x, 20, nredo=2, max_ppc=30), _faiss(x, 20, nredo=2, max_ppc=30)
    assert ours[3].num_train == 600
    _assert_agree(ours, ref)


def test_empty_clusters_are_split_like_faiss():
    # duplicate initial centroids: one of each pair starts empty and must be split (faiss: 2 splits)
    rng = np.random.default_rng(1)
    blobs = rng.standard_normal((5, 16)).astype(np.float32) * 5
    x = (blobs[rng.integers(0, 5, 600)] + 0.01 * rng.standard_normal((600, 16))).astype(np.float32)
    init = x[:50].copy()
    init[1], init[7] = init[0], init[3]
    ours = _ours(x, 50, init=init)
    assert ours[3].nsplit >= 2
    _assert_agree(ours, _faiss(x, 50, init=init), atol=5e-6)


def test_random_initialisation_on_duplicate_rows_splits_like_faiss():
    # 60 distinct rows, each 10 times: the random initialisation picks duplicates (empties).
    # One iteration only: afterwards exact distance ties between split twins are resolved by
    # float32 rounding, which differs from faiss because we sum in float64 (documented).
    rng = np.random.default_rng(1)
    x = np.repeat(rng.standard_normal((60, 16)).astype(np.float32), 10, axis=0)[rng.permutation(600)]
    clus = faiss.Clustering(16, 50)
    clus.niter, clus.seed = 1, 0
    clus.train(x, faiss.IndexFlatL2(16))
    faiss_splits = clus.iteration_stats.at(0).nsplit
    ours = _ours(x, 50, niter=1)
    assert ours[3].nsplit == faiss_splits > 0
    np.testing.assert_allclose(ours[0], faiss.vector_to_array(clus.centroids).reshape(50, 16), atol=2e-6)


def test_spherical_matches_faiss():
    x = _data(seed=6)
    ours = _ours(x, 20, nredo=2, spherical=True)
    _assert_agree(ours, _faiss(x, 20, nredo=2, spherical=True))
    np.testing.assert_allclose(np.linalg.norm(ours[0], axis=1), 1, atol=1e-6)


def test_as_many_points_as_clusters_copies_the_rows_like_faiss():
    x = _data(n=20, seed=7)
    _assert_agree(_ours(x, 20, nredo=3), _faiss(x, 20, nredo=3), atol=0)


def test_fewer_points_than_clusters_is_a_clear_error():
    with pytest.raises(ValueError, match="19 rows cannot make 20 clusters"):
        _ours(_data(n=19), 20)
