"""The random choices of `faiss.Clustering` (faiss/Clustering.cpp, faiss/utils/random.cpp), reproduced
bit for bit so that sharded k-means makes the same choices as the single-process reference.

faiss draws from `std::mt19937` seeded with the (32-bit truncated) seed. numpy's legacy
`RandomState(seed)` uses the same MT19937 seeding (`init_genrand`), and `randint(0, 2**32,
dtype=uint64)` returns the raw 32-bit outputs, so the streams are identical (checked against
`faiss.rand_perm` and `faiss.RandomGenerator` in tests/cluster/test_faiss_compat.py).
"""

from __future__ import annotations

import numpy as np

# faiss Clustering.cpp: `rand_perm(perm, nx, seed + 1 + redo * 15486557L)` for each restart.
REDO_SEED_STRIDE = 15486557
# faiss split_clusters: a fresh `RandomGenerator rng(1234)` on every call.
SPLIT_SEED = 1234
# faiss split_clusters: "a bit above machine epsilon for float16".
SPLIT_EPS = 1.0 / 1024.0

_U32 = 2**32


def _mt19937(seed: int) -> np.random.RandomState:
    return np.random.RandomState(int(seed) & 0xFFFFFFFF)


def rand_perm_prefix(n: int, m: int, seed: int) -> np.ndarray:
    """The first `m` entries of faiss `rand_perm(perm, n, seed)`, without building all `n`.

    faiss runs a forward Fisher-Yates shuffle: step i swaps perm[i] with perm[i + mt() % (n - i)];
    position i is final after step i, so the first m steps give the first m entries. Swapped
    positions are tracked in a dict (m steps of Python; m is k at initialisation, or
    k * max_points_per_centroid when subsampling).

    Returns:
        int64 (m,): positions in [0, n).
    """
    if not 0 <= m <= n:
        raise ValueError(f"rand_perm_prefix: need 0 <= m <= n, got m={m}, n={n}")
    steps = min(m, n - 1)
    draws = _mt19937(seed).randint(0, _U32, size=steps, dtype=np.uint64)
    i = np.arange(steps, dtype=np.uint64)
    partner = (i + draws % (np.uint64(n) - i)).astype(np.int64)
    moved: dict[int, int] = {}
    out = np.empty(m, dtype=np.int64)
    for a in range(m):
        b = int(partner[a]) if a < steps else a
        value_a, value_b = moved.get(a, a), moved.get(b, b)
        moved[b] = value_a
        out[a] = value_b
    return out


class _UniformStream:
    """faiss `RandomGenerator::rand_float()`: float(mt()) / float(mt.max()), in float32."""

    def __init__(self, seed: int, block: int = 65536) -> None:
        self._rs = _mt19937(seed)
        self._block = block
        self._buf = np.empty(0, dtype=np.float32)

    def take(self, count: int) -> np.ndarray:
        while self._buf.size < count:
            raw = self._rs.randint(0, _U32, size=self._block, dtype=np.uint64).astype(np.float32)
            # float(mt.max()) rounds 2**32 - 1 up to 2**32 in float32: an exact power of two.
            self._buf = np.concatenate([self._buf, raw / np.float32(_U32)])
        return self._buf[:count]

    def consume(self, count: int) -> None:
        self._buf = self._buf[count:]


def split_clusters(centroids: np.ndarray, hassign: np.ndarray, n: int) -> int:
    """faiss `split_clusters`: give every empty cluster half of a randomly chosen large one.

    For each empty cluster ci in order, walk cj = 0, 1, ... (mod k) drawing r ~ U[0,1) until
    r < (hassign[cj] - 1) / (n - k); copy centroid cj into ci with a +-1/1024 symmetric
    perturbation and split the count evenly. Float32 arithmetic as in faiss.

    Args:
        centroids: float32 (k, d), modified in place.
        hassign: float32 (k,) points per centroid, modified in place.
        n: number of training points (after subsampling).

    Returns:
        the number of splits.
    """
    k = centroids.shape[0]
    empty = np.flatnonzero(hassign == 0)
    if empty.size == 0:
        return 0
    stream = _UniformStream(SPLIT_SEED)
    denom = np.float64(np.float32(n - k))
    up, down = np.float32(1 + SPLIT_EPS), np.float32(1 - SPLIT_EPS)
    even = (np.arange(centroids.shape[1]) % 2) == 0
    for ci in empty:
        # float p = (hassign[cj] - 1.0) / (float)(n - k): double arithmetic, rounded to float.
        with np.errstate(divide="ignore", invalid="ignore"):  # n == k: no p > 0, raised below
            p = ((hassign.astype(np.float64) - 1.0) / denom).astype(np.float32)
        cj = _first_accepted(stream, p)
        centroids[ci] = centroids[cj]
        centroids[ci] *= np.where(even, up, down)
        centroids[cj] *= np.where(even, down, up)
        hassign[ci] = hassign[cj] / np.float32(2)
        hassign[cj] -= hassign[ci]
    return int(empty.size)


def _first_accepted(stream: _UniformStream, p: np.ndarray) -> int:
    """Index cj of the first draw r_t < p[t mod k], consuming exactly t + 1 draws."""
    if not (p > 0).any():
        raise RuntimeError("split_clusters: no cluster has two points to split (n == k?)")
    k, start = p.shape[0], 0
    while True:
        count = start + 4 * k
        r = stream.take(count)[start:]
        hits = np.flatnonzero(r < p[(start + np.arange(r.size)) % k])
        if hits.size:
            t = start + int(hits[0])
            stream.consume(t + 1)
            return t % k
        start = count
