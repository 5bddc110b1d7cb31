"""Sharded Lloyd k-means with the semantics of `faiss.Clustering` (design.md "Clustering", spec 2.3).

Every rank holds only its own rows, each identified by a global id in [0, n) (the dataset index
at level 1). An iteration assigns the local rows with a faiss flat L2 index over the current
centroids (GPU index when the rows live on a GPU and faiss-gpu is installed), then one all-reduce
sums per-centroid sums, counts and the objective; every rank then updates the centroids
identically on the host. What is reproduced from faiss/Clustering.cpp `train_encoded`:

- initial centroids: rows at positions `rand_perm(n, seed + 1 + redo * 15486557)[:k]` of the
  global row order (rows sorted by id; with ids 0..n-1 this is faiss's row order), fetched from
  the rank that owns each row with one all-reduce;
- provided initial centroids (faiss: `clus.centroids` set before `train`): no random init, and,
  as in faiss, every restart continues from the previous restart's final centroids;
- subsampling when n > k * max_points_per_centroid: the first k * max_points_per_centroid entries
  of `rand_perm(n, seed)`, restarts then initialise from positions within that subsample; a
  warning (not an error) when n < k * min_points_per_centroid; n == k copies the rows;
- update: centroid = mean of its points, empty clusters keep 0 and are then split by
  `faiss_compat.split_clusters` (same RNG and perturbation as faiss); spherical renormalises;
- restarts: the objective of a restart is the sum of squared distances of its last assignment
  (faiss `iteration_stats[-1].obj`); the lowest wins;
- convergence: a restart stops once no row changes cluster (all-reduced count). From then on
  every iteration reproduces the same centroids exactly, so the result equals running all
  `niter` iterations (the official faiss 1.7 did; faiss >= 1.8 stops on an unchanged objective).

Deliberate differences, all within float tolerance: sums are accumulated in float64 (faiss: float32
in row order), so centroids may differ from faiss in the last bits and the objective is a float64
sum; the assignment search itself is the same faiss index type.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from cluster import faiss_compat
from train import dist

log = logging.getLogger(__name__)

_SUM_CHUNK = 65536  # rows per float64 chunk when summing (bounds the temporary copy)


@dataclass
class KMeansResult:
    """Centroids (un-normalised, float32 (k, d), identical on every rank) and run statistics."""

    centroids: np.ndarray
    objective: float  # kept restart's last-iteration objective (sum of squared L2 distances)
    restart: int  # index of the kept restart
    nsplit: int  # empty-cluster splits over the kept restart
    num_train: int  # rows used for training (after subsampling)
    iterations: int = 0  # Lloyd iterations run by the kept restart (fewer than niter once converged)


class Searcher:
    """Nearest-centroid search with a faiss flat L2 index on the rows' device."""

    def __init__(self, d: int, device: torch.device) -> None:
        self.device = device
        self._gpu = device.type == "cuda" and hasattr(faiss, "GpuIndexFlatL2")
        if self._gpu:
            importlib.import_module("faiss.contrib.torch_utils")  # faiss-gpu searches torch tensors

            self._res = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.device = device.index or 0
            config.useFloat16 = False  # spec 2.3: fp32 index, as the official code
            self.index = faiss.GpuIndexFlatL2(self._res, d, config)
        else:
            if device.type == "cuda":
                log.warning("faiss-gpu is not installed: k-means searches on the CPU (host copies)")
            self.index = faiss.IndexFlatL2(d)

    def set_centroids(self, centroids: np.ndarray) -> None:
        self.index.reset()
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (squared distance float32 (n,), label int64 (n,)) on `x`'s device."""
        if x.shape[0] == 0:
            return x.new_zeros(0), torch.zeros(0, dtype=torch.int64, device=x.device)
        if self._gpu:
            dis, lab = self.index.search(x.contiguous(), 1)
            return dis[:, 0], lab[:, 0]
        dis, lab = self.index.search(np.ascontiguousarray(x.detach().cpu().numpy()), 1)
        return (torch.from_numpy(dis[:, 0]).to(x.device), torch.from_numpy(lab[:, 0]).to(x.device))


