"""The one batch type every loader backend yields."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A batch of augmented views with their dataset indices and labels.

    Attributes:
        views: list of float tensors, each (B, 3, H_v, W_v), normalised with the ImageNet mean
            and std, on the GPU when there is one. Train mode: 2 views (query, key) or 6 with
            multi-crop (query, key, local views); eval mode: 1 view (resize + center crop).
        idx: int64 (B,), global dataset index of each sample (the key into `im2cluster`).
        cls: int64 (B,), class id (for kNN monitors and metrics; never used by training).
    """

    views: list[torch.Tensor]
    idx: torch.Tensor
    cls: torch.Tensor

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch([v.to(device, non_blocking=non_blocking) for v in self.views],
                     self.idx.to(device, non_blocking=non_blocking),
                     self.cls.to(device, non_blocking=non_blocking))
