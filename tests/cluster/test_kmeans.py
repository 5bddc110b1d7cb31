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


def test_chunked_cpu_search_equals_one_faiss_search():
    # Searcher splits CPU searches into _SEARCH_CHUNK-row calls (memory); a row count that is not a
    # multiple of the chunk, against one faiss call over all rows, must give identical results.
    from cluster.kmeans import _SEARCH_CHUNK

    x = _data(n=2 * _SEARCH_CHUNK + 37, d=32, seed=3)
    centroids = _data(n=300, d=32, seed=4)
    index = faiss.IndexFlatL2(32)
    index.add(centroids)
    want_dis, want_lab = index.search(x, 1)
    lab, dis = assign(torch.from_numpy(x), centroids)
    np.testing.assert_array_equal(lab.numpy(), want_lab[:, 0])
    np.testing.assert_array_equal(dis.numpy(), want_dis[:, 0])


def _planted128(n=3000, centers=60, seed=0):
    """Unit vectors in 128-d: n * 128 is above faiss's BLAS threshold, so faiss takes its BLAS path."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, 128))
    x = means[rng.integers(0, centers, n)] + 1.2 * rng.standard_normal((n, 128)) / 128**0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pruned_lloyd_iterations_match_faiss_on_its_blas_path():
    from cluster.kmeans import BoundedAssignment

    x = _planted128(n=4000)
    k = BoundedAssignment.MIN_CLUSTERS  # the smallest k that uses the bounds
    assert len(x) * 128 >= faiss.cvar.distance_compute_blas_threshold
    ours = _ours(x, k, nredo=2)
    # the bounds skipped searches (the first iteration of a restart searches every row) ...
    assert ours[3].iterations > 2 and ours[3].searched < 1.0
    # ... and changed nothing
    _assert_agree(ours, _faiss(x, k, nredo=2, early_stop=False))
    km = kmeans(torch.from_numpy(x), torch.arange(len(x)), num_samples=len(x), k=k, niter=20, nredo=2,
                seed=0, max_points_per_centroid=1000, min_points_per_centroid=10, distributed=False,
                prune=False)
    assert km.searched == 1.0
    np.testing.assert_array_equal(km.centroids, ours[0])


@pytest.mark.parametrize("movers", [4, 64])  # 4 of 40 centroids measured directly; 64: none (k too small)
# (BoundedAssignment directly: kmeans() itself uses it only from MIN_CLUSTERS clusters on)
def test_bounded_assignment_equals_a_full_faiss_search_at_every_step(monkeypatch, movers):
    # Centroids drift step by step; exact twins and near-twins are planted on purpose.
    from cluster.kmeans import BoundedAssignment, Searcher

    monkeypatch.setattr(BoundedAssignment, "MOVERS", movers)
    rng = np.random.default_rng(5)
    x = _planted128(n=2500, seed=5)
    c = x[rng.choice(len(x), 40, replace=False)].copy()
    searcher = Searcher(128, torch.device("cpu"))
    bounded = BoundedAssignment(x, searcher)
    near_ties = 0
    for step in range(8):
        c = (c + 0.02 / (step + 1) * rng.standard_normal(c.shape)).astype(np.float32)
        c[1] = c[0]  # an exact tie
        c[3] = c[2] + np.float32(1e-7)  # a near-tie within float rounding
        searcher.set_centroids(c)
        dis, lab = bounded.assign(c)
        index = faiss.IndexFlatL2(128)
        index.add(c)
        want_dis, want_lab = index.search(x, 2)
        # Where faiss's two nearest are further apart than its own rounding, the labels are
        # identical; within rounding (the planted twins), faiss's choice depends on the row's
        # position in its search block, so either of the two is faiss's answer.
        clear = want_dis[:, 1] - want_dis[:, 0] > 1e-5
        near_ties += int((~clear).sum())
        np.testing.assert_array_equal(lab.numpy()[clear], want_lab[clear, 0], err_msg=f"step {step}")
        tied = lab.numpy()[~clear]
        assert ((tied == want_lab[~clear, 0]) | (tied == want_lab[~clear, 1])).all()
        np.testing.assert_allclose(dis.numpy(), want_dis[:, 0], rtol=1e-5, atol=1e-6)
    assert near_ties > 0  # the twins were exercised
    assert bounded.searched < 0.7 * bounded.rows
