"""Shuffle-BN and the queue update on 2 gloo ranks equal the single-process answer (method.md §1, 6, 10.9)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import dist
from model.encoders import create_encoder
from model.momentum import shuffled_keys
from pipeline.batch import Batch
from tests.conftest import run_on_ranks
from tests.model._helpers import make_batch, make_model, make_prototypes

pytestmark = [pytest.mark.dist, pytest.mark.slow]
PER_RANK = 4


class _Recorder(nn.Module):
    """Per-sample features (channel means) that also records the images it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x.mean(dim=(2, 3))


def _by_value(result: dict) -> dict:
    """Tensors as numpy arrays: torch's multiprocessing pickles tensors as shared-memory handles,
    which can vanish when the rank process exits before the parent reads the queue."""
    return {k: v.detach().numpy().copy() for k, v in result.items()}


def _tensors(result: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in result.items()}


def _global_images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2 * PER_RANK, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _eval_encoder() -> nn.Module:
    torch.manual_seed(0)
    trunk, _ = create_encoder("resnet18_small")
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is not the identity
        for m in trunk.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return trunk.eval()


def _shuffle_on_rank() -> dict:
    r = dist.rank()
    mine = _global_images()[r * PER_RANK:(r + 1) * PER_RANK]
    torch.manual_seed(100 + r)  # different RNG streams: rank 0's permutation must win
    recorder = _Recorder()
    rec_local, rec_all = shuffled_keys(recorder, mine)
    encoder = _eval_encoder()
    keys, keys_all = shuffled_keys(encoder, mine)
    return _by_value({"seen": recorder.seen[0], "rec_local": rec_local, "rec_all": rec_all,
                      "keys": keys, "keys_all": keys_all})


def _all_on_rank() -> dict:
    return {"shuffle": _shuffle_on_rank(), "steps": _steps_on_rank()}


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    """One spawn of 2 gloo ranks for both tests (the `dist_run` fixture's runner, module-scoped:
    each spawn costs seconds of interpreter start-up)."""
    return run_on_ranks(_all_on_rank, 2)


def test_shuffle_bn_returns_every_key_in_its_own_position(rank_results):
    results = [_tensors(res["shuffle"]) for res in rank_results]
    images = _global_images()
    own = F.normalize(images.mean(dim=(2, 3)), dim=1)
    seen = torch.cat([res["seen"] for res in results])
    order = [int((images - row).abs().sum(dim=(1, 2, 3)).argmin()) for row in seen]
    assert sorted(order) == list(range(2 * PER_RANK))  # the ranks encoded a permutation of all images
    assert order != list(range(2 * PER_RANK))  # ... that was really shuffled (fixed seeds)
    with torch.no_grad():
        direct = F.normalize(_eval_encoder()(images), dim=1)
    for r, res in enumerate(results):
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        torch.testing.assert_close(res["rec_local"], own[rows])
        torch.testing.assert_close(res["rec_all"], own)
        torch.testing.assert_close(res["keys"], direct[rows], atol=1e-5, rtol=1e-4)  # eval-mode BN
        torch.testing.assert_close(res["keys_all"], direct, atol=1e-5, rtol=1e-4)


def _run_steps(batch: Batch, rows: slice) -> dict:
    model = make_model(queue=16)
    model.eval()  # BN in eval mode: each key depends on its own image only
    protos = make_prototypes()
    for step in range(2):
        part = Batch([v[rows] for v in batch.views], batch.idx[rows], batch.cls[rows])
        model(part, protos if step else None, epoch=1)
    return {"queue": model.queue, "ptr": model.queue_ptr, "index": model.queue_index,
            "excluded": model.last_terms.proto_excluded[0], "labels": model.last_terms.labels[0]}


def _steps_on_rank() -> dict:
    r = dist.rank()
    return _by_value(_run_steps(make_batch(b=2 * PER_RANK), slice(r * PER_RANK, (r + 1) * PER_RANK)))


def test_enqueue_matches_one_process_with_the_concatenated_batch(rank_results):
    results = [_tensors(res["steps"]) for res in rank_results]
    single = _run_steps(make_batch(b=2 * PER_RANK), slice(None))
    for res in results:
        torch.testing.assert_close(res["queue"], single["queue"], atol=1e-5, rtol=1e-4)
        assert torch.equal(res["index"], single["index"]) and torch.equal(res["ptr"], single["ptr"])
    assert int(single["ptr"]) == 16 % 16 and torch.equal(single["index"][:8], make_batch(b=8).idx)
    # method.md §6: the prototype negative set comes from the per-rank batch, not the global one
    protos = make_prototypes()
    for res in results:
        top = int(protos.im2cluster[0].max())
        want = set(res["labels"].tolist()) | set(range(top, 12))
        assert set(torch.arange(12)[res["excluded"]].tolist()) == want
    assert not torch.equal(results[0]["excluded"], results[1]["excluded"])
