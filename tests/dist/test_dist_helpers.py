"""core/dist.py on 2 gloo ranks, and its single-process answers."""

from __future__ import annotations

import pytest
import torch

from core import dist

pytestmark = pytest.mark.dist


def _gather_unequal() -> dict:
    r = dist.rank()
    rows = torch.arange(3 * (r + 1) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * r
    return {"rank": r, "world": dist.world(), "main": dist.is_main(),
            "gathered": dist.all_gather_cat(rows),
            "equal": dist.all_gather_equal(torch.full((2,), float(r))),
            "sum": dist.all_reduce_sum(torch.tensor([r + 1.0])),
            "obj": dist.broadcast_object({"from": r, "list": [r] * 3}),
            "objs": dist.all_gather_object(f"rank{r}"),
            "tensor": dist.broadcast_(torch.full((3,), float(r)), src=1)}


def test_collectives_on_two_ranks(dist_run):
    results = dist_run(_gather_unequal, 2)
    expected = torch.cat([torch.arange(6.).reshape(-1, 2), torch.arange(12.).reshape(-1, 2) + 100])
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["main"] == (r == 0)
        assert torch.equal(res["gathered"], expected)
        assert torch.equal(res["equal"], torch.tensor([0., 0., 1., 1.]))
        assert res["sum"].item() == 3.0
        assert res["obj"] == {"from": 0, "list": [0, 0, 0]}
        assert res["objs"] == ["rank0", "rank1"]
        assert torch.equal(res["tensor"], torch.ones(3))


def _gather_with_empty_rank() -> torch.Tensor:
    rows = torch.ones(0, 4) if dist.rank() == 0 else torch.ones(5, 4) * dist.rank()
    return dist.all_gather_cat(rows)


def test_gather_when_one_rank_has_no_rows(dist_run):
    for res in dist_run(_gather_with_empty_rank, 3):
        assert res.shape == (10, 4)
        assert torch.equal(res[:5], torch.ones(5, 4)) and torch.equal(res[5:], 2 * torch.ones(5, 4))


def test_single_process_answers():
    assert not dist.is_initialized()
    assert (dist.rank(), dist.world(), dist.is_main()) == (0, 1, True)
    t = torch.arange(4.)
    assert dist.all_gather_cat(t) is t and dist.all_reduce_sum(t) is t
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.all_gather_object(5) == [5]
    dist.barrier()
