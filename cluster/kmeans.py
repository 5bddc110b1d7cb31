"""Sharded Lloyd k-means with the semantics of `faiss.Clustering` (method.md §2.3; see also
docs/architecture.md#decisions).

Every rank holds only its own rows, each identified by a global id in [0, n) (the dataset index
at level 1). An iteration assigns the local rows to the nearest of the current centroids (the
`cluster.search` backend, `choose_search`: a faiss flat L2 index on the host or on the rows' GPU, or
an exact fp32 torch search on the rows' device), then one all-reduce sums per-centroid sums, counts
and the objective; every rank then updates the centroids identically on the host. What is
reproduced from faiss/Clustering.cpp `train_encoded`:

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

Beyond faiss, on the CPU with faiss-cpu (`prune`, on by default): `BoundedAssignment` searches only
the rows whose nearest centroid may have changed (distance bounds; the others provably keep their
label), and `LocalSums` updates the sums by the rows that moved. At 200k rows into 3000 clusters
this halves the searches of a restart. On a GPU without a working faiss-gpu, the torch search
(`torch_nearest`) keeps the rows on their device instead of copying them to faiss-cpu every
iteration.

Deliberate differences, all within float tolerance: sums are accumulated in float64 (faiss: float32
in row order), so centroids may differ from faiss in the last bits and the objective is a float64
sum; the assignment search itself is the same faiss index type, or (`search=torch`) the same fp32
formula |x|^2 + |c|^2 - 2 x.c computed by torch with TF32 off. A row whose two nearest centroids
are within float rounding of each other may get the other one of the two: faiss's own choice there
depends on the row's position in its search block (see `BoundedAssignment`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from cluster import faiss_compat
from core import dist
from core.config import SEARCHES, ConfigError
from core.errors import StopCheck, first_line, stop_if_requested

log = logging.getLogger(__name__)

_WARNED_FEW_POINTS: set[tuple[int, int]] = set()
_SUM_CHUNK = 65536  # rows per float64 chunk when summing (bounds the temporary copy)
# Rows per CPU faiss search call. faiss's flat search multiplies blocks of up to 4096 queries by
# 1024 centroids (a 16 MB float block per call, whatever the dataset size); 1024-row calls bound it
# at 4 MB. The distances are faiss's own either way, up to float rounding that depends on a row's
# position in the block (faiss itself is not position-independent: see `BoundedAssignment`).
_SEARCH_CHUNK = 1024
# Distances per torch search block (rows x centroids): 2^24 floats are 64 MiB, and the block and the
# product it is made from exist at once, so the torch search holds at most 128 MiB of temporaries
# whatever the number of rows (about 5600 rows per block at 3000 centroids: large enough for a GPU).
_TORCH_BLOCK = 1 << 24
# One faiss StandardGpuResources per CUDA device for the whole process. Each one reserves about
# 1.5 GiB of scratch memory on its GPU when first used; one per Searcher (every level, every epoch)
# would allocate and free that again and again.
_GPU_RESOURCES: dict[int, Any] = {}
_FAISS_GPU_PROBLEM: dict[int, str | None] = {}  # device index -> why faiss-gpu cannot be used there


@dataclass
class KMeansResult:
    """Centroids (un-normalised, float32 (k, d), identical on every rank) and run statistics."""

    centroids: np.ndarray
    objective: float  # kept restart's last-iteration objective (sum of squared L2 distances)
    restart: int  # index of the kept restart
    nsplit: int  # empty-cluster splits over the kept restart
    num_train: int  # rows used for training (after subsampling)
    iterations: int = 0  # Lloyd iterations run by the kept restart (fewer than niter once converged)
    searched: float = 1.0  # fraction of this rank's row assignments that needed a search (pruning)


def gpu_resources(index: int) -> Any:
    """The process's one faiss `StandardGpuResources` for CUDA device `index` (created once)."""
    res = _GPU_RESOURCES.get(index)
    if res is None:
        res = faiss.StandardGpuResources()
        _GPU_RESOURCES[index] = res
    return res


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def faiss_gpu_problem(device: torch.device) -> str | None:
    """Why a faiss GPU index cannot search rows on `device`, or None when it can.

    "Can" means: the rows are on a CUDA device, faiss was built with GPU support, it sees that
    device, and a tiny index there returns the right neighbour (a faiss-gpu build without kernels
    for this GPU's architecture fails only when it searches). Checked once per device and process.
    """
    if device.type != "cuda":
        return "the features are on the CPU"
    if not hasattr(faiss, "GpuIndexFlatL2"):
        return "this faiss has no GPU support (faiss-cpu is installed)"
    index = _cuda_index(device)
    if index not in _FAISS_GPU_PROBLEM:
        _FAISS_GPU_PROBLEM[index] = _probe_faiss_gpu(index)
    return _FAISS_GPU_PROBLEM[index]


