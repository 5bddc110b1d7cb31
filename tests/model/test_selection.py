"""Keep probabilities, mask sampling and the selection cache against brute-force loops
(method.md §3, 4, 10.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import selection
from tests.model._helpers import T, make_prototypes


def _instance_prob_loop(queue, cents, dens, labels):
    """p_ij = clip(1 - softmax_m(q_j . c_m / max(phi_m, 1e-3))[y_i], 0, 0.999), one entry at a time."""
    B, K, M = labels.shape[0], queue.shape[1], cents.shape[0]
    out = torch.empty(B, K, dtype=torch.float64)
    for i in range(B):
        for j in range(K):
            s = [float(queue[:, j] @ cents[m]) / max(float(dens[m]), 1e-3) for m in range(M)]
            top = max(s)
            p = math.exp(s[int(labels[i])] - top) / sum(math.exp(v - top) for v in s)
            out[i, j] = min(max(1.0 - p, 0.0), 0.999)
    return out


def _keep_prob_one_level(queue, centroids, density, labels, log_norm=None):
    """`instance_keep_prob_levels` for a single level (its normaliser computed when not given)."""
    if log_norm is None:
        log_norm = selection.queue_log_normalizer(queue, centroids, density)
    return selection.instance_keep_prob_levels(queue, [centroids], [density], [labels], log_norm[None])[0]


def test_instance_keep_prob_matches_brute_force_and_clip():
    g = torch.Generator().manual_seed(1)
    queue = F.normalize(torch.randn(8, 20, generator=g), dim=0)
    cents = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    dens = torch.rand(12, generator=g) * 0.3 + 0.02
    dens[3] = 1e-6  # below the 1e-3 clamp of method.md §3
    queue[:, 0] = cents[3]  # a key on prototype 3 (phi clamped to 1e-3): P(3 | q_0) ~ 1, the rest ~ 0
    labels = torch.tensor([5, 3, 0, 11])
    got = _keep_prob_one_level(queue, cents, dens, labels)
    want = _instance_prob_loop(queue, cents, dens, labels)
    assert got.shape == (4, 20)
    # fp32 maths on logits up to 1/1e-3 = 1000: a few 1e-6 of rounding, as in the official fp32 softmax
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    assert got.min() >= 0 and got.max() <= 0.999
    assert got[1, 0] == 0.0  # query of cluster 3: that key is dropped surely (lower clip 0)
    assert got[0, 0] == pytest.approx(0.999)  # another cluster: kept with the upper clip
    cached = selection.queue_log_normalizer(queue, cents, dens)
    torch.testing.assert_close(_keep_prob_one_level(queue, cents, dens, labels, cached), got)


def test_all_levels_at_once_equal_level_by_level():
    protos = make_prototypes()
    queue = F.normalize(torch.randn(16, 24), dim=0)
    labels = [y[:5] for y in protos.im2cluster]
    norms = torch.stack([selection.queue_log_normalizer(queue, c, d)
                         for c, d in zip(protos.centroids, protos.density, strict=True)])
    stacked = selection.instance_keep_prob_levels(queue, protos.centroids, protos.density, labels, norms)
    assert stacked.shape == (3, 5, 24)
    for lvl in range(3):
        one = _keep_prob_one_level(queue, protos.centroids[lvl], protos.density[lvl], labels[lvl])
        torch.testing.assert_close(stacked[lvl], one)


def test_proto_keep_prob_matches_brute_force_and_clip():
    protos = make_prototypes()
    for lvl in range(protos.num_levels - 1):
        a, phi_up = protos.logits[lvl], protos.density[lvl + 1]
        labels = torch.tensor([0, 4, 2, 1, 4])[: a.shape[0]] % a.shape[0]
        parents = protos.cluster2cluster[lvl][labels]
        got = selection.proto_keep_prob(selection.parent_assignment(a, phi_up, T), parents)
        want = torch.empty_like(got, dtype=torch.float64)
        for i in range(labels.shape[0]):
            for j in range(a.shape[0]):
                s = [float(a[j, u]) / float(phi_up[u]) for u in range(a.shape[1])]
                p = math.exp(s[int(parents[i])]) / sum(math.exp(v) for v in s)
                want[i, j] = min(max(1.0 - p, 1e-4), 0.999)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
        assert got.min() >= 1e-4 and got.max() <= 0.999


def test_proto_keep_prob_lower_clip_is_reached():
    a = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # each child sits on one parent with phi 0.01
    prob = selection.proto_keep_prob(selection.parent_assignment(a, torch.tensor([0.01, 0.01]), 0.01),
                                     torch.tensor([0, 1]))
    assert prob[0, 0] == pytest.approx(1e-4) and prob[0, 1] == pytest.approx(0.999)


def test_sample_mask_frequency_and_determinism():
    prob = torch.tensor([0.0, 0.3, 0.999]).repeat(40000, 1)
    mask = selection.sample_mask(prob, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool
    assert not mask[:, 0].any()
    freq = mask.float().mean(0)
    assert abs(freq[1] - 0.3) < 0.01 and abs(freq[2] - 0.999) < 0.002
    again = selection.sample_mask(prob, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_cache_follows_enqueues_new_prototypes_and_external_writes():
    protos = make_prototypes()
    queue = F.normalize(torch.randn(16, 24), dim=0)
    cache = selection.SelectionCache()
    cache.refresh(queue, protos, T)
    for step in range(3):  # incremental updates after in-place enqueues
        before = selection.version_of(queue)
        cols = torch.arange(8) + 8 * step
        keys = F.normalize(torch.randn(8, 16), dim=1)
        queue.index_copy_(1, cols, keys.t())
        cache.advance(queue, before, cols, keys)
        cache.refresh(queue, protos, T)
        for lvl in range(3):
            fresh = selection.queue_log_normalizer(queue, protos.centroids[lvl], protos.density[lvl])
            torch.testing.assert_close(cache.log_norm(lvl), fresh)
    queue.mul_(-1)  # an external write (e.g. a checkpoint load) makes the cache stale
    cache.refresh(queue, protos, T)
    fresh = selection.queue_log_normalizer(queue, protos.centroids[0], protos.density[0])
    torch.testing.assert_close(cache.log_norm(0), fresh)
    other = make_prototypes(seed=5)  # next epoch's clustering
    cache.refresh(queue, other, T)
    torch.testing.assert_close(cache.log_norm(1), selection.queue_log_normalizer(
        queue, other.centroids[1], other.density[1]))
    torch.testing.assert_close(cache.parent_prob(0), selection.parent_assignment(
        other.logits[0], other.density[1], T))
    assert int(cache.max_label(2)) == int(other.im2cluster[2].max())