def assign(x: torch.Tensor, centroids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each local row: (label int64 (n,), squared L2 distance float32 (n,))."""
    searcher = Searcher(centroids.shape[1], x.device)
    searcher.set_centroids(centroids)
    dis, lab = searcher.search(x)
    return lab, dis


def kmeans(x: torch.Tensor, ids: torch.Tensor, *, num_samples: int, k: int, niter: int, nredo: int,
           seed: int, max_points_per_centroid: int, min_points_per_centroid: int,
           spherical: bool = False, init: np.ndarray | None = None,
           distributed: bool = True) -> KMeansResult:
    """k-means of the rows of all ranks; call on every rank (collectives inside when distributed).

    Args:
        x: float32 (n_local, d) this rank's rows (may be empty).
        ids: int64 (n_local,) global row ids; over all ranks exactly 0..num_samples-1 (checked
            by the caller, `hierarchy.hierarchical_kmeans`).
        num_samples: global number of rows n.
        k: number of clusters (k <= n).
        niter, nredo, seed, max_points_per_centroid, min_points_per_centroid, spherical: as the
            `faiss.Clustering` fields of the same names.
        init: optional float32 (k, d) initial centroids (identical on every rank).
        distributed: False runs on this rank's rows only, with no collective.
    """
    if num_samples < k:
        raise ValueError(f"k-means: {num_samples} rows cannot make {k} clusters; use fewer clusters")
    reduce: Callable[[torch.Tensor], torch.Tensor] = dist.all_reduce_sum if distributed else _identity
    d = x.shape[1]
    if num_samples == k or (num_samples > k and max_points_per_centroid == 1):
        # faiss corner case nx == k (after any subsampling): the centroids are the first k input
        # rows, no iteration
        return KMeansResult(_fetch_rows(x, ids, np.arange(k), d, reduce), 0.0, 0, 0, k)
    x, ids, n = _training_rows(x, ids, num_samples, k, max_points_per_centroid,
                               min_points_per_centroid, seed)
    searcher = Searcher(d, x.device)
    best: KMeansResult | None = None
    centroids = None if init is None else np.array(init, dtype=np.float32, copy=True)
    for redo in range(nredo):
        if init is None:
            order = faiss_compat.rand_perm_prefix(n, k, seed + 1 + redo * faiss_compat.REDO_SEED_STRIDE)
            centroids = _fetch_rows(x, ids, order, d, reduce)
        _post_process(centroids, spherical)
        objective, nsplit, labels, done = 0.0, 0, None, 0
        for _ in range(niter):
            searcher.set_centroids(centroids)
            centroids, objective, splits, labels, changed = _lloyd_step(searcher, x, k, n, reduce,
                                                                        spherical, labels)
            nsplit, done = nsplit + splits, done + 1
            if changed == 0:
                # No row changed cluster: the update is a deterministic function of the assignment,
                # so every remaining iteration would reproduce these centroids bit for bit (faiss
                # >= 1.8 stops here too, on an unchanged objective). Stopping changes no result.
                break
        if best is None or objective < best.objective:
            best = KMeansResult(centroids.copy(), objective, redo, nsplit, n, done)
    assert best is not None
    return best


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _training_rows(x: torch.Tensor, ids: torch.Tensor, n: int, k: int, max_ppc: int, min_ppc: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """faiss subsampling: keep the rows at the first k * max_ppc positions of rand_perm(n, seed).

    Returned ids are positions within the training set (faiss's row order after subsampling).
    """
    if n > k * max_ppc:
        keep = k * max_ppc
        chosen = torch.from_numpy(faiss_compat.rand_perm_prefix(n, keep, seed)).to(ids.device)
        position = torch.full((n,), -1, dtype=torch.int64, device=ids.device)
        position[chosen] = torch.arange(keep, device=ids.device)
        new_ids = position[ids]
        mask = new_ids >= 0
        log.info("k-means: subsampling %d of %d rows (max_points_per_centroid=%d)", keep, n, max_ppc)
        return x[mask], new_ids[mask], keep
    if n < k * min_ppc:
        # faiss prints this warning and carries on (the official levels 2-3 always hit it)
        log.warning("k-means: clustering %d points to %d centroids: faiss asks for at least %d", n, k,
                    k * min_ppc)
    return x, ids, n


def _fetch_rows(x: torch.Tensor, ids: torch.Tensor, want: np.ndarray, d: int,
                reduce: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Rows with global ids `want` (identical on every rank): the owner fills, others add zeros."""
    out = torch.zeros(len(want), d, dtype=torch.float32, device=x.device)
    if ids.numel():
        sorted_ids, order = torch.sort(ids)
        want_t = torch.from_numpy(np.asarray(want, dtype=np.int64)).to(ids.device)
        pos = torch.searchsorted(sorted_ids, want_t).clamp_max(sorted_ids.numel() - 1)
        hit = sorted_ids[pos] == want_t
        out[hit] = x[order[pos[hit]]].float()
    return reduce(out).cpu().numpy()


def _lloyd_step(searcher: Searcher, x: torch.Tensor, k: int, n: int,
                reduce: Callable[[torch.Tensor], torch.Tensor], spherical: bool,
                previous: torch.Tensor | None) -> tuple[np.ndarray, float, int, torch.Tensor, int]:
    """One faiss iteration: assign, reduce, update, split empties.

    Returns the new centroids, the objective of this assignment, the number of splits, the local
    labels and the global number of rows whose label changed (> 0 on the first iteration).
    """
    d = x.shape[1]
    dis, lab = searcher.search(x)
    if previous is None:
        changed = 1
    elif lab.device.type == "cpu":  # numpy: see _partial_sums on torch CPU ops in this loop
        changed = int(np.count_nonzero(lab.numpy() != previous.numpy()))
    else:
        changed = int((lab != previous).sum())
    # One buffer, one all-reduce: [sums (k*d) | counts (k) | objective | changed rows], float64.
    host = reduce(_partial_sums(x, lab, dis, k, changed)).cpu().numpy()
    counts = host[k * d: k * d + k]
    centroids = np.zeros((k, d), dtype=np.float32)
    nonempty = counts > 0
    centroids[nonempty] = (host[: k * d].reshape(k, d)[nonempty] / counts[nonempty, None]).astype(np.float32)
    nsplit = faiss_compat.split_clusters(centroids, counts.astype(np.float32), n)
    _post_process(centroids, spherical)
    return centroids, float(host[-2]), nsplit, lab, int(host[-1])


def _partial_sums(x: torch.Tensor, lab: torch.Tensor, dis: torch.Tensor, k: int,
                  changed: int) -> torch.Tensor:
    """This rank's [sums (k*d) | counts (k) | objective | changed], float64, on x's device.

    On the CPU this is numpy only: one weighted `np.bincount` per dimension (single-threaded,
    sequential in row order, no float64 copy of the rows). torch CPU ops between faiss searches
    wake torch's OpenMP pool, which then fights faiss's own pool: measured on 2 cores, every
    faiss search ran 2-3x slower.
    """
    d = x.shape[1]
    if x.device.type == "cpu":
        buf = np.zeros(k * d + k + 2)
        lab_np, x_np = lab.numpy(), x.numpy()
        sums = buf[: k * d].reshape(k, d)
        for j in range(d):
            sums[:, j] = np.bincount(lab_np, weights=x_np[:, j], minlength=k)
        buf[k * d: k * d + k] = np.bincount(lab_np, minlength=k)
        buf[-2], buf[-1] = dis.numpy().sum(dtype=np.float64), changed
        return torch.from_numpy(buf)
    buf = torch.zeros(k * d + k + 2, dtype=torch.float64, device=x.device)
    sums = buf[: k * d].view(k, d)
    for start in range(0, x.shape[0], _SUM_CHUNK):
        sums.index_add_(0, lab[start: start + _SUM_CHUNK], x[start: start + _SUM_CHUNK].double())
    buf[k * d: k * d + k] = torch.bincount(lab, minlength=k).double()
    buf[-2], buf[-1] = dis.double().sum(), changed
    return buf


def _post_process(centroids: np.ndarray, spherical: bool) -> None:
    """faiss `post_process_centroids`: L2-renormalise when spherical (zero rows stay zero)."""
    if spherical:
        norms = np.linalg.norm(centroids, axis=1, keepdims=True)
        np.divide(centroids, norms, out=centroids, where=norms > 0)
