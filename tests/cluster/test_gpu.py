"""The CUDA path (faiss-gpu index on torch CUDA tensors, NCCL-ready buffers) equals the CPU path."""

from __future__ import annotations

import faiss
import pytest
import torch

from cluster.hierarchy import hierarchical_kmeans
from core.config import ClusterConfig
from tests.cluster._data import planted

pytestmark = pytest.mark.gpu


def test_cuda_features_give_the_cpu_result():
    if not hasattr(faiss, "GpuIndexFlatL2"):
        pytest.skip("faiss-gpu is not installed (faiss-cpu only): the GPU index path cannot run")
    idx, feats = planted()
    kwargs = {"num_samples": 2000, "num_clusters": [20, 10, 5], "cfg": ClusterConfig(), "temperature": 0.2}
    cpu = hierarchical_kmeans(idx, feats, **kwargs)
    gpu = hierarchical_kmeans(idx.cuda(), feats.cuda(), **kwargs)
    assert all(t.is_cuda for t in gpu.im2cluster + gpu.centroids + gpu.density + gpu.logits)
    for a, b in zip(gpu.im2cluster, cpu.im2cluster, strict=True):
        assert torch.equal(a.cpu(), b)
    for a, b in zip(gpu.centroids + gpu.density, cpu.centroids + cpu.density, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
