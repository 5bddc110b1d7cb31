"""Weighted kNN (method.md §7.1) against a naive loop and a planted answer; clustering metrics by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluate.knn import knn_predict, topk_accuracy
from evaluate.metrics import clustering_scores, hungarian_accuracy


def _naive_knn(bank, labels, queries, num_classes, k, t):
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    out = torch.zeros(len(queries), num_classes)
    for i, q in enumerate(queries):
        sims = [(float(q @ b), int(c)) for b, c in zip(bank, labels, strict=True)]
        for s, c in sorted(sims, reverse=True)[:k]:
            out[i, c] += np.exp(s / t)
    return out


def _planted(n_per_class=40, classes=5, dim=16, seed=0):
    centers = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)), dim=1) * 3
    g = torch.Generator().manual_seed(seed)  # the same centers for bank and queries, new noise
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centers[labels] + 0.3 * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_knn_matches_naive_loop():
    bank, labels = _planted()
    queries, _ = _planted(n_per_class=3, seed=1)
    scores = knn_predict(bank, labels, queries, num_classes=5, k=7, temperature=0.07)
    torch.testing.assert_close(scores, _naive_knn(bank, labels, queries, 5, 7, 0.07), rtol=1e-4, atol=1e-3)


def test_knn_recovers_planted_classes():
    bank, labels = _planted()
    queries, qlabels = _planted(n_per_class=10, seed=2)
    scores = knn_predict(bank, labels, queries, num_classes=5, k=20, temperature=0.07)
    assert topk_accuracy(scores, qlabels)["top1"] == 100.0


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 1, 0]), ks=(1, 2))
    assert acc["top1"] == pytest.approx(100 / 3) and acc["top2"] == pytest.approx(200 / 3)


def _split_bank_knn(bank, labels, queries):
    from core import dist

    part = torch.tensor_split(torch.arange(len(bank)), dist.world())[dist.rank()]
    return knn_predict(bank[part], labels[part], queries, num_classes=5, k=7, temperature=0.07)


@pytest.mark.dist
@pytest.mark.parametrize("per_class", [40, 2])  # 2: each rank holds fewer than k rows (padding)
def test_bank_split_over_ranks_equals_one_process(dist_run, per_class):
    bank, labels = _planted(n_per_class=per_class)
    queries, _ = _planted(n_per_class=3, seed=1)
    expected = knn_predict(bank, labels, queries, num_classes=5, k=7, temperature=0.07)
    for scores in dist_run(_split_bank_knn, 3, bank, labels, queries):
        torch.testing.assert_close(scores, expected)


def test_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.array([5, 5, 3, 3, 9, 9])
    assert clustering_scores(labels, perfect) == pytest.approx(
        {"nmi": 1.0, "ami": 1.0, "ari": 1.0, "acc": 1.0})
    # clusters {0,0,1} {1,2,2}: best mapping gets 2 + 2 of 6 right.
    assert hungarian_accuracy(labels, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(4 / 6)
    # one cluster: no information at all.
    assert clustering_scores(labels, np.zeros(6, int))["nmi"] == pytest.approx(0.0)
