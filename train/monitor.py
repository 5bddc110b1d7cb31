"""Evaluation during and after training: the weighted kNN monitor (spec 7.1) and clustering NMI.

Trunk features (pooled, before the head, from the query encoder) of the train split form the kNN
bank, which stays split across ranks; the held-out split's features are gathered on every rank.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from evaluate.knn import knn_predict, topk_accuracy
from evaluate.metrics import clustering_scores
from pipeline import build_loader
from shards.format import split_info
from train import dist
from train.config import Config
from train.logging import progress

log = logging.getLogger(__name__)


@torch.no_grad()
def trunk_features(model, cfg: Config, split: str, *, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (features, labels) of `split`, every sample exactly once across ranks."""
    loader = build_loader(cfg.data, split=split, mode="eval", rank=dist.rank(), world=dist.world(),
                          epoch=epoch, seed=cfg.run.seed, device=dist.device())
    feats, labels = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in progress(loader, total=len(loader), desc=f"features {split}"):
            feats.append(model.backbone_features(batch.views[0], which="q").float())
            labels.append(batch.cls)
    finally:
        model.train(was_training)
        if hasattr(loader, "close"):
            loader.close()
    if not feats:
        dim = model.feat_dim  # trunk output width (2048 for ResNet-50)
        device = dist.device()
        return torch.empty(0, dim, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


def evaluate(model, cfg: Config, *, epoch: int, with_nmi: bool = False) -> dict[str, float]:
    """kNN top-1/top-5 of the val split against the train split (and NMI of k-means on val)."""
    split = cfg.data.val_split
    num_classes = len(split_info(cfg.data.shards, split)["class_names"])
    bank, bank_labels = trunk_features(model, cfg, cfg.data.train_split, epoch=epoch)
    val, val_labels = trunk_features(model, cfg, split, epoch=epoch)
    val, val_labels = dist.all_gather_cat(val), dist.all_gather_cat(val_labels)
    scores = knn_predict(bank, bank_labels, val, num_classes=num_classes, k=cfg.eval.knn_k,
                         temperature=cfg.eval.knn_t)
    result = {f"knn_{k}": v for k, v in topk_accuracy(scores, val_labels).items()}
    if with_nmi:
        result.update(_val_clustering(val, val_labels, num_classes, seed=cfg.run.seed))
    return result


def _val_clustering(feats: torch.Tensor, labels: torch.Tensor, k: int, seed: int) -> dict[str, float]:
    """faiss k-means (k = number of classes) of L2-normalised val trunk features, scored on rank 0
    and broadcast (all ranks hold the same gathered features)."""
    import faiss

    scores = None
    if dist.is_main():
        x = torch.nn.functional.normalize(feats, dim=1).cpu().numpy().astype(np.float32)
        km = faiss.Kmeans(x.shape[1], k, niter=20, nredo=5, seed=seed, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        found = clustering_scores(labels.cpu().numpy(), assign[:, 0])
        scores = {f"val_{name}": v for name, v in found.items()}
    return dist.broadcast_object(scores)