def _probe_faiss_gpu(index: int) -> str | None:
    try:
        count = faiss.get_num_gpus()
        if index >= count:
            return f"faiss sees {count} GPU(s), not cuda:{index}"
        probe = _faiss_gpu_index(2, index)
        probe.add(np.array([[0.0, 0.0], [1.0, 1.0]], dtype=np.float32))
        _, lab = probe.search(np.array([[0.9, 1.0]], dtype=np.float32), 1)
        if int(lab[0, 0]) != 1:
            return f"faiss-gpu returned a wrong neighbour in a test search on cuda:{index}"
    except Exception as err:  # any failure of the library means "unusable", with its reason
        return f"faiss-gpu failed a test search on cuda:{index} ({first_line(err)})"
    return None


def _faiss_gpu_index(d: int, index: int) -> Any:
    config = faiss.GpuIndexFlatConfig()
    config.device = index
    config.useFloat16 = False  # method.md §2.3: fp32 index, as the official code
    return faiss.GpuIndexFlatL2(gpu_resources(index), d, config)


def choose_search(search: str, device: torch.device, gpu_problem: str | None) -> tuple[str, str]:
    """The backend for `cluster.search` = `search` on rows on `device`, and why (one phrase).

    `gpu_problem` is `faiss_gpu_problem(device)` (or the first one any rank found). auto takes
    faiss-gpu for CUDA rows where it works, else torch on the rows' GPU (no host copies), and
    faiss-cpu for CPU rows. An explicit faiss-gpu that cannot run is an error, never a silent
    fallback.

    Raises:
        ConfigError: unknown `search`, or faiss-gpu asked for where it cannot run.
    """
    if search not in SEARCHES:
        raise ConfigError(f"cluster.search: must be one of {SEARCHES}, got {search!r}")
    if search == "faiss-gpu":
        if gpu_problem is not None:
            raise ConfigError(f"cluster.search: faiss-gpu cannot run here: {gpu_problem}; set "
                              "cluster.search=auto or torch")
        return "faiss-gpu", f"cluster.search=faiss-gpu, on {device}"
    if search == "torch":
        return "torch", f"cluster.search=torch, exact fp32 on {device}"
    if search == "faiss-cpu":
        why = "cluster.search=faiss-cpu"
        if device.type != "cpu":
            why += f", rows copied from {device} to the host every iteration"
        return "faiss-cpu", why
    if device.type == "cpu":
        return "faiss-cpu", "cluster.search=auto, the features are on the CPU"
    if gpu_problem is None:
        return "faiss-gpu", f"cluster.search=auto, faiss-gpu works on {device}"
    return "torch", f"cluster.search=auto, faiss-gpu unusable ({gpu_problem}): exact fp32 on {device}"


def resolve_search(search: str, device: torch.device) -> tuple[str, str]:
    """`choose_search` for this process alone (`hierarchy.hierarchical_kmeans` agrees across ranks)."""
    problem = faiss_gpu_problem(device) if search in ("auto", "faiss-gpu") else None
    return choose_search(search, device, problem)


@contextlib.contextmanager
def _exact_fp32_matmul() -> Iterator[None]:
    """fp32 products in full fp32 (no TF32, no bf16 passes) inside; the caller's settings after.

    Uses torch's per-backend `fp32_precision` where it exists (torch >= 2.9): its getter works
    whichever API the process used, while the legacy `allow_tf32` getter raises once anything set
    the new one. Older torch: the legacy flags.
    """
    flags = [m for m in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
             if m is not None and _has_fp32_precision(m)]
    if flags:
        saved = [m.fp32_precision for m in flags]
        try:
            for m in flags:
                m.fp32_precision = "ieee"
            yield
        finally:
            for m, value in zip(flags, saved, strict=True):
                m.fp32_precision = value
        return
    precision, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _has_fp32_precision(module: Any) -> bool:
    try:
        return isinstance(module.fp32_precision, str)
    except (AttributeError, RuntimeError):
        return False


