"""Weighted k-nearest-neighbour classification (method.md §7.1, DINO-style voting).

Each of the k nearest bank samples (cosine similarity s) votes for its class with weight exp(s / T).
The bank may be split across ranks: each rank finds the top-k among its own rows, and the candidates
are merged, so no rank ever holds the whole bank (ImageNet: 1.28M x 2048 floats).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core import dist


@torch.no_grad()
def local_topk(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
               chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities of `queries` (Q, d) against `bank` (n, d), both L2-normalised.

    Returns (similarities (Q, k'), labels (Q, k')) with k' = min(k, n); rows sorted descending.
    """
    k_eff = min(k, bank.shape[0])
    sims, labels = [], []
    for start in range(0, queries.shape[0], chunk):
        s = queries[start:start + chunk] @ bank.T  # (q, n)
        top, where = s.topk(k_eff, dim=1)
        sims.append(top)
        labels.append(bank_labels[where])
    return torch.cat(sims), torch.cat(labels)


@torch.no_grad()
def merged_topk(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar bank rows of every query over all ranks (collective).

    Every rank must pass the same `queries`; each passes its own part of the bank (possibly empty).
    Returns (similarities (Q, k), labels (Q, k)), sorted descending; missing rows are -inf.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    sims, labels = local_topk(bank, bank_labels, queries, k)
    pad = k - sims.shape[1]  # fewer than k local rows (or none): pad so every rank sends (Q, k)
    if pad:
        sims = torch.cat([sims, sims.new_full((sims.shape[0], pad), float("-inf"))], dim=1)
        labels = torch.cat([labels, labels.new_zeros((labels.shape[0], pad))], dim=1)
    # Merge candidates from every rank: (world * Q, k) -> (Q, world * k) -> top-k again.
    q = queries.shape[0]
    all_sims = dist.all_gather_equal(sims).reshape(-1, q, k).permute(1, 0, 2).reshape(q, -1)
    all_labels = dist.all_gather_equal(labels).reshape(-1, q, k).permute(1, 0, 2).reshape(q, -1)
    top, where = all_sims.topk(k, dim=1)
    return top, all_labels.gather(1, where)


def _vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    votes = torch.exp(sims / temperature)  # exp(-inf) = 0: padding never votes
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=votes.dtype)
    return scores.scatter_add_(1, labels, votes)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *,
                num_classes: int, k: int, temperature: float) -> torch.Tensor:
    """Class scores (Q, C) of every query; the bank rows may be spread over ranks (collective).

    Every rank must pass the same `queries`; each passes its own part of the bank (possibly empty).
    """
    sims, labels = merged_topk(bank, bank_labels, queries, k)
    return _vote(sims, labels, num_classes, temperature)


@torch.no_grad()
def knn_predict_many(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *,
                     num_classes: int, ks: list[int], temperature: float,
                     chunk: int = 8192) -> dict[int, torch.Tensor]:
    """`knn_predict` for several k at once: one search for max(ks), each k votes with the prefix of
    the sorted neighbours (the top-k of the top-K). Queries go in chunks of `chunk` to bound the
    gathered candidate tensors. Returns {k: scores (Q, C)}."""
    kmax = max(ks)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, max(queries.shape[0], 1), chunk):
        sims, labels = merged_topk(bank, bank_labels, queries[start:start + chunk], kmax)
        for k in ks:
            out[k].append(_vote(sims[:, :k], labels[:, :k], num_classes, temperature))
    return {k: torch.cat(v) for k, v in out.items()}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent, e.g. {"top1": 61.2, "top5": 82.0}."""
    out = {}
    for kk in ks:
        kk_eff = min(kk, scores.shape[1])
        hit = (scores.topk(kk_eff, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{kk}"] = 100.0 * hit.float().mean().item()
    return out
