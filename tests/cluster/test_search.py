"""The k-means search backends (`cluster.search`): the torch search against faiss-cpu, the choice
and its log line, the one cached faiss GPU resource per device (issue 16)."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
import torch

import cluster.kmeans as km
from cluster.hierarchy import hierarchical_kmeans
from cluster.kmeans import choose_search, kmeans, resolve_search, torch_nearest
from core.config import ClusterConfig, ConfigError
from tests.cluster._data import planted

# Unit rows and centroids: |x|^2 + |c|^2 - 2 x.c is about 1, and its fp32 rounding (faiss's BLAS or
# torch's product, either summation order) is about 1e-6. Two centroids whose distances differ by
# less than 10x that are a near-tie: either one is a correct answer.
NEAR_TIE = 1e-5


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _faiss_two_nearest(x, c):
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(c)
    return index.search(x, 2)


def _assert_same_as_faiss(x, c, dis, lab):
    want_dis, want_lab = _faiss_two_nearest(x, c)
    clear = want_dis[:, 1] - want_dis[:, 0] > NEAR_TIE
    assert clear.mean() > 0.9  # the comparison is about the clear rows: there must be many
    np.testing.assert_array_equal(lab[clear], want_lab[clear, 0])
    tied = lab[~clear]
    assert ((tied == want_lab[~clear, 0]) | (tied == want_lab[~clear, 1])).all()
    np.testing.assert_allclose(dis, want_dis[:, 0], rtol=1e-5, atol=1e-6)


def test_torch_search_equals_faiss_cpu_except_near_ties(monkeypatch):
    # a small block (7 rows x 300 centroids) so that the rows go in many blocks, the last one short
    monkeypatch.setattr(km, "_TORCH_BLOCK", 7 * 300)
    x, c = _unit(5003, 128, 0), _unit(300, 128, 1)
    c[50] = c[40] + np.float32(1e-7)  # a near-tie within float rounding
    x[:20] = c[40] + 0.05 * _unit(20, 128, 2)
    dis, lab = torch_nearest(torch.from_numpy(x), torch.from_numpy(c))
    assert dis.dtype == torch.float32 and lab.dtype == torch.int64
    _assert_same_as_faiss(x, c, dis.numpy(), lab.numpy())


def test_torch_search_gives_exact_ties_to_the_lower_id():
    # faiss's single-neighbour scan keeps the first minimum (strict <); so does torch.min
    x, c = _unit(400, 32, 3), _unit(20, 32, 4)
    c[11] = c[17] = c[5]
    x[:50] = c[5] + 0.01 * _unit(50, 32, 5)
    _, lab = torch_nearest(torch.from_numpy(x), torch.from_numpy(c))
    assert (lab[:50] == 5).all()
    assert not ((lab == 11) | (lab == 17)).any()


def test_torch_search_multiplies_in_full_fp32_and_restores_the_callers_setting(monkeypatch):
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.is_autocast_enabled("cpu")))
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # a training setting that must not reach the search
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch_nearest(torch.from_numpy(_unit(10, 8, 0)), torch.from_numpy(_unit(4, 8, 1)))
        assert seen == [("ieee", False)]
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def _kmeans(x, k, search, **kwargs):
    return kmeans(torch.from_numpy(x), torch.arange(len(x)), num_samples=len(x), k=k, niter=20, nredo=2,
                  seed=0, max_points_per_centroid=1000, min_points_per_centroid=10, distributed=False,
                  search=search, **kwargs)


@pytest.mark.parametrize("k", [30, 256])  # 256: faiss-cpu prunes (BoundedAssignment), torch does not
def test_kmeans_with_torch_search_equals_faiss_cpu_on_separated_data(monkeypatch, k):
    calls = []
    real = km.torch_nearest
    monkeypatch.setattr(km, "torch_nearest", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(6)
    means = _unit(k, 64, 7) * 4.0  # far apart against the noise: no row is near a boundary
    x = (means[rng.integers(0, k, 20 * k)] + 0.05 * rng.standard_normal((20 * k, 64))).astype(np.float32)
    ours, ref = _kmeans(x, k, "torch"), _kmeans(x, k, "faiss-cpu")
    assert calls  # the torch search did run
    assert ours.objective == pytest.approx(ref.objective, rel=1e-5)
    np.testing.assert_allclose(ours.centroids, ref.centroids, atol=1e-5)
    lab_t, _ = km.assign(torch.from_numpy(x), ours.centroids, "torch")
    lab_f, _ = km.assign(torch.from_numpy(x), ref.centroids, "faiss-cpu")
    assert torch.equal(lab_t, lab_f)


def test_auto_takes_faiss_cpu_for_cpu_rows_and_torch_on_a_gpu_without_faiss_gpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_search("auto", cpu, "the features are on the CPU")[0] == "faiss-cpu"
    backend, why = choose_search("auto", cuda, "this faiss has no GPU support")
    assert backend == "torch" and "no GPU support" in why and "cuda:0" in why
    assert choose_search("auto", cuda, None) == ("faiss-gpu",
                                                 "cluster.search=auto, faiss-gpu works on cuda:0")
    assert choose_search("torch", cpu, None)[0] == "torch"
    backend, why = choose_search("faiss-cpu", cuda, None)
    assert backend == "faiss-cpu" and "copied from cuda:0 to the host" in why


@pytest.mark.skipif(hasattr(faiss, "GpuIndexFlatL2"), reason="checks a faiss-cpu installation")
def test_without_faiss_gpu_cuda_rows_get_torch_and_faiss_gpu_is_an_error():
    # decided from the faiss build alone: no CUDA call, so this runs on a CPU-only host
    assert resolve_search("auto", torch.device("cuda", 0))[0] == "torch"
    with pytest.raises(ConfigError, match=r"^cluster.search: faiss-gpu cannot run here: this faiss has "
                                          r"no GPU support .*set cluster.search=auto or torch$"):
        resolve_search("faiss-gpu", torch.device("cuda", 0))


def test_faiss_gpu_for_cpu_rows_and_unknown_names_are_errors():
    with pytest.raises(ConfigError, match="cluster.search: faiss-gpu cannot run here: the features are on "
                                          "the CPU"):
        resolve_search("faiss-gpu", torch.device("cpu"))
    with pytest.raises(ConfigError, match="cluster.search: must be one of"):
        choose_search("gpu", torch.device("cpu"), None)


def _hier(cfg, caplog):
    idx, feats = planted()
    with caplog.at_level(logging.INFO, logger="cluster.hierarchy"):
        out = hierarchical_kmeans(idx, feats, num_samples=2000, num_clusters=[20, 10, 5], cfg=cfg,
                                  temperature=0.2)
    lines = [r.getMessage() for r in caplog.records if "nearest-centroid search" in r.getMessage()]
    caplog.clear()
    return out, lines


def test_hierarchy_passes_cluster_search_through_and_logs_the_choice_once(monkeypatch, caplog):
    devices = []
    real = km.torch_nearest
    monkeypatch.setattr(km, "torch_nearest", lambda x, *a: devices.append(x.device) or real(x, *a))
    ours, lines = _hier(ClusterConfig(search="torch"), caplog)
    assert lines == ["clustering: nearest-centroid search with torch (cluster.search=torch, exact fp32 on "
                     "cpu)"]
    assert devices and set(devices) == {torch.device("cpu")}  # every level searched with torch
    count = len(devices)
    ref, lines = _hier(ClusterConfig(), caplog)
    assert lines == ["clustering: nearest-centroid search with faiss-cpu (cluster.search=auto, the features "
                     "are on the CPU)"]
    assert len(devices) == count  # auto on CPU rows: faiss-cpu, not torch
    for a, b in zip(ours.im2cluster, ref.im2cluster, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours.centroids + ours.density, ref.centroids + ref.density, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hierarchy_refuses_faiss_gpu_where_it_cannot_run():
    idx, feats = planted()
    with pytest.raises(ConfigError, match="cluster.search: faiss-gpu cannot run here"):
        hierarchical_kmeans(idx, feats, num_samples=2000, num_clusters=[20, 10, 5],
                            cfg=ClusterConfig(search="faiss-gpu"), temperature=0.2)


class _FakeGpuResources:
    created = 0

    def __init__(self):
        type(self).created += 1


class _FakeGpuIndex:
    """Stands in for faiss.GpuIndexFlatL2 on a host without faiss-gpu (host numpy search)."""

    def __init__(self, res, d, config):
        assert isinstance(res, _FakeGpuResources)
        self.centroids = np.zeros((0, d), dtype=np.float32)

    def reset(self):
        self.centroids = self.centroids[:0]

    def add(self, c):
        self.centroids = np.asarray(c)

    def search(self, x, k):
        d = ((np.asarray(x)[:, None] - self.centroids[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, :k], np.argsort(d, axis=1)[:, :k]


def test_one_faiss_gpu_resource_per_device_for_every_searcher(monkeypatch):
    monkeypatch.setattr(km, "_GPU_RESOURCES", {})
    monkeypatch.setattr(km, "_FAISS_GPU_PROBLEM", {})
    monkeypatch.setattr(_FakeGpuResources, "created", 0)
    monkeypatch.setattr(faiss, "StandardGpuResources", _FakeGpuResources, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", _FakeGpuIndex, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", type("Config", (), {}), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    searchers = [km.Searcher(16, torch.device("cuda", i), "faiss-gpu") for i in (0, 0, 0, 1)]
    assert [s.backend for s in searchers] == ["faiss-gpu"] * 4
    assert _FakeGpuResources.created == 2  # cuda:0 and cuda:1, not one per searcher
    assert km.gpu_resources(0) is km.gpu_resources(0) is not km.gpu_resources(1)


def test_a_faiss_gpu_that_fails_its_test_search_is_unusable(monkeypatch):
    class Broken(_FakeGpuIndex):
        def search(self, x, k):
            raise RuntimeError("no kernel image is available for execution on the device\nmore")

    monkeypatch.setattr(km, "_GPU_RESOURCES", {})
    monkeypatch.setattr(km, "_FAISS_GPU_PROBLEM", {})
    monkeypatch.setattr(faiss, "StandardGpuResources", _FakeGpuResources, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", Broken, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", type("Config", (), {}), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    backend, why = resolve_search("auto", torch.device("cuda", 0))
    assert backend == "torch"
    assert "failed a test search on cuda:0 (no kernel image is available for execution on the device)" in why
    with pytest.raises(ConfigError, match="cluster.search: faiss-gpu cannot run here: faiss-gpu failed"):
        resolve_search("faiss-gpu", torch.device("cuda", 0))
    assert resolve_search("auto", torch.device("cuda", 1))[1].endswith(
        "(faiss sees 1 GPU(s), not cuda:1): exact fp32 on cuda:1")