def torch_nearest(x: torch.Tensor, centroids: torch.Tensor,
                  c_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 nearest centroid of each row, on `x`'s device: (squared L2 float32, label int64).

    faiss's flat L2 formula, |x|^2 + |c|^2 - 2 x.c clamped at 0, with the product in full fp32
    (TF32 and autocast off: a 10-bit mantissa would move distances by about 1e-3 and flip many
    labels). Rows go in blocks of `_TORCH_BLOCK // k`, so memory is bounded whatever n is. An exact
    tie goes to the lower centroid id (torch.min returns the first minimum), as in faiss.
    """
    n, k = x.shape[0], centroids.shape[0]
    dis = torch.empty(n, dtype=torch.float32, device=x.device)
    lab = torch.empty(n, dtype=torch.int64, device=x.device)
    if c_sq is None:
        c_sq = (centroids * centroids).sum(dim=1)
    rows = max(1, _TORCH_BLOCK // max(k, 1))
    with _exact_fp32_matmul(), torch.autocast(device_type=x.device.type, enabled=False):
        for start in range(0, n, rows):
            block = x[start: start + rows].float()
            x_sq = (block * block).sum(dim=1)
            # (|x|^2 + |c|^2) - 2 x.c in faiss's order; the factor 2 is exact, so one rounding
            dist_block = x_sq[:, None] + c_sq[None, :]
            dist_block.sub_(block @ centroids.T, alpha=2.0).clamp_min_(0.0)
            torch.min(dist_block, dim=1, out=(dis[start: start + rows], lab[start: start + rows]))
    return dis, lab


class Searcher:
    """Nearest-centroid search of rows on `device` with one backend (`choose_search`).

    faiss-cpu: a faiss flat L2 index on the host (CUDA rows are copied to it every search);
    faiss-gpu: a faiss GPU flat index on the rows' device, with the process's cached resources;
    torch: `torch_nearest` on the rows' device.
    """

    def __init__(self, d: int, device: torch.device, search: str = "auto") -> None:
        self.device = device
        self.backend, _ = resolve_search(search, device)
        self._centroids: torch.Tensor | None = None  # torch backend: (k, d) on `device`
        self._c_sq: torch.Tensor | None = None
        self.index: Any = None
        if self.backend == "faiss-gpu":
            importlib.import_module("faiss.contrib.torch_utils")  # faiss-gpu searches torch tensors
            self.index = _faiss_gpu_index(d, _cuda_index(device))
        elif self.backend == "faiss-cpu":
            self.index = faiss.IndexFlatL2(d)

    def set_centroids(self, centroids: np.ndarray) -> None:
        c = np.ascontiguousarray(centroids, dtype=np.float32)
        if self.backend == "torch":
            self._centroids = torch.from_numpy(c).to(self.device)
            self._c_sq = (self._centroids * self._centroids).sum(dim=1)
            return
        self.index.reset()
        self.index.add(c)

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (squared distance float32 (n,), label int64 (n,)) on `x`'s device."""
        if x.shape[0] == 0:
            return x.new_zeros(0), torch.zeros(0, dtype=torch.int64, device=x.device)
        if self.backend == "torch":
            assert self._centroids is not None, "set_centroids first"
            return torch_nearest(x, self._centroids, self._c_sq)
        if self.backend == "faiss-gpu":
            dis, lab = self.index.search(x.contiguous(), 1)
            return dis[:, 0], lab[:, 0]
        dis_np, lab_np = self.search_numpy(np.ascontiguousarray(x.detach().cpu().numpy()), 1)
        return torch.from_numpy(dis_np[:, 0]).to(x.device), torch.from_numpy(lab_np[:, 0]).to(x.device)

    def search_numpy(self, x: np.ndarray, k: int,
                     rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """faiss-cpu: the k nearest centroids of `x` (or of `x[rows]`), (m, k) float32 and int64.

        Searched `_SEARCH_CHUNK` rows per call (a subset is gathered chunk by chunk, never whole).
        """
        assert self.backend == "faiss-cpu", "host searches need the faiss-cpu backend"
        m = len(x) if rows is None else len(rows)
        dis = np.empty((m, k), dtype=np.float32)
        lab = np.empty((m, k), dtype=np.int64)
        for start in range(0, m, _SEARCH_CHUNK):
            stop = min(start + _SEARCH_CHUNK, m)
            block = x[start:stop] if rows is None else x[rows[start:stop]]
            dis[start:stop], lab[start:stop] = self.index.search(np.ascontiguousarray(block), k)
        return dis, lab


class BoundedAssignment:
    """Nearest-centroid assignment across Lloyd iterations that skips provably settled rows.

    Distance bounds in the manner of Hamerly's k-means, which no library provides for a faiss
    index. Per row: its label, the ids of the `TRACKED` next-nearest centroids with a lower bound
    on each one's distance, and one lower bound for every other centroid. When the centroids move,
    each tracked bound drops by its own centroid's move and the shared one by the largest move
    (triangle inequality); the distance to the row's own, moved centroid is recomputed exactly
    (O(d) per row, float64). A row keeps its label without a search when the smallest bound,
    squared, exceeds its own squared distance by twice `margin`, a bound on the rounding of faiss's
    float32 distances (|x|^2 + |c|^2 - 2 x.c, or the direct sum): then no faiss search could pick
    another centroid for it. Every other row is searched again with k = TRACKED + 2, which renews
    its bounds. The largest move among thousands of centroids stays large long after most rows have
    settled, so at 200k rows into 3000 clusters (one restart, 16 iterations) a single shared bound
    (plain Hamerly) still searched 81% of the rows; tracking 3 neighbours, 47%; also measuring the
    distance to the `MOVERS` centroids that moved most (`_update_rest_lower`), 33-35%.

    What "the same labels as searching every row" means: identical, except for a row whose two
    nearest centroids are within float rounding of each other. There even faiss is not consistent:
    its float32 distances depend on the row's position in its search block (the same rows searched
    in reverse order come back with other labels for such near-ties), so no reordering or subset
    search can reproduce its choice. Skipped rows get their exact distance, so objectives agree with
    faiss's to float rounding.

    CPU only (numpy between faiss calls: see `LocalSums`). About 70 bytes per local row.
    """

    TRACKED = 3  # next-nearest centroids with their own bound
    # Below this many clusters a full search is cheap and the bounds' own work (the movers, the k = 5
    # searches, per-call overhead) costs more than it saves (BENCHMARKS.md, "Measurements behind
    # code choices").
    MIN_CLUSTERS = 256
    MOVERS = 64  # centroids with the largest move, measured directly rather than bounded
    _DIST_CHUNK = 4096  # rows per float64 own-distance chunk (4 MB of temporaries)

    def __init__(self, x: np.ndarray, searcher: Searcher) -> None:
        self.x = x
        self.searcher = searcher
        n = len(x)
        self.norms = np.sqrt(self._row_sq_norms(lambda start, stop: x[start:stop].astype(np.float64)))
        self.labels: np.ndarray | None = None
        self.near_ids = np.zeros((n, self.TRACKED), dtype=np.int32)
        self.near_lower = np.zeros((n, self.TRACKED))
        self.rest_lower = np.zeros(n)
        self.previous: np.ndarray | None = None
        self.searched = 0  # rows searched over all calls (for the logs and the benchmark)
        self.rows = 0  # rows assigned over all calls

    def assign(self, centroids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance float32 (n,), label int64 (n,)) as `Searcher.search` would give."""
        c64 = centroids.astype(np.float64)
        norm_c = np.sqrt(np.einsum("ij,ij->i", c64, c64))
        d = self.x.shape[1]
        # |fl(x.c) - x.c| <= d u |x||c| for any summation order; with the norms' rounding this
        # bounds faiss's error by (d + 8) u (|x| + |c|)^2; doubled for safety (u = 2^-24).
        margin = 2.0 * (d + 8) * 2.0**-24 * (self.norms + norm_c.max(initial=0.0)) ** 2
        n = len(self.x)
        dis = np.empty(n, dtype=np.float32)
        if self.labels is None:
            rows = np.arange(n)
            self.labels = np.empty(n, dtype=np.int64)
        else:
            assert self.previous is not None
            move = c64 - self.previous
            shift = np.sqrt(np.einsum("ij,ij->i", move, move))
            self.near_lower -= shift[self.near_ids]
            self._update_rest_lower(c64, shift, margin)
            lower = np.minimum(self.near_lower.min(axis=1), self.rest_lower)
            own = self._own_sq_distance(c64)
            settled = (lower > 0) & (lower**2 - own > 2.0 * margin)
            dis[settled] = own[settled]
            rows = np.flatnonzero(~settled)
        self._search(rows, dis, margin)
        self.previous = c64
        self.searched += len(rows)
        self.rows += n
        return torch.from_numpy(dis), torch.from_numpy(self.labels.copy())

    def _search(self, rows: np.ndarray, dis: np.ndarray, margin: np.ndarray) -> None:
        if len(rows) == 0:
            return
        subset = None if len(rows) == len(self.x) else rows  # every row: no per-chunk gather
        dist, ids = self.searcher.search_numpy(self.x, self.TRACKED + 2, subset)
        # an exact tie goes to the lower id, as faiss's single-neighbour scan (strict <) does
        swap = (dist[:, 0] == dist[:, 1]) & (ids[:, 1] >= 0) & (ids[:, 1] < ids[:, 0])
        ids[swap, :2] = ids[swap, 1::-1]
        # fewer centroids than TRACKED + 2: faiss pads with id -1; no centroid, no constraint
        lower = np.sqrt(np.maximum(dist[:, 1:].astype(np.float64) - margin[rows, None], 0.0))
        lower[ids[:, 1:] < 0] = np.inf
        assert self.labels is not None  # set by `assign` before any search
        self.labels[rows] = ids[:, 0]
        self.near_ids[rows] = np.maximum(ids[:, 1:-1], 0)
        self.near_lower[rows] = lower[:, :-1]
        self.rest_lower[rows] = lower[:, -1]
        dis[rows] = dist[:, 0]

    def _update_rest_lower(self, c64: np.ndarray, shift: np.ndarray, margin: np.ndarray) -> None:
        """Lower the shared bound by the largest move, except for the `MOVERS` largest movers.

        A few centroids (split ones, sparse clusters) move far more than the rest, and the shared
        bound would drop by their move. Instead, each row's distance to those few is computed
        directly (faiss's float32 L2 to `MOVERS` centroids, about 2% of a search at 3000 clusters)
        and bounds them; the shared bound then drops only by the largest move among the others.
        """
        k = len(shift)
        if k <= self.MOVERS + 1:
            self.rest_lower -= shift.max()
            return
        movers = np.argpartition(shift, k - self.MOVERS)[k - self.MOVERS:]
        self.rest_lower -= np.delete(shift, movers).max()
        position = np.full(k, -1)
        position[movers] = np.arange(self.MOVERS)
        c_movers = np.ascontiguousarray(c64[movers], dtype=np.float32)
        rows = np.arange(self._DIST_CHUNK)
        assert self.labels is not None  # only called once rows have labels
        for start in range(0, len(self.x), self._DIST_CHUNK):
            stop = min(start + self._DIST_CHUNK, len(self.x))
            # faiss's own BLAS, not numpy's: numpy's OpenBLAS threads stay awake after a product and
            # compete with faiss's, which made the whole k-means about 3x slower (BENCHMARKS.md)
            block = np.ascontiguousarray(self.x[start:stop])
            sq = faiss.pairwise_distances(block, c_movers).astype(np.float64)
            # the bound is over centroids other than the row's own and its tracked ones
            for ids in (self.labels[start:stop, None], self.near_ids[start:stop]):
                pos = position[ids]
                hit = pos >= 0
                sq[np.broadcast_to(rows[: stop - start, None], pos.shape)[hit], pos[hit]] = np.inf
            nearest = np.sqrt(np.maximum(sq.min(axis=1) - margin[start:stop], 0.0))
            np.minimum(self.rest_lower[start:stop], nearest, out=self.rest_lower[start:stop])

    def _own_sq_distance(self, c64: np.ndarray) -> np.ndarray:
        """Exact squared distance of each row to the new position of its current centroid."""
        labels = self.labels
        assert labels is not None
        return self._row_sq_norms(
            lambda start, stop: self.x[start:stop].astype(np.float64) - c64[labels[start:stop]])

    def _row_sq_norms(self, block) -> np.ndarray:
        """Squared L2 norm of each row of `block(start, stop)` (float64), `_DIST_CHUNK` rows a time."""
        out = np.empty(len(self.x))
        for start in range(0, len(self.x), self._DIST_CHUNK):
            rows = block(start, min(start + self._DIST_CHUNK, len(self.x)))
            out[start: start + len(rows)] = np.einsum("ij,ij->i", rows, rows)
        return out


def assign(x: torch.Tensor, centroids: np.ndarray,
           search: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each local row: (label int64 (n,), squared L2 distance float32 (n,)).

    `search`: a `cluster.search` value (`choose_search`).
    """
    searcher = Searcher(centroids.shape[1], x.device, search)
    searcher.set_centroids(centroids)
    dis, lab = searcher.search(x)
    return lab, dis


def kmeans(x: torch.Tensor, ids: torch.Tensor, *, num_samples: int, k: int, niter: int, nredo: int,
           seed: int, max_points_per_centroid: int, min_points_per_centroid: int,
           spherical: bool = False, init: np.ndarray | None = None,
           distributed: bool = True, prune: bool = True, search: str = "auto",
           should_stop: StopCheck | None = None) -> KMeansResult:
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
        prune: on the CPU and from `BoundedAssignment.MIN_CLUSTERS` clusters on, search only the
            rows whose nearest centroid may have changed (`BoundedAssignment`; the same labels
            as searching every row). Only with the faiss-cpu backend (its bounds use faiss's
            k-nearest search on the host).
        search: a `cluster.search` value (`choose_search`; the caller logs the choice).
        should_stop: a collective stop check asked after every Lloyd iteration (every rank runs
            the same iterations); `StopRequested` on every rank when it says stop.

    Raises:
        ValueError: fewer rows than clusters; `ConfigError` (a ValueError) for a search backend
            that cannot run here.
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
    searcher = Searcher(d, x.device, search)
    best: KMeansResult | None = None
    centroids = None if init is None else np.array(init, dtype=np.float32, copy=True)
    for redo in range(nredo):
        if init is None:
            order = faiss_compat.rand_perm_prefix(n, k, seed + 1 + redo * faiss_compat.REDO_SEED_STRIDE)
            centroids = _fetch_rows(x, ids, order, d, reduce)
        assert centroids is not None  # from `init` or just drawn
        _post_process(centroids, spherical)
        objective, nsplit, labels, done = 0.0, 0, None, 0
        on_cpu = x.device.type == "cpu"
        bounded = (BoundedAssignment(x.numpy(), searcher)
                   if prune and on_cpu and searcher.backend == "faiss-cpu"
                   and k >= BoundedAssignment.MIN_CLUSTERS else None)
        local = LocalSums(k, d) if on_cpu else None
        for _ in range(niter):
            searcher.set_centroids(centroids)
            dis, lab = bounded.assign(centroids) if bounded is not None else searcher.search(x)
            centroids, objective, splits, labels, changed = _lloyd_step(x, dis, lab, k, n, reduce,
                                                                        spherical, labels, local)
            nsplit, done = nsplit + splits, done + 1
            stop_if_requested(should_stop, "k-means")
            if changed == 0:
                # No row changed cluster: the update is a deterministic function of the assignment,
                # so every remaining iteration would reproduce these centroids bit for bit (faiss
                # >= 1.8 stops here too, on an unchanged objective). Stopping changes no result.
                break
        if best is None or objective < best.objective:
            searched = bounded.searched / max(bounded.rows, 1) if bounded is not None else 1.0
            best = KMeansResult(centroids.copy(), objective, redo, nsplit, n, done, searched)
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
    if n < k * min_ppc and (n, k) not in _WARNED_FEW_POINTS:
        # faiss warns and carries on (the official levels 2-3 always hit it); once per size, not
        # every epoch
        _WARNED_FEW_POINTS.add((n, k))
        log.warning("k-means: clustering %d points to %d centroids: faiss asks for at least %d "
                    "(said once per size)", n, k, k * min_ppc)
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


def _lloyd_step(x: torch.Tensor, dis: torch.Tensor, lab: torch.Tensor, k: int, n: int,
                reduce: Callable[[torch.Tensor], torch.Tensor], spherical: bool,
                previous: torch.Tensor | None,
                local: LocalSums | None) -> tuple[np.ndarray, float, int, torch.Tensor, int]:
    """The rest of one faiss iteration after the assignment (`dis`, `lab`): reduce, update, split.

    `local` carries the CPU sums across the iterations of a restart (None on a GPU).
    Returns the new centroids, the objective of this assignment, the number of splits, the local
    labels and the global number of rows whose label changed (> 0 on the first iteration).
    """
    d = x.shape[1]
    # One buffer, one all-reduce: [sums (k*d) | counts (k) | objective | changed rows], float64.
    if local is not None:
        buf = torch.from_numpy(local.buffer(x.numpy(), lab.numpy(), dis.numpy(),
                                            None if previous is None else previous.numpy()))
    else:
        changed = 1 if previous is None else int((lab != previous).sum())
        buf = _partial_sums_device(x, lab, dis, k, changed)
    host = reduce(buf).cpu().numpy()
    counts = host[k * d: k * d + k]
    centroids = np.zeros((k, d), dtype=np.float32)
    nonempty = counts > 0
    centroids[nonempty] = (host[: k * d].reshape(k, d)[nonempty] / counts[nonempty, None]).astype(np.float32)
    nsplit = faiss_compat.split_clusters(centroids, counts.astype(np.float32), n)
    _post_process(centroids, spherical)
    return centroids, float(host[-2]), nsplit, lab, int(host[-1])


class LocalSums:
    """CPU: this rank's per-centroid row sums and counts (float64) over the iterations of a restart.

    numpy only: torch CPU ops between faiss searches wake torch's OpenMP pool, which then fights
    faiss's own pool and slows every faiss search several times (BENCHMARKS.md). The first iteration
    sums every row with one weighted `np.bincount` per dimension (single-threaded, no float64 copy
    of the rows); later ones move only the rows that changed cluster from one sum to the other
    (that full pass was a quarter of a pruned iteration at 200k rows; late iterations move a few
    hundred rows). Exact in the counts; the sums differ from a fresh float64 sum by float64
    rounding, far below the float32 centroids they make.
    """

    def __init__(self, k: int, d: int) -> None:
        self.k = k
        self.sums = np.zeros((k, d))
        self.counts = np.zeros(k)

    def buffer(self, x: np.ndarray, lab: np.ndarray, dis: np.ndarray,
               previous: np.ndarray | None) -> np.ndarray:
        """[sums (k*d) | counts (k) | objective | changed rows] for this assignment (a new array)."""
        k = self.k
        if previous is None:
            for j in range(x.shape[1]):
                self.sums[:, j] = np.bincount(lab, weights=x[:, j], minlength=k)
            self.counts[:] = np.bincount(lab, minlength=k)
            changed = 1
        else:
            moved = np.flatnonzero(lab != previous)
            changed = len(moved)
            if changed:
                rows, new, old = x[moved], lab[moved], previous[moved]
                for j in range(x.shape[1]):
                    self.sums[:, j] += (np.bincount(new, weights=rows[:, j], minlength=k)
                                        - np.bincount(old, weights=rows[:, j], minlength=k))
                self.counts += np.bincount(new, minlength=k) - np.bincount(old, minlength=k)
        return np.concatenate([self.sums.ravel(), self.counts,
                               [dis.sum(dtype=np.float64), float(changed)]])


def _partial_sums_device(x: torch.Tensor, lab: torch.Tensor, dis: torch.Tensor, k: int,
                         changed: int) -> torch.Tensor:
    """GPU: this rank's [sums (k*d) | counts (k) | objective | changed], float64, on x's device."""
    d = x.shape[1]
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
