"""The evaluation commands behind `hcsc-eval` (kNN, linear, cluster), callable from Python too.

Each runs on every rank under torchrun (features sharded, results identical everywhere) and in a
single process without a launcher; each returns a JSON-able dict of results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cluster.features import gather_by_idx, split_features
from core import dist
from core.config import ClusterConfig
from core.files import write_json_atomic
from evaluate.checkpoints import load_backbone
from evaluate.checks import ArgumentError
from evaluate.clustering import check_levels, evaluate_clustering
from evaluate.data import data_config
from evaluate.knn import knn_predict_many, topk_accuracy
from evaluate.linear import LinearConfig, accuracy_counts, make_classifier, train_linear
from pipeline import build_loader
from shards.format import split_info

log = logging.getLogger(__name__)


def _trunk(checkpoint: str, encoder: str | None) -> tuple[torch.nn.Module, int]:
    trunk, feat_dim = load_backbone(checkpoint, encoder)
    return trunk.to(dist.device()), feat_dim


def run_knn(*, checkpoint: str, train_shards: str, val_shards: str, train_split: str = "train",
            val_split: str = "val", ks: list[int], temperature: float = 0.07, encoder: str | None = None,
            seed: int = 0, **loader: Any) -> dict:
    """Weighted kNN (method.md §7.1): top-1/top-5 of `val_split` against the `train_split` bank, per k.

    The bank stays split over ranks; the queries are gathered on every rank.
    """
    num_classes = split_info(train_shards, train_split).num_classes  # both splits exist before any work
    split_info(val_shards, val_split)
    train_cfg, val_cfg = data_config(train_shards, **loader), data_config(val_shards, **loader)
    trunk, _ = _trunk(checkpoint, encoder)
    bank = split_features(trunk, train_cfg, train_split, seed=seed)
    val = split_features(trunk, val_cfg, val_split, seed=seed)
    queries = gather_by_idx(val.idx, val.feats, val.num_samples)
    labels = gather_by_idx(val.idx, val.cls, val.num_samples)
    scores = knn_predict_many(bank.feats, bank.cls, queries, num_classes=num_classes,
                              ks=ks, temperature=temperature)
    result = {"command": "knn", "checkpoint": str(checkpoint), "temperature": temperature,
              "interpolation": loader.get("interpolation", "bilinear"),
              "bank": bank.num_samples, "queries": val.num_samples, "num_classes": num_classes,
              "knn": {str(k): topk_accuracy(s, labels) for k, s in scores.items()}}
    for k, acc in result["knn"].items():
        log.info("%s-NN (T=%g): top-1 %.2f top-5 %.2f", k, temperature, acc["top1"], acc["top5"])
    return result


def run_cluster(*, checkpoint: str, shards: str, split: str = "val", num_clusters: list[int],
                niter: int = 20, nredo: int = 5, encoder: str | None = None, seed: int = 0,
                **loader: Any) -> dict:
    """Hierarchical k-means of the split's normalised trunk features, scored per level."""
    check_levels(num_clusters, split_info(shards, split).num_samples)  # before any feature work
    data, cfg = data_config(shards, **loader), ClusterConfig(niter=niter, nredo=nredo)
    trunk, _ = _trunk(checkpoint, encoder)
    feats = split_features(trunk, data, split, seed=seed, normalize=True)
    rows = evaluate_clustering(feats, num_clusters, cfg)
    return {"command": "cluster", "checkpoint": str(checkpoint), "split": split,
            "interpolation": loader.get("interpolation", "bilinear"),
            "num_samples": feats.num_samples, "num_classes": len(feats.class_names), "levels": rows}


def run_linear(*, checkpoint: str, train_shards: str, val_shards: str, out: str, train_split: str = "train",
               val_split: str = "val", protocol: LinearConfig, global_batch: int = 256,
               encoder: str | None = None, seed: int = 0, **loader: Any) -> dict:
    """Linear probe (method.md §7.1) with the train augmentation of `build_loader(mode="linear")`."""
    world = dist.world()
    if global_batch % world:
        raise ArgumentError(f"--batch-size {global_batch} (global) is not divisible by {world} ranks; pass a "
                            "multiple of the number of processes")
    num_classes = split_info(train_shards, train_split).num_classes  # both splits exist before any work
    split_info(val_shards, val_split)
    eval_cfg = data_config(val_shards, **loader)
    train_cfg = data_config(train_shards, **{**loader, "batch_size": global_batch // world})
    trunk, feat_dim = _trunk(checkpoint, encoder)
    val = split_features(trunk, eval_cfg, val_split, seed=seed)  # frozen trunk: val features once

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = build_loader(train_cfg, split=train_split, mode="linear", rank=dist.rank(), world=world,
                            epoch=epoch, seed=seed, device=dist.device())
        try:
            for batch in data:
                with torch.no_grad():
                    feats = trunk(batch.views[0]).float()
                yield feats, batch.cls.to(feats.device, torch.int64)
        finally:
            data.close()

    torch.manual_seed(seed)
    classifier = make_classifier(feat_dim, num_classes).to(dist.device())
    for p in classifier.parameters():  # identical start on every rank, whatever each RNG did before
        dist.broadcast_(p.data)
    result = train_linear(classifier, batches, lambda fc: accuracy_counts(fc, val.feats, val.cls),
                          protocol, out_dir=out)
    summary = {"command": "linear", "checkpoint": str(checkpoint), "best_top1": result.best_top1,
               "best_epoch": result.best_epoch, "last_top1": result.last_top1, "last_top5": result.last_top5,
               "epochs": protocol.epochs, "global_batch": global_batch}
    if dist.is_main():
        write_json_atomic(Path(out) / "linear_result.json", {**summary, "history": result.history})
    return summary
