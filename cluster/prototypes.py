"""`Prototypes`: the result of one epoch's hierarchical clustering (spec 2.3), consumed by
`HCSC.forward_backward`. Identical, bit for bit, on every rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prototypes:
    """Hierarchical prototypes, levels ordered fine to coarse (L levels, sizes M_1 > ... > M_L).

    Attributes:
        im2cluster: L tensors, int64 (N,): cluster of every dataset index at level l
            (y^{l+1} = cluster2cluster[l][y^l]).
        centroids: L tensors, float32 (M_l, d), unit-norm rows (normalised after k-means).
        density: L tensors, float32 (M_l,): concentration phi of each prototype; mean is exactly
            the temperature at every level (spec 2.4).
        cluster2cluster: L-1 tensors, int64 (M_l,): parent at level l+1 of each level-l cluster.
        logits: L-1 tensors, float32 (M_l, M_{l+1}): cosine similarity C^l C^{l+1 T}.
    """

    im2cluster: list[torch.Tensor]
    centroids: list[torch.Tensor]
    density: list[torch.Tensor]
    cluster2cluster: list[torch.Tensor]
    logits: list[torch.Tensor]

    @property
    def num_levels(self) -> int:
        return len(self.centroids)

    def to(self, device: torch.device | str) -> Prototypes:
        def move(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device) for t in ts]

        return Prototypes(move(self.im2cluster), move(self.centroids), move(self.density),
                          move(self.cluster2cluster), move(self.logits))

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """Plain tensors under the official key names (spec 2.3), e.g. for `torch.save`."""
        return {"im2cluster": self.im2cluster, "centroids": self.centroids,
                "density": self.density, "cluster2cluster": self.cluster2cluster,
                "logits": self.logits}
