"""Evaluation during and after training: the weighted kNN monitor (method.md §7.1) and clustering NMI.

Trunk features (pooled, before the head, from the query encoder) of the train split form the kNN
bank, which stays split across ranks; the held-out split's features are gathered on every rank.
"""

from __future__ import annotations

import logging

import torch

from cluster.features import split_features
from cluster.kmeans import assign, kmeans
from core import dist
from core.config import Config
from evaluate.knn import knn_predict, topk_accuracy
from evaluate.metrics import clustering_scores
from shards.format import split_info

log = logging.getLogger(__name__)


def trunk_features(model, cfg: Config, split: str, *, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (features, labels) of `split`, every sample exactly once across ranks."""
    was_training = model.training
    model.eval()
    try:
        found = split_features(lambda x: model.backbone_features(x, which="q"), cfg.data, split,
                               epoch=epoch, seed=cfg.run.seed)
    finally:
        model.train(was_training)
    return found.feats, found.cls


def evaluate(model, cfg: Config, *, epoch: int, with_nmi: bool = False) -> dict[str, float]:
    """kNN top-1/top-5 of the val split against the train split (and NMI of k-means on val)."""
    split = cfg.data.val_split
    num_classes = split_info(cfg.data.shards, split).num_classes
    bank, bank_labels = trunk_features(model, cfg, cfg.data.train_split, epoch=epoch)
    val, val_labels = trunk_features(model, cfg, split, epoch=epoch)
    val, val_labels = dist.all_gather_cat(val), dist.all_gather_cat(val_labels)
    scores = knn_predict(bank, bank_labels, val, num_classes=num_classes, k=cfg.eval.knn_k,
                         temperature=cfg.eval.knn_t)
    result = {f"knn_{k}": v for k, v in topk_accuracy(scores, val_labels).items()}
    if with_nmi:
        result.update(_val_clustering(val, val_labels, num_classes, seed=cfg.run.seed,
                                      search=cfg.cluster.search))
    return result


def _val_clustering(feats: torch.Tensor, labels: torch.Tensor, k: int, seed: int,
                    search: str) -> dict[str, float]:
    """k-means (k = number of classes) of the L2-normalised val trunk features where they were
    computed (the GPU on a GPU run: `cluster.search` picks the search as in training), scored on
    rank 0 and broadcast (all ranks hold the same gathered features).

    The settings are `faiss.Kmeans`'s defaults, which this evaluation used before: 20 iterations, 5
    restarts, at most 256 rows per centroid (faiss subsamples above that), no warning below 1."""
    scores = None
    if dist.is_main():
        x = torch.nn.functional.normalize(feats.float(), dim=1)
        ids = torch.arange(x.shape[0], device=x.device)
        km = kmeans(x, ids, num_samples=x.shape[0], k=k, niter=20, nredo=5, seed=seed,
                    max_points_per_centroid=256, min_points_per_centroid=1, distributed=False, search=search)
        assignment, _ = assign(x, km.centroids, search)
        found = clustering_scores(labels.cpu().numpy(), assignment.cpu().numpy())
        scores = {f"val_{name}": v for name, v in found.items()}
    return dist.broadcast_object(scores)
