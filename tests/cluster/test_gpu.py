"""The CUDA paths (faiss-gpu index or torch search on CUDA tensors, NCCL-ready buffers) equal the
CPU path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cluster.kmeans as km
from cluster.hierarchy import hierarchical_kmeans
from core.config import ClusterConfig
from tests.cluster._data import planted

pytestmark = pytest.mark.gpu


def _cuda_searches(monkeypatch) -> list[tuple[torch.device, torch.device, torch.device]]:
    """Records (rows, distances, labels) devices of every torch search."""
    seen = []
    real = km.torch_nearest

    def spy(x, *args):
        dis, lab = real(x, *args)
        seen.append((x.device, dis.device, lab.device))
        return dis, lab

    monkeypatch.setattr(km, "torch_nearest", spy)
    return seen


@pytest.mark.parametrize("search", ["auto", "faiss-gpu", "torch"])
def test_cuda_features_give_the_cpu_result(monkeypatch, search):
    problem = km.faiss_gpu_problem(torch.device("cuda", 0))
    if search == "faiss-gpu" and problem:
        pytest.skip(f"faiss-gpu cannot run here ({problem}): the GPU index path cannot run")
    seen = _cuda_searches(monkeypatch)
    idx, feats = planted()
    kwargs = {"num_samples": 2000, "num_clusters": [20, 10, 5], "temperature": 0.2}
    cpu = hierarchical_kmeans(idx, feats, cfg=ClusterConfig(search="faiss-cpu"), **kwargs)
    gpu = hierarchical_kmeans(idx.cuda(), feats.cuda(), cfg=ClusterConfig(search=search), **kwargs)
    if search == "torch" or (search == "auto" and problem):
        # the search really ran in torch on the GPU, for every level
        assert seen and all(d.type == "cuda" for devices in seen for d in devices)
    else:
        assert not seen
    assert all(t.is_cuda for t in gpu.im2cluster + gpu.centroids + gpu.density + gpu.logits)
    for a, b in zip(gpu.im2cluster, cpu.im2cluster, strict=True):
        assert torch.equal(a.cpu(), b)
    for a, b in zip(gpu.centroids + gpu.density, cpu.centroids + cpu.density, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


def test_torch_search_on_cuda_equals_faiss_cpu_except_near_ties(monkeypatch):
    from tests.cluster.test_search import _assert_same_as_faiss, _unit

    seen = _cuda_searches(monkeypatch)
    x, c = _unit(20000, 128, 0), _unit(3000, 128, 1)
    # TF32 on for the process, as a training run may set it: the search must not use it
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        lab, dis = km.assign(torch.from_numpy(x).cuda(), c, "torch")
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert seen == [(torch.device("cuda", 0),) * 3]
    _assert_same_as_faiss(x, c, dis.cpu().numpy(), lab.cpu().numpy())


def test_kmeans_with_torch_search_on_cuda_equals_faiss_cpu(monkeypatch):
    seen = _cuda_searches(monkeypatch)
    rng = np.random.default_rng(6)
    means = rng.standard_normal((300, 64)) * 4.0 / 8.0
    x = (means[rng.integers(0, 300, 6000)] + 0.05 * rng.standard_normal((6000, 64))).astype(np.float32)
    args = {"num_samples": 6000, "k": 300, "niter": 20, "nredo": 2, "seed": 0, "distributed": False,
            "max_points_per_centroid": 1000, "min_points_per_centroid": 10}
    gpu = km.kmeans(torch.from_numpy(x).cuda(), torch.arange(6000).cuda(), search="torch", **args)
    cpu = km.kmeans(torch.from_numpy(x), torch.arange(6000), search="faiss-cpu", **args)
    assert seen and all(d.type == "cuda" for devices in seen for d in devices)
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-5)
    np.testing.assert_allclose(gpu.centroids, cpu.centroids, atol=1e-5)


def test_faiss_gpu_resources_are_created_once_per_device():
    problem = km.faiss_gpu_problem(torch.device("cuda", 0))
    if problem:
        pytest.skip(f"faiss-gpu cannot run here ({problem})")
    first = km.Searcher(16, torch.device("cuda", 0), "faiss-gpu")
    second = km.Searcher(16, torch.device("cuda", 0), "faiss-gpu")
    assert first.backend == second.backend == "faiss-gpu"
    assert list(km._GPU_RESOURCES) == [0]


def test_bf16_feature_pass_autocasts_on_cuda_and_returns_fp32():
    from cluster.features import extract_features
    from pipeline.batch import Batch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 32))
    net = net.cuda().eval()
    seen = []

    def embed(views):
        out = net(views)
        seen.append((torch.is_autocast_enabled("cuda"), out.dtype))
        return out

    views = torch.randn(96, 64, device="cuda")

    def loader():
        for start in range(0, 96, 32):
            idx = torch.arange(start, start + 32, device="cuda")
            yield Batch([views[idx]], idx, idx % 3)

    fp32 = extract_features(embed, loader(), normalize=True)
    bf16 = extract_features(embed, loader(), normalize=True, precision="bf16")
    assert seen == [(False, torch.float32)] * 3 + [(True, torch.bfloat16)] * 3
    assert bf16.feats.dtype == torch.float32 and bf16.feats.is_cuda
    torch.testing.assert_close(bf16.feats, fp32.feats, rtol=0, atol=3e-2)  # bf16: ~3 significant digits
