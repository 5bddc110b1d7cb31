"""The MoCo v2 projection head (method.md §1), built so its keys match the official `fc.0.*` / `fc.2.*`."""

from __future__ import annotations

from torch import nn


def build_head(feat_dim: int, dim: int, mlp: bool = True) -> nn.Module:
    """Projection head put in the trunk's `fc` slot; the caller L2-normalises its output.

    `mlp=True`: Linear(feat_dim, feat_dim) -> ReLU -> Linear(feat_dim, dim), no BatchNorm (method.md §1;
    2048 -> 2048 -> 128 for resnet50). `mlp=False`: one Linear(feat_dim, dim). A plain
    `nn.Sequential` keeps the state-dict keys `fc.0.weight`, `fc.2.weight` of the official code.

    Shape: (B, feat_dim) -> (B, dim).
    """
    if feat_dim < 1 or dim < 1:
        raise ValueError(f"head: feat_dim and dim must be >= 1, got {feat_dim}, {dim}")
    if not mlp:
        return nn.Linear(feat_dim, dim)
    return nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, dim))
