"""`Prototypes`: the result of one epoch's hierarchical clustering (docs/method.md §2.3), consumed by
`HCSC.forward`, saved with every checkpoint, and shown by `hcsc-eval report`. Identical,
bit for bit, on every rank."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

# The tensors a checkpoint stores, under the official code's names (docs/method.md §2.3) plus the
# raw centroids that `cluster.warm_start` starts the next epoch from.
_TENSOR_LISTS = ("im2cluster", "centroids", "density", "cluster2cluster", "logits", "raw_centroids")


@dataclass
class LevelStats:
    """What one level's clustering did (logged; not saved with checkpoints)."""

    level: int  # 1-based, fine to coarse
    clusters: int
    points: int  # rows clustered at this level (images at level 1, child centroids above)
    seconds: float  # k-means + assignment + concentration at this level
    objective: float  # kept restart's last-iteration objective (faiss iteration_stats[-1].obj)
    final_objective: float  # sum of squared distances to the returned centroids
    empty: int  # clusters with no member in the final assignment
    largest: int
    smallest: int
    nsplit: int  # empty-cluster splits during the kept restart
    iterations: int  # Lloyd iterations of the kept restart (stops early once converged)
    searched: float  # fraction of rank 0's row assignments in the kept restart that needed a search
    warm: bool  # initialised from the previous epoch's centroids


@dataclass
class Prototypes:
    """Hierarchical prototypes, levels ordered fine to coarse (L levels, sizes M_1 > ... > M_L).

    Attributes:
        im2cluster: L tensors, int64 (N,): cluster of every dataset index at level l
            (y^{l+1} = cluster2cluster[l][y^l]).
        centroids: L tensors, float32 (M_l, d), unit-norm rows (normalised after k-means).
        density: L tensors, float32 (M_l,): concentration phi of each prototype; mean is exactly
            the temperature at every level (docs/method.md §2.4).
        cluster2cluster: L-1 tensors, int64 (M_l,): parent at level l+1 of each level-l cluster.
        logits: L-1 tensors, float32 (M_l, M_{l+1}): cosine similarity C^l C^{l+1 T}.
        raw_centroids: L tensors, float32 (M_l, d): the un-normalised k-means centroids, the
            start of the next epoch's warm start; empty when not known (hand-made prototypes,
            checkpoints that predate them).
        stats: one `LevelStats` per level when these prototypes were just computed; empty after
            a checkpoint load.
    """

    im2cluster: list[torch.Tensor]
    centroids: list[torch.Tensor]
    density: list[torch.Tensor]
    cluster2cluster: list[torch.Tensor]
    logits: list[torch.Tensor]
    raw_centroids: list[torch.Tensor] = field(default_factory=list)
    stats: list[LevelStats] = field(default_factory=list)

    @property
    def num_levels(self) -> int:
        return len(self.centroids)

    def cluster_sizes(self) -> list[torch.Tensor]:
        """Images per cluster at every level: L int64 CPU tensors (M_l,)."""
        return [torch.bincount(a.cpu(), minlength=c.shape[0])
                for a, c in zip(self.im2cluster, self.centroids, strict=True)]

    def to(self, device: torch.device | str) -> Prototypes:
        moved = {name: [t.to(device) for t in getattr(self, name)] for name in _TENSOR_LISTS}
        return replace(self, **moved)

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """Plain tensors under fixed names (for `torch.save`; `stats` are not saved)."""
        return {name: getattr(self, name) for name in _TENSOR_LISTS}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Prototypes:
        """The inverse of `state_dict` (a state without ``raw_centroids`` gives an empty list)."""
        return cls(**{name: list(state.get(name, [])) for name in _TENSOR_LISTS})
