"""Logit builders of ICSC (method.md §3) and PCSC (method.md §4), and the InfoNCE cross-entropy.

Column layouts (target index 0 everywhere):

- Instance logits (B, 1+K): ``[z.k, s_1 (z.q_1), ..., s_K (z.q_K)] / T`` (docs/method.md §3).
- Prototype logits (B, 1+M_l): column 0 is ``z.c_y / phi_y`` (the query's own positive), column
  ``1+m`` is prototype m (ids in order 0..M_l-1). Method §4 has the layout ``[pos, N_l...]`` with the
  data-dependent candidate set N_l (method.md §4); here every prototype keeps its column and the ones
  outside N_l (every positive of the per-rank batch, and the ids the official ``range(max(y))``
  leaves out) are ``-inf``. exp(-inf) = 0, so they add nothing to the softmax denominator and get
  zero gradient: the cross-entropy equals that layout's exactly, with a static shape and no
  host sync. `compact_proto_logits` recovers that layout (for tests and inspection).

Dropped negatives (mask False) are different from excluded columns: as in the official code they
become logit exactly 0 and still count exp(0) = 1 in the denominator (method.md §3, 4, 9.7), unless
`remove_dropped` (the `hcsc.remove_dropped_negatives` flag) turns them into -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def _drop(values: torch.Tensor, keep: torch.Tensor | None, remove_dropped: bool) -> torch.Tensor:
    if keep is None:
        return values
    return torch.where(keep, values, NEG_INF if remove_dropped else 0.0)


def instance_logits(l_pos: torch.Tensor, l_neg: torch.Tensor, keep: torch.Tensor | None,
                    temperature: float, remove_dropped: bool = False) -> torch.Tensor:
    """``cat([l_pos, keep * l_neg]) / T`` (method.md §3): the mask multiplies the cosine, before /T.

    `keep` may carry a leading level axis, giving every level's logits in one pass.

    Shape: l_pos (B, 1) z.k, l_neg (B, K) z.Q, keep (B, K) or (L, B, K) bool or None (= all kept)
    -> (B, 1+K) or (L, B, 1+K).
    """
    neg = _drop(l_neg, keep, remove_dropped)
    return torch.cat([l_pos.expand(*neg.shape[:-1], 1), neg], dim=-1) / temperature


def excluded_prototypes(batch_labels: torch.Tensor, num_protos: int, max_label: torch.Tensor,
                        fix_last: bool = False) -> torch.Tensor:
    """Boolean (M,) mask of the prototypes that are NOT candidate negatives at this level (method.md §4).

    Candidates: N_l = {0, ..., max(y^l) - 1} minus every label of the per-rank batch, with max(y^l)
    taken over the whole dataset's `im2cluster[l]` (`max_label`). The official ``range(max)`` skips
    the id max(y^l) (PCL issue #20); `fix_last` uses ``range(max + 1)``, PCL's fix.

    Shape: batch_labels (B,) int64, max_label 0-dim int64 -> (M,) bool.
    """
    ids = torch.arange(num_protos, device=batch_labels.device)
    excluded = ids > max_label if fix_last else ids >= max_label
    return excluded.index_fill(0, batch_labels, True)


def proto_logits(z: torch.Tensor, centroids: torch.Tensor, density: torch.Tensor, labels: torch.Tensor,
                 excluded: torch.Tensor, keep: torch.Tensor | None,
                 remove_dropped: bool = False) -> torch.Tensor:
    """``[z.c_y / phi_y, {t_j (z.c_j) / phi_j}_j]`` over all M prototypes, excluded columns -inf.

    Each column is divided by its own prototype's concentration (method.md §4); prototypes, phi and the
    masks are constants, gradients reach only z.

    Shape: z (B, d), centroids (M, d), density (M,), labels (B,) int64, excluded (M,) bool,
    keep (B, M) bool or None -> (B, 1+M).
    """
    sims = z @ centroids.t()  # (B, M): z_i . c_m
    pos = sims.gather(1, labels[:, None]) / density[labels][:, None]  # (B, 1)
    neg = _drop(sims, keep, remove_dropped) / density[None, :]
    neg = neg.masked_fill(excluded[None, :], NEG_INF)
    return torch.cat([pos, neg], dim=1)


def compact_proto_logits(logits: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """The (B, 1+|N_l|) layout of docs/method.md §4, ``[pos, N_l in increasing id]``, from
    `proto_logits`' layout.

    Boolean indexing with a data-dependent width: for tests and inspection, not the step.
    """
    return logits[:, torch.cat([excluded.new_ones(1), ~excluded])]


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with target 0 for every row, averaged over the batch. Shape: (B, C) -> ()."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def info_nce_levels(logits: torch.Tensor) -> torch.Tensor:
    """`info_nce` of every level in one call. Shape: (L, B, C) -> (L,)."""
    n_levels, batch = logits.shape[:2]
    target = torch.zeros(n_levels * batch, dtype=torch.long, device=logits.device)
    per_row = F.cross_entropy(logits.flatten(0, 1), target, reduction="none")
    return per_row.view(n_levels, batch).mean(dim=1)


def top1_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Percentage of rows whose largest logit is column 0 (the positive), as a 0-dim tensor."""
    return (logits.argmax(dim=1) == 0).float().mean() * 100.0
