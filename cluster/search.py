"""The nearest-centroid search of the k-means (`cluster.search`; docs/architecture.md#decisions).

Backends: faiss-cpu (a flat L2 index on the host), faiss-gpu (a flat GPU index on the rows' device,
one cached `StandardGpuResources` per device) and torch (`torch_nearest`: faiss's formula in exact
fp32 on the rows' device, chunked). `choose_search` picks one for `cluster.search` and the rows'
device; `Searcher` runs it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np
import torch

from core.config import SEARCHES, ConfigError
from core.errors import first_line

log = logging.getLogger(__name__)

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
