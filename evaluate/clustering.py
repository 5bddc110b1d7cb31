"""Clustering evaluation (method.md §7.1 "Clustering", HIRL's ``eval_clustering.py`` procedure).

Val trunk features, L2-normalised, are clustered hierarchically with the same faiss procedure as
training (`cluster.hierarchy.hierarchical_kmeans`: level 1 over the images, sharded over ranks;
each upper level over the normalised centroids of the level below), and every level's image
assignment is scored against the labels: NMI, AMI, ARI, Hungarian accuracy, and purity.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cluster.features import SplitFeatures, gather_by_idx
from cluster.hierarchy import hierarchical_kmeans
from cluster.prototypes import Prototypes
from core import dist
from core.config import ClusterConfig
from evaluate.checks import ArgumentError
from evaluate.metrics import clustering_scores, purity

log = logging.getLogger(__name__)


def check_levels(num_clusters: list[int], num_samples: int) -> None:
    """Sizes must be strictly decreasing, >= 2, and the finest at most the number of samples."""
    typed = ",".join(str(k) for k in num_clusters)  # as the flag takes them
    if not num_clusters or any(k < 2 for k in num_clusters) or \
            any(a <= b for a, b in zip(num_clusters, num_clusters[1:], strict=False)):
        raise ArgumentError(f"--num-clusters {typed}: need sizes >= 2, strictly decreasing (fine to "
                            "coarse), e.g. 25000,1000")
    if num_clusters[0] > num_samples:
        raise ArgumentError(f"--num-clusters {typed}: {num_clusters[0]} clusters from {num_samples} samples; "
                            f"lower the finest level to {num_samples} or less")


def cluster_split(split: SplitFeatures, num_clusters: list[int], cfg: ClusterConfig) -> Prototypes:
    """Hierarchical k-means of a split's (normalised) features spread over ranks; collective."""
    check_levels(num_clusters, split.num_samples)
    feats = torch.nn.functional.normalize(split.feats, dim=1)
    # temperature only scales the concentrations, which evaluation does not use
    return hierarchical_kmeans(split.idx, feats, num_samples=split.num_samples, num_clusters=num_clusters,
                               cfg=cfg, temperature=0.2)


def split_labels(split: SplitFeatures) -> torch.Tensor:
    """Class id of every dataset index (num_samples,), on every rank."""
    return gather_by_idx(split.idx, split.cls, split.num_samples)


def score_levels(result: Prototypes, labels: np.ndarray) -> list[dict[str, float]]:
    """Per level (fine to coarse): clusters, nmi, ami, ari, acc, purity."""
    rows = []
    for level, assign in enumerate(result.im2cluster, start=1):
        clusters = assign.cpu().numpy()
        row = {"level": level, "clusters": int(result.centroids[level - 1].shape[0]),
               **clustering_scores(labels, clusters), "purity": purity(labels, clusters)}
        rows.append(row)
        log.info("level %d (%d clusters): NMI %.4f AMI %.4f ARI %.4f ACC %.4f purity %.4f", level,
                 row["clusters"], row["nmi"], row["ami"], row["ari"], row["acc"], row["purity"])
    return rows


def evaluate_clustering(split: SplitFeatures, num_clusters: list[int], cfg: ClusterConfig) -> list[dict]:
    """Cluster and score on rank 0; every rank returns the same rows."""
    result = cluster_split(split, num_clusters, cfg)
    labels = split_labels(split).cpu().numpy()
    rows = score_levels(result, labels) if dist.is_main() else None
    return dist.broadcast_object(rows)
