"""One HCSC step's logits and masks (`StepLogits`, what the losses reduce), and what the step did,
level by level (`step_metrics`): the numbers a researcher reads to see whether the hierarchy and
the selection behave (the official code logs `InsLoss_k`, `Acc@Inst_k`, `Acc@Proto`).

The metrics are computed from the step's logits and masks without gradients, as 0-dim tensors on
the step's device: nothing here synchronises with the host, and `HCSC.forward` computes them only
on the steps the trainer logs. Names are ``<name>/l<level>`` with level 1 the finest:

  loss_inst/l, acc_inst/l    instance InfoNCE and top-1 (%) of the positive among the level's
                             masked logits; summed over levels they give `loss_inst` (its mean
                             with `hcsc.average_instance_loss`), docs/method.md §5.1
  loss_proto/l, acc_proto/l  prototype InfoNCE and top-1 (%) of the own prototype; their mean
                             over levels is `loss_proto`
  kept_inst/l                fraction of the queue's negatives ICSC keeps (1 with selection off)
  kept_proto/l               fraction of the candidate prototype negatives PCSC keeps (1 at the top
                             level, which is never selected, and with selection off)
  loss_local_inst/l, loss_local_proto/l   the local-crop terms, summed over the local views (only
                             with multi-crop)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model import losses


@dataclass
class StepLogits:
    """Every logit matrix and mask of one step, levels fine to coarse: what the losses reduce.

    Layouts as in `model.losses`. `inst_masks[l]` (B, K) bool; `proto_masks[l]` (B, M_l) bool or
    None (top level or `proto_selection` off); `proto_excluded[l]` (M_l,) bool; `labels[l]` (B,)
    the batch's clusters at level l.
    """

    labels: list[torch.Tensor] = field(default_factory=list)
    inst_logits: list[torch.Tensor] = field(default_factory=list)
    inst_masks: list[torch.Tensor] = field(default_factory=list)
    proto_logits: list[torch.Tensor] = field(default_factory=list)
    proto_masks: list[torch.Tensor | None] = field(default_factory=list)
    proto_excluded: list[torch.Tensor] = field(default_factory=list)
    local_inst_logits: list[torch.Tensor] = field(default_factory=list)  # view-major, then level
    local_proto_logits: list[list[torch.Tensor]] = field(default_factory=list)  # [view][level]
    local_proto_masks: list[list[torch.Tensor | None]] = field(default_factory=list)


@dataclass
class StepRecord(StepLogits):
    """A detached copy of one step for inspection (`HCSC.step_observer`): its logits and masks,
    plus `q`, `local_q`, `k` (normalised) and `queue` (before the enqueue), from which every logit
    can be recomputed."""

    q: torch.Tensor | None = None
    local_q: list[torch.Tensor] = field(default_factory=list)
    k: torch.Tensor | None = None
    queue: torch.Tensor | None = None


@torch.no_grad()
def step_metrics(terms: StepLogits, num_levels: int, num_local_views: int) -> dict[str, torch.Tensor]:
    """Per-level metrics of one HCSC step (not of the warm-up's plain MoCo step)."""
    out: dict[str, torch.Tensor] = {}
    for lvl, logits in enumerate(terms.inst_logits, start=1):
        out[f"loss_inst/l{lvl}"] = losses.info_nce(logits)
        out[f"acc_inst/l{lvl}"] = losses.top1_accuracy(logits)
    for lvl, logits in enumerate(terms.proto_logits, start=1):
        out[f"loss_proto/l{lvl}"] = losses.info_nce(logits)
        out[f"acc_proto/l{lvl}"] = losses.top1_accuracy(logits)
    one = terms.proto_logits[0].new_ones(())
    for lvl in range(1, num_levels + 1):
        masks = terms.inst_masks
        out[f"kept_inst/l{lvl}"] = masks[lvl - 1].float().mean() if masks else one
        keep, excluded = terms.proto_masks[lvl - 1], terms.proto_excluded[lvl - 1]
        out[f"kept_proto/l{lvl}"] = one if keep is None else _kept_candidates(keep, excluded)
    if num_local_views:
        per_view = len(terms.local_inst_logits) // num_local_views
        for lvl in range(per_view):
            views = terms.local_inst_logits[lvl::per_view]
            out[f"loss_local_inst/l{lvl + 1}"] = torch.stack([losses.info_nce(x) for x in views]).sum()
        for lvl in range(num_levels):
            views = [v[lvl] for v in terms.local_proto_logits]
            out[f"loss_local_proto/l{lvl + 1}"] = torch.stack([losses.info_nce(x) for x in views]).sum()
    return out


def _kept_candidates(keep: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Fraction of the (row, candidate prototype) pairs kept; excluded columns are no candidates.

    Shape: keep (B, M) bool, excluded (M,) bool -> ().
    """
    candidates = ~excluded
    kept = (keep & candidates[None, :]).sum()
    return kept.float() / (candidates.sum() * keep.shape[0]).clamp(min=1).float()
