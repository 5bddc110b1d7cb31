"""cluster/faiss_compat.py reproduces faiss's random streams and empty-cluster split exactly."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cluster import faiss_compat


@pytest.mark.parametrize(("n", "m", "seed"), [(1000, 1000, 5), (5000, 37, 1), (2, 2, 0),
                                              (300, 299, 15486558), (1, 1, 3)])
def test_rand_perm_prefix_matches_faiss(n, m, seed):
    perm = np.zeros(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
    np.testing.assert_array_equal(faiss_compat.rand_perm_prefix(n, m, seed), perm[:m])


def test_uniform_stream_matches_faiss_random_generator():
    rng = faiss.RandomGenerator(faiss_compat.SPLIT_SEED)
    expected = np.array([rng.rand_float() for _ in range(1000)], dtype=np.float32)
    stream = faiss_compat._UniformStream(faiss_compat.SPLIT_SEED, block=64)  # several refills
    got = np.concatenate([stream.take(300).copy(), (stream.consume(300), stream.take(700))[1]])
    np.testing.assert_array_equal(got, expected)


def _naive_split(centroids, hassign, n):
    """faiss split_clusters line by line, drawing from faiss's own RandomGenerator."""
    k, d = centroids.shape
    rng = faiss.RandomGenerator(1234)
    for ci in range(k):
        if hassign[ci] == 0:
            cj = 0
            while True:
                p = np.float32((float(hassign[cj]) - 1.0) / float(np.float32(n - k)))
                if np.float32(rng.rand_float()) < p:
                    break
                cj = (cj + 1) % k
            centroids[ci] = centroids[cj]
            for j in range(d):
                a, b = (1 + 1 / 1024, 1 - 1 / 1024) if j % 2 == 0 else (1 - 1 / 1024, 1 + 1 / 1024)
                centroids[ci, j] = np.float32(float(centroids[ci, j]) * a)
                centroids[cj, j] = np.float32(float(centroids[cj, j]) * b)
            hassign[ci] = hassign[cj] / np.float32(2)
            hassign[cj] -= hassign[ci]


def test_split_clusters_matches_a_line_by_line_reference():
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((40, 5)).astype(np.float32)
    hassign = rng.integers(0, 30, 40).astype(np.float32)
    hassign[[0, 3, 17, 39]] = 0
    centroids[hassign == 0] = 0
    n = int(hassign.sum())
    ref_c, ref_h = centroids.copy(), hassign.copy()
    _naive_split(ref_c, ref_h, n)
    assert faiss_compat.split_clusters(centroids, hassign, n) == 4
    np.testing.assert_array_equal(centroids, ref_c)
    np.testing.assert_array_equal(hassign, ref_h)
    assert (hassign > 0).all() and hassign.sum() == n


def test_split_clusters_without_a_splittable_cluster_raises():
    with pytest.raises(RuntimeError, match="no cluster has two points"):
        faiss_compat.split_clusters(np.ones((3, 2), np.float32), np.array([1, 0, 1], np.float32), n=3)
