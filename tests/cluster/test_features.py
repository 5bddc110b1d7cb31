"""The one feature extractor, on a fake loader of Batch objects (1 process and 2 gloo ranks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cluster.features import extract_features, split_features
from core.config import ClusterConfig, ConfigError, DataConfig
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


def test_embedding_runs_in_inference_mode_and_the_rows_are_ordinary_tensors():
    modes = []

    def embed(views):
        modes.append(torch.is_inference_mode_enabled())
        return views[:, :5] * 2.0

    found = extract_features(embed, _loader([4, 3]), normalize=True)
    assert modes == [True, True]
    assert not found.feats.is_inference() and not found.idx.is_inference()
    # later code may change them in place and use them in autograd (an inference tensor can do neither)
    weight = torch.ones(5, requires_grad=True)
    (found.feats @ weight).sum().backward()
    found.feats.mul_(2.0)
    torch.testing.assert_close(weight.grad, found.feats.sum(dim=0) / 2.0)


def test_bf16_without_cuda_is_refused_with_the_key_to_change():
    with pytest.raises(ConfigError, match=r"^cluster.feature_precision: bf16 needs CUDA .* on cpu; set "
                                          r"cluster.feature_precision=fp32$"):
        extract_features(_Embed(), _loader([4]), precision="bf16")


class _FakeLoader:
    """The eval loader's contract over 13 fixed rows, in batches of the config's eval batch size."""

    def __init__(self, data, **_):
        self.batch = data.eval_batch_size
        self.views = torch.randn(13, 12, generator=torch.Generator().manual_seed(1))
        self.closed = False

    def __len__(self):
        return -(-13 // self.batch)

    def __iter__(self):
        for start in range(0, 13, self.batch):
            idx = torch.arange(start, min(start + self.batch, 13))
            yield Batch([self.views[idx]], idx, idx % 3)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_split(monkeypatch):
    """Patches the loader and the manifest; returns the list of loaders built."""
    import cluster.features as features

    built = []

    def build_loader(data, **kwargs):
        built.append(_FakeLoader(data, **kwargs))
        return built[-1]

    monkeypatch.setattr(features, "build_loader", build_loader)
    monkeypatch.setattr(features, "split_info", lambda shards, split: SimpleNamespace(class_names=["a"]))
    return built


def _bn_embed():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 5))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()  # the caller's eval mode: BatchNorm uses its running statistics


def test_clustering_pass_uses_cluster_feature_batch_size_and_gives_the_same_rows(fake_split):
    data = DataConfig(eval_batch_size=2)
    embed = _bn_embed()
    plain = split_features(embed, data, "train", normalize=True)
    default = split_features(embed, data, "train", normalize=True, cluster=ClusterConfig())
    chosen = split_features(embed, data, "train", normalize=True, cluster=ClusterConfig(feature_batch_size=5))
    assert [loader.batch for loader in fake_split] == [2, 8, 5]  # 0 = 4 x data.eval_batch_size
    assert all(loader.closed for loader in fake_split)
    for found in (default, chosen):
        assert torch.equal(found.idx, plain.idx) and found.class_names == ["a"]
        torch.testing.assert_close(found.feats, plain.feats)  # eval-mode BN: the batch changes nothing


def test_clustering_pass_refuses_bf16_without_cuda_before_reading_data(fake_split):
    with pytest.raises(ConfigError, match="cluster.feature_precision: bf16 needs CUDA"):
        split_features(_bn_embed(), DataConfig(), "train", cluster=ClusterConfig(feature_precision="bf16"))
    assert fake_split == []


def test_a_stop_check_ends_the_feature_pass_after_the_batch_in_flight():
    from core.errors import StopRequested

    batches = [Batch([torch.randn(4, 3, 8, 8)], torch.arange(4) + 4 * i, torch.zeros(4, dtype=torch.long))
               for i in range(5)]
    seen = []

    def embed(views: torch.Tensor) -> torch.Tensor:
        seen.append(views.shape[0])
        return views.flatten(1)[:, :6]

    with pytest.raises(StopRequested, match="stop requested during features"):
        extract_features(embed, batches, desc="features", should_stop=lambda: len(seen) >= 2)
    assert len(seen) == 2  # the two batches before the stop, not the five of the split
