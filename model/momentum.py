"""The MoCo machinery around the losses: momentum update, shuffle-BN key forward, queue update.

Distributed only through `core.dist` (method.md §1; docs/architecture.md#packages). Everything
here runs without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core import dist


@torch.no_grad()
def momentum_update_(encoder_k: nn.Module, encoder_q: nn.Module, m: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q over parameters only (method.md §1: BN buffers of the key
    encoder evolve through its own train-mode forwards, they are not copied)."""
    params_k = [p.data for p in encoder_k.parameters()]
    params_q = [p.detach() for p in encoder_q.parameters()]
    if len(params_k) != len(params_q):
        raise ValueError(f"momentum update: encoder_k has {len(params_k)} parameters, "
                         f"encoder_q {len(params_q)}; they must be copies of one another")
    torch._foreach_mul_(params_k, m)
    torch._foreach_add_(params_k, params_q, alpha=1.0 - m)


@torch.no_grad()
def shuffled_keys(encoder_k: nn.Module, images: torch.Tensor, shuffle: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised keys of `images`, encoded with shuffle-BN across ranks (method.md §1, as MoCo).

    The key images of all ranks are gathered and permuted by a permutation drawn on rank 0 and
    broadcast; each rank encodes its slice (so its BN statistics mix samples of other ranks), the
    keys are gathered and un-shuffled. The gathered, un-shuffled keys are exactly what the queue
    update needs, so they are returned too (no second gather). With one rank, or `shuffle=False`,
    each rank encodes its own batch: on one rank a permutation of one BN batch changes nothing.

    Shape: images (B, 3, H, W) -> (local keys (B, d), keys of all ranks in rank order (world B, d)).
    """
    n_ranks = dist.world()
    if not shuffle or n_ranks == 1:
        keys = F.normalize(encoder_k(images), dim=1)
        return keys, dist.all_gather_equal(keys)
    b = images.shape[0]
    everyone = dist.all_gather_equal(images)
    perm = dist.broadcast_(torch.randperm(everyone.shape[0], device=images.device), src=0)
    mine = perm[dist.rank() * b:(dist.rank() + 1) * b]
    keys_shuffled = dist.all_gather_equal(F.normalize(encoder_k(everyone[mine]), dim=1))
    keys_all = torch.empty_like(keys_shuffled).index_copy_(0, perm, keys_shuffled)  # un-shuffle
    return keys_all[dist.rank() * b:(dist.rank() + 1) * b], keys_all


@torch.no_grad()
def enqueue_(queue: torch.Tensor, queue_ptr: torch.Tensor, queue_index: torch.Tensor,
             keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Write the gathered keys and their dataset indices at the pointer; advance it modulo K.

    Columns are computed on the device, (ptr + arange(n)) mod K, so no host sync is needed.
    K must be a multiple of the global batch n (asserted by the official code; method.md §1).

    Shape: queue (d, K), queue_ptr (1,) int64, queue_index (K,) int64, keys (n, d), idx (n,).
    Returns the (n,) column indices written.
    """
    n, size = keys.shape[0], queue.shape[1]
    if size % n != 0:
        raise ValueError(f"model.queue_size: {size} is not divisible by the global batch {n}; "
                         "pick a queue size that is a multiple of batch_size x world")
    cols = (queue_ptr + torch.arange(n, device=queue.device)) % size
    queue.index_copy_(1, cols, keys.t().to(queue.dtype))
    queue_index.index_copy_(0, cols, idx.to(queue_index.dtype))
    queue_ptr.add_(n).remainder_(size)
    return cols
