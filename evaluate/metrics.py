"""Clustering metrics against labels (method.md §7.1 "Clustering"): NMI, AMI, ARI (scikit-learn) and
Hungarian accuracy (scipy's linear_sum_assignment on the contingency table)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics


def hungarian_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Best one-to-one mapping of clusters to classes; accuracy in [0, 1]."""
    contingency = metrics.cluster.contingency_matrix(labels, clusters)
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    return float(contingency[rows, cols].sum() / len(labels))


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    return {"nmi": float(metrics.normalized_mutual_info_score(labels, clusters)),
            "ami": float(metrics.adjusted_mutual_info_score(labels, clusters)),
            "ari": float(metrics.adjusted_rand_score(labels, clusters)),
            "acc": hungarian_accuracy(labels, clusters)}


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of samples whose cluster's majority class is their own class, in [0, 1]."""
    contingency = metrics.cluster.contingency_matrix(np.asarray(labels), np.asarray(clusters))
    return float(contingency.max(axis=0).sum() / contingency.sum())
