"""The one feature extractor, on a fake loader of Batch objects (1 process and 2 gloo ranks)."""

from __future__ import annotations

import pytest
import torch

from cluster.features import extract_features
from pipeline.batch import Batch


def _loader(sizes, d_in=12, start=0):
    g = torch.Generator().manual_seed(0)
    offset = start
    for b in sizes:
        idx = torch.arange(offset, offset + b)
        offset += b
        yield Batch([torch.randn(b, d_in, generator=g), torch.zeros(b, d_in)], idx, idx % 3)


class _Embed:
    def __init__(self, d_in=12, d_out=5):
        self.weight = torch.randn(d_in, d_out, requires_grad=True)
        self.seen: list[int] = []

    def __call__(self, views):
        self.seen.append(views.shape[0])
        assert not torch.is_grad_enabled()
        return views @ self.weight * 3.0


def test_rows_idx_and_normalisation():
    embed = _Embed()
    found = extract_features(embed, _loader([4, 3, 5], start=10), normalize=True)
    idx, feats = found.idx, found.feats
    assert embed.seen == [4, 3, 5] and found.num_samples == 12
    assert torch.equal(idx, torch.arange(10, 22)) and idx.dtype == torch.int64
    assert torch.equal(found.cls, idx % 3) and found.cls.dtype == torch.int64
    assert feats.shape == (12, 5) and feats.dtype == torch.float32 and not feats.requires_grad
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(12))
    views = torch.cat([b.views[0] for b in _loader([4, 3, 5])])
    torch.testing.assert_close(feats, torch.nn.functional.normalize(views @ embed.weight.detach(), dim=1))


def test_without_normalize_rows_are_the_embeddings():
    embed = _Embed()
    feats = extract_features(embed, _loader([4, 3])).feats
    views = torch.cat([b.views[0] for b in _loader([4, 3])])
    torch.testing.assert_close(feats, views @ embed.weight.detach() * 3.0)


def test_num_batches_reads_exactly_that_many():
    batches = _loader([2, 2, 2, 2])
    embed = _Embed()
    found = extract_features(embed, batches, num_batches=2)
    assert embed.seen == [2, 2] and torch.equal(found.idx, torch.arange(4))
    assert next(batches).idx.tolist() == [4, 5]  # the third batch was not consumed


def test_no_rows_anywhere_is_an_error():
    with pytest.raises(ValueError, match="no rank has any row"):
        extract_features(_Embed(), iter([]))


def _extract_with_rank1_empty() -> dict:
    from core import dist

    sizes = [5, 4] if dist.rank() == 0 else []
    found = extract_features(_Embed(d_out=7), _loader(sizes), normalize=True)
    return {"idx": found.idx.numpy(), "shape": tuple(found.feats.shape), "n": found.num_samples,
            "cls": found.cls.numpy()}


@pytest.mark.dist
def test_an_empty_rank_gets_zero_rows_of_the_agreed_width(dist_run):
    full, empty = dist_run(_extract_with_rank1_empty, 2)
    assert full["shape"] == (9, 7) and full["n"] == 9 and full["idx"].tolist() == list(range(9))
    assert empty["shape"] == (0, 7) and empty["n"] == 9
    assert empty["idx"].shape == (0,) and empty["cls"].shape == (0,)


def test_non_finite_embeddings_are_counted():
    def embed(views):
        out = views[:, :5].clone()
        if views.shape[0] == 4:  # only the first batch is corrupt
            out[1, 0] = float("nan")
            out[2, 3] = float("-inf")
        return out

    with pytest.raises(ValueError, match="2 of 7 embeddings on rank 0 are NaN or infinite"):
        extract_features(embed, _loader([4, 3]))
