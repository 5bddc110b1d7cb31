"""Hierarchical k-means into `Prototypes` (method.md §2.3-2.5; docs/architecture.md#decisions).

Level 1 clusters the image features sharded over ranks (`kmeans.kmeans`, one all-reduce per
iteration). Everything after it is small (thousands of rows): rank 0 clusters the L2-normalised
centroids of each level into the next, computes the concentrations and similarity matrices, and
broadcasts them, so the result is bit-identical on every rank (method.md §2.5: broadcast, not
recomputed). `im2cluster` is placed by dataset index after a check that every index is on exactly
one rank, so no duplicate is ever summed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cluster.concentration import cluster_sums, concentration
from cluster.features import agree_dim
from cluster.kmeans import KMeansResult, assign, choose_search, faiss_gpu_problem, kmeans
from cluster.prototypes import LevelStats, Prototypes
from core import dist
from core.config import ClusterConfig
from core.errors import StopCheck, first_line

log = logging.getLogger(__name__)

# Rows per chunk of the finiteness check: isfinite makes float temporaries of its input's size, so
# the chunk bounds the check's memory whatever the dataset size (BENCHMARKS.md, "Measurements
# behind code choices").
_CHECK_CHUNK = 4096


@dataclass
class _UpperLevels:
    """Rank 0's payload to every rank: the per-level results computed from level 1's centroids.

    ``logits`` travel by tensor broadcast (the largest part), the rest by one pickled object.
    """

    raw_centroids: list[torch.Tensor] = field(default_factory=list)
    centroids: list[torch.Tensor] = field(default_factory=list)
    density: list[torch.Tensor] = field(default_factory=list)
    cluster2cluster: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    stats: list[LevelStats] = field(default_factory=list)
    error: str = ""  # a ValueError's message on rank 0, raised on every rank
    fatal: bool = False  # `error` is another failure of rank 0's (the others raise RuntimeError)


def hierarchical_kmeans(idx: torch.Tensor, features: torch.Tensor, *, num_samples: int,
                        num_clusters: list[int], cfg: ClusterConfig, temperature: float,
                        previous: Prototypes | None = None,
                        should_stop: StopCheck | None = None) -> Prototypes:
    """Cluster the features of all ranks into `len(num_clusters)` levels; call on every rank.

    Args:
        idx: int64 (n_local,) dataset indices of this rank's rows; over all ranks exactly
            0..num_samples-1, each once (checked).
        features: float32 (n_local, d) L2-normalised embeddings (n_local may be 0).
        num_samples: N, the dataset size.
        num_clusters: M_1 > ... > M_L (method.md §2.3: 3000, 2000, 1000).
        cfg: k-means settings; `cfg.search` picks the nearest-centroid search (logged once here).
        temperature: T, the mean concentration at every level (method.md §2.4).
        previous: last epoch's result; used only when `cfg.warm_start`.
        should_stop: a collective stop check, asked after every level-1 iteration (the long,
            sharded part); `StopRequested` on every rank when it says stop.

    Returns:
        The prototypes, identical bit for bit on every rank, on `features.device`.

    Raises:
        ValueError: bad sizes, non-finite features, indices not covering 0..N-1 once;
            `ConfigError` (a ValueError) when `cfg.search` asks for faiss-gpu where it cannot run.
        RuntimeError: on ranks > 0 when rank 0 failed in the levels it computes alone (rank 0
            raises its own error): they learn it at once instead of waiting for the collective
            timeout.
    """
    device = features.device
    search = _agree_search(cfg.search, device)
    d = agree_dim(features)
    features = features.reshape(-1, d).float()
    _check_sizes(num_samples, num_clusters)
    _check_finite(features)
    _check_coverage(idx, num_samples)
    inits = _warm_inits(previous, num_clusters, d, cfg)
    level1, y1 = _cluster_images(idx, features, num_samples, num_clusters[0], cfg, inits[0], search,
                                 should_stop)
    upper = _from_rank0(level1, num_clusters, cfg, temperature, inits, device, search)
    im2cluster = [y1]
    for parent in upper.cluster2cluster:  # method.md §2.3: y^{l+1} = pi_l[y^l]
        im2cluster.append(parent[im2cluster[-1]])
    _log_stats(upper.stats)
    return Prototypes(im2cluster, upper.centroids, upper.density, upper.cluster2cluster, upper.logits,
                      upper.raw_centroids, upper.stats)


def _cluster_images(idx: torch.Tensor, features: torch.Tensor, num_samples: int, k: int,
                    cfg: ClusterConfig, init: np.ndarray | None, search: str,
                    should_stop: StopCheck | None) -> tuple[tuple, torch.Tensor]:
    """Level 1, sharded: k-means, final assignment, reduced concentration sums, gathered y^1."""
    start = time.perf_counter()
    km = kmeans(features, idx, num_samples=num_samples, k=k, seed=0, distributed=True,
                should_stop=should_stop, **_run_args(cfg, init, search))
    labels, sq_dist = assign(features, km.centroids, search)
    counts, sums = cluster_sums(labels, sq_dist, k)
    reduced = dist.all_reduce_sum(torch.cat([counts, sums, sq_dist.double().sum().view(1)]))
    # Placed by dataset index: each rank writes its own rows into zeros and one in-place all-reduce
    # merges them. `_check_coverage` proved every index is on exactly one rank, so each entry is one
    # rank's label plus zeros: exact, identical on every rank, no duplicate to repair (the official
    # code's norm > 1.5 hack). Unlike gathering (idx, label) pairs, no rank ever holds N-sized
    # transients beyond y1 itself: 8 bytes per dataset row instead of 24.
    y1 = torch.zeros(num_samples, dtype=torch.int64, device=features.device)
    y1[idx.to(device=y1.device, dtype=torch.int64)] = labels
    dist.all_reduce_sum(y1)
    return (km, reduced.cpu(), time.perf_counter() - start, init is not None), y1


def _from_rank0(level1: tuple, num_clusters: list[int], cfg: ClusterConfig, temperature: float,
                inits: list[np.ndarray | None], device: torch.device, search: str) -> _UpperLevels:
    """Rank 0 computes everything small and broadcasts it (method.md §2.5); errors reach every rank."""
    logits = None
    upper = None
    failure: BaseException | None = None
    if dist.is_main():
        try:
            upper = _run_upper(level1, num_clusters, cfg, temperature, inits, device, search)
        except Exception as err:  # noqa: BLE001 -- any failure (a CUDA error too) goes to every rank first
            failure = err
            upper = _UpperLevels(error=f"{type(err).__name__}: {first_line(err)}", fatal=True)
        logits, upper.logits = upper.logits, []
    upper = dist.broadcast_object(upper)
    if failure is not None:
        raise failure  # rank 0: its own error, with its traceback for the log
    if upper.fatal:  # the other ranks would otherwise wait in the next collective until its timeout
        raise RuntimeError(f"clustering failed on rank 0: {upper.error}")
    if upper.error:  # a ValueError on rank 0 (bad data or settings): the same error on every rank
        raise ValueError(upper.error)
    for key in ("centroids", "density", "cluster2cluster", "raw_centroids"):
        setattr(upper, key, [t.to(device) for t in getattr(upper, key)])
    upper.logits = _broadcast_logits(logits, num_clusters, device)
    return upper


def _log_stats(all_stats: list[LevelStats]) -> None:
    for stats in all_stats:
        log.info("clustering level %d: %d points -> %d clusters in %.2fs, objective %.6g (final %.6g), "
                 "%d empty, largest %d, smallest %d, %d splits, %d iterations (%.0f%% of row searches "
                 "needed)%s", stats.level, stats.points, stats.clusters, stats.seconds, stats.objective,
                 stats.final_objective, stats.empty, stats.largest, stats.smallest, stats.nsplit,
                 stats.iterations, 100 * stats.searched, ", warm start" if stats.warm else "")


def _broadcast_logits(logits: list[torch.Tensor] | None, num_clusters: list[int],
                      device: torch.device) -> list[torch.Tensor]:
    """A^l from rank 0 by tensor broadcast (the largest outputs: no pickling, no extra copies)."""
    out = []
    for level, (rows, cols) in enumerate(zip(num_clusters, num_clusters[1:], strict=False)):
        if logits is not None:
            out.append(dist.broadcast_(logits[level].to(device), src=0))
        else:
            out.append(dist.broadcast_(torch.empty(rows, cols, device=device), src=0))
    return out


def _run_upper(level1: tuple, num_clusters: list[int], cfg: ClusterConfig, temperature: float,
               inits: list[np.ndarray | None], device: torch.device, search: str) -> _UpperLevels:
    """Rank 0: level-1 concentration, then levels 2..L on the normalised centroids."""
    km, reduced, seconds, warm = level1
    k = num_clusters[0]
    counts, sums = reduced[:k], reduced[k: 2 * k]
    out = _UpperLevels()
    try:
        _add_level(out, 1, km, counts, sums, temperature, seconds, float(reduced[-1]), warm)
        for level, k_next in enumerate(num_clusters[1:], start=2):
            start = time.perf_counter()
            x = out.centroids[-1].to(device)
            ids = torch.arange(x.shape[0], device=device)
            # method.md §2.3: the child centroids are clustered unweighted, seed = 0-based level index
            km = kmeans(x, ids, num_samples=x.shape[0], k=k_next, seed=level - 1, distributed=False,
                        **_run_args(cfg, inits[level - 1], search))
            parent, sq_dist = assign(x, km.centroids, search)
            counts, sums = cluster_sums(parent, sq_dist, k_next)
            _add_level(out, level, km, counts.cpu(), sums.cpu(), temperature,
                       time.perf_counter() - start, float(sq_dist.double().sum()),
                       inits[level - 1] is not None)
            out.cluster2cluster.append(parent.cpu())
            logits = out.centroids[-2] @ out.centroids[-1].T
            # |cos| <= 1 (method.md §10.5); unit vectors can overshoot by an ulp in float32
            out.logits.append(logits.clamp_(-1.0, 1.0))
        return out
    except ValueError as err:
        return _UpperLevels(error=str(err))


def _add_level(out: _UpperLevels, level: int, km: KMeansResult, counts: torch.Tensor,
               sums: torch.Tensor, temperature: float, seconds: float, final_objective: float,
               warm: bool) -> None:
    raw = torch.from_numpy(km.centroids.copy())
    out.raw_centroids.append(raw)
    # method.md §2.3: centroids are L2-normalised after clustering; assignments used the raw ones
    out.centroids.append(F.normalize(raw, dim=1))
    out.density.append(concentration(counts, sums, temperature, level))
    out.stats.append(LevelStats(
        level=level, clusters=int(counts.numel()), points=int(counts.sum()), seconds=seconds,
        objective=km.objective, final_objective=final_objective, empty=int((counts == 0).sum()),
        largest=int(counts.max()), smallest=int(counts.min()), nsplit=km.nsplit,
        iterations=km.iterations, searched=km.searched, warm=warm))


def _agree_search(search: str, device: torch.device) -> str:
    """The search backend every rank uses, logged once (`kmeans.choose_search`); collective.

    Ranks check faiss-gpu on their own GPU and share what they found, so that auto picks one
    backend for all of them and an explicit faiss-gpu that fails on any rank stops every rank with
    the same error, instead of leaving the others waiting in a collective.
    """
    mine = faiss_gpu_problem(device) if search in ("auto", "faiss-gpu") else None
    problems = [f"rank {r}: {p}" if dist.world() > 1 else p
                for r, p in enumerate(dist.all_gather_object(mine)) if p is not None]
    backend, why = choose_search(search, device, problems[0] if problems else None)
    log.info("clustering: nearest-centroid search with %s (%s)", backend, why)
    return backend


def _run_args(cfg: ClusterConfig, init: np.ndarray | None, search: str) -> dict[str, Any]:
    """faiss settings for one level; a warm start runs one restart of `warm_start_niter`."""
    return {"niter": cfg.warm_start_niter if init is not None else cfg.niter,
            "nredo": 1 if init is not None else cfg.nredo, "init": init,
            "max_points_per_centroid": cfg.max_points_per_centroid,
            "min_points_per_centroid": cfg.min_points_per_centroid, "spherical": cfg.spherical,
            "prune": cfg.prune, "search": search}


def _warm_inits(previous: Prototypes | None, num_clusters: list[int], d: int,
                cfg: ClusterConfig) -> list[np.ndarray | None]:
    cold: list[np.ndarray | None] = [None] * len(num_clusters)
    if not cfg.warm_start:
        return cold
    if previous is None:
        log.info("clustering: cold start (cluster.warm_start is on, but there is no previous result)")
        return cold
    raw = previous.raw_centroids
    shapes = [tuple(t.shape) for t in raw]
    if shapes != [(k, d) for k in num_clusters]:
        log.warning("clustering: cold start: previous raw centroids have shapes %s, need %s",
                    shapes, [(k, d) for k in num_clusters])
        return cold
    return [t.detach().float().cpu().numpy() for t in raw]


def _check_sizes(num_samples: int, num_clusters: list[int]) -> None:
    points = num_samples
    for level, k in enumerate(num_clusters, start=1):
        if points < k:
            what = "samples" if level == 1 else f"level-{level - 1} clusters"
            raise ValueError(f"clustering level {level}: {points} {what} cannot make {k} clusters; "
                             "lower hcsc.num_clusters or use more data")
        points = k


def _check_finite(features: torch.Tensor) -> None:
    bad = torch.zeros(1, dtype=torch.int64, device=features.device)
    for start in range(0, features.shape[0], _CHECK_CHUNK):  # chunks: no full-size bool mask
        bad += (~torch.isfinite(features[start: start + _CHECK_CHUNK])).any(dim=1).sum()
    total = int(dist.all_reduce_sum(bad).item())  # every rank raises together
    if total:
        raise ValueError(f"clustering: {total} feature rows are NaN or infinite; check the checkpoint "
                         "and the learning rate")


def _check_coverage(idx: torch.Tensor, num_samples: int) -> None:
    """Every index 0..N-1 must appear exactly once over all ranks (checked on every rank).

    An int32 histogram of the N indices, all-reduced in place: 4 bytes per dataset row on each
    rank, where gathering every rank's int64 indices and bincounting them held about 25.
    """
    idx = idx.to(torch.int64)
    in_range = (idx >= 0) & (idx < num_samples)
    hist = torch.zeros(num_samples, dtype=torch.int32, device=idx.device)
    hist.index_put_((idx[in_range],), torch.ones((), dtype=torch.int32, device=idx.device), accumulate=True)
    dist.all_reduce_sum(hist)
    sizes = torch.tensor([idx.numel(), int((~in_range).sum())], dtype=torch.int64, device=idx.device)
    rows, out_of_range = (int(x) for x in dist.all_reduce_sum(sizes))
    chunks = hist.split(_CHECK_CHUNK * 64)  # chunks: no full-size bool mask; hist is the same everywhere
    missing = sum(int((chunk == 0).sum()) for chunk in chunks)
    dup = sum(int((chunk > 1).sum()) for chunk in chunks)
    if out_of_range or missing or dup:
        raise ValueError(f"clustering: the eval loader gave {rows} rows for {num_samples} "
                         f"samples ({missing} missing, {dup} duplicated, {out_of_range} out of range); "
                         "every dataset index must appear exactly once across ranks")
