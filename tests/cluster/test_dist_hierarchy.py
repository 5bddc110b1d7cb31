"""Sharded clustering on 2 and 3 gloo ranks equals one process on all rows."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from cluster.hierarchy import hierarchical_kmeans
from core import dist
from core.config import ClusterConfig
from tests.cluster._data import planted

pytestmark = [pytest.mark.dist, pytest.mark.slow]

N, LEVELS, T = 2000, [20, 10, 5], 0.2


def _shard(sizes: list[int], nan_on: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    idx, feats = planted(n=N)
    start = sum(sizes[: dist.rank()])
    mine = slice(start, start + sizes[dist.rank()])
    idx, feats = idx[mine], feats[mine].clone()
    if nan_on == dist.rank():
        feats[0, 0] = float("nan")
    return idx, feats


def _run(idx: torch.Tensor, feats: torch.Tensor, levels: list[int] = LEVELS) -> dict:
    protos = hierarchical_kmeans(idx, feats, num_samples=N, num_clusters=levels, cfg=ClusterConfig(),
                                 temperature=T)
    # numpy, not tensors: torch's queue pickling shares tensor storage through file descriptors,
    # which races with the rank process exiting (seen as ConnectionResetError in the parent)
    out = {key: [t.numpy() for t in ts] for key, ts in protos.state_dict().items()}
    return {**out, "raw": [t.numpy() for t in protos.raw_centroids],
            "objective": [s.final_objective for s in protos.stats]}


def _cluster_on_ranks(sizes: list[int]) -> dict:
    faiss.omp_set_num_threads(1)  # several ranks share the 2 test cores
    return _run(*_shard(sizes))


def _errors_then_success() -> list[str]:
    faiss.omp_set_num_threads(1)
    messages = []
    sizes = [1200, 800]
    failing = [lambda: _run(*_shard(sizes, nan_on=1)),  # one rank's bad rows fail every rank
               lambda: _run(*_duplicate_on_rank1(sizes)),  # exactly-once violated on one rank
               lambda: _run(*_shard(sizes), levels=[20, 20])]  # raised on rank 0 only, after level 1
    for call in failing:
        try:
            call()
            messages.append("no error")
        except ValueError as err:
            messages.append(str(err))
    _run(*_shard(sizes))  # and the group still works
    return messages


def _duplicate_on_rank1(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    idx, feats = _shard(sizes)
    if dist.rank() == 1:
        idx = idx.clone()
        idx[0] = 0 if idx[1] != 0 else 1
    return idx, feats


@pytest.fixture(scope="module")
def single() -> dict:
    return _run(*planted(n=N))


@pytest.mark.parametrize("sizes", [[1500, 500], [0, 1100, 900]])
def test_sharded_equals_single_process_and_is_identical_on_every_rank(dist_run, single, sizes):
    results = dist_run(_cluster_on_ranks, len(sizes), sizes)
    for key in ("im2cluster", "centroids", "density", "cluster2cluster", "logits", "raw"):
        for res in results[1:]:  # bit for bit on every rank
            assert all(np.array_equal(a, b) for a, b in zip(results[0][key], res[key], strict=True)), key
    ours = results[0]
    for key in ("im2cluster", "cluster2cluster"):
        assert all(np.array_equal(a, b) for a, b in zip(ours[key], single[key], strict=True)), key
    for key in ("centroids", "density", "logits", "raw"):
        for a, b in zip(ours[key], single[key], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert ours["objective"] == pytest.approx(single["objective"], rel=1e-6)


def test_errors_reach_every_rank_without_deadlock(dist_run):
    per_rank = dist_run(_errors_then_success, 2)
    assert per_rank[0] == per_rank[1]
    nan, dup, level = per_rank[0]
    assert "1 feature rows are NaN or infinite" in nan
    assert "1 missing, 1 duplicated" in dup
    assert "level 2: every one of the 20 clusters has at most one member" in level


def _rank0_fails_alone_then_lingers() -> dict:
    """Rank 0 fails in the levels it computes alone (as a CUDA error would) and stays alive a while
    afterwards (a process in its cleanup, or NCCL, which tells no peer); rank 1 must learn it at once."""
    import time

    from cluster import hierarchy

    faiss.omp_set_num_threads(1)
    if dist.rank() == 0:
        def broken(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
        hierarchy._run_upper = broken
    start = time.perf_counter()
    try:
        _run(*_shard([1000, 1000]))
        message = "no error"
    except RuntimeError as err:
        message = str(err)
    seconds = time.perf_counter() - start
    if dist.rank() == 0:
        time.sleep(20)  # the lingering rank: rank 1's answer above did not wait for this
    return {"message": message, "seconds": seconds}


def test_an_error_on_rank_0_reaches_the_other_ranks_within_seconds(dist_run):
    rank0, rank1 = dist_run(_rank0_fails_alone_then_lingers, 2)
    assert rank0["message"].startswith("CUDA error: an illegal memory access")  # its own, unchanged
    assert rank1["message"] == ("clustering failed on rank 0: RuntimeError: CUDA error: an illegal memory "
                                "access was encountered")
    assert rank1["seconds"] < 15  # not the 20 s rank 0 lingers, nor a collective timeout


def _stop_on_rank1_after(iterations: int) -> dict:
    """SIGTERM-like stop flag set on rank 1 only, after some k-means iterations: every rank stops."""
    from core.errors import StopRequested

    faiss.omp_set_num_threads(1)
    asked = []

    def any_rank() -> bool:
        asked.append(1)
        flag = torch.tensor([1.0 if dist.rank() == 1 and len(asked) > iterations else 0.0])
        return bool(dist.all_reduce_sum(flag).item() > 0)

    idx, feats = _shard([1000, 1000])
    try:
        hierarchical_kmeans(idx, feats, num_samples=N, num_clusters=LEVELS, cfg=ClusterConfig(niter=20),
                            temperature=T, should_stop=any_rank)
        return {"stopped": False, "asked": len(asked)}
    except StopRequested as err:
        return {"stopped": True, "asked": len(asked), "message": str(err)}


def test_a_stop_on_one_rank_stops_every_rank_inside_the_k_means(dist_run):
    for rank in dist_run(_stop_on_rank1_after, 2, 2):
        assert rank == {"stopped": True, "asked": 3, "message": "stop requested during k-means"}
