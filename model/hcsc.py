"""`HCSC`: the method in one module (method.md §1, 3, 4, 5.1). `forward` is one training step's maths.

Step order (method.md §6.4): queries -> momentum update -> shuffle-BN keys -> PCSC -> ICSC -> local terms
-> enqueue of the gathered keys of view 2. Selection is vectorised: boolean masks, no Python sets,
no `.item()`; the only collectives are the shuffle-BN and queue gathers (`model.momentum`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from cluster.prototypes import Prototypes
from core import dist
from core.config import HCSCConfig, ModelConfig
from model import losses, selection
from model.encoders import create_encoder, pooled_features
from model.heads import build_head
from model.momentum import enqueue_, momentum_update_, shuffled_keys
from model.step_terms import StepLogits, StepRecord, step_metrics
from pipeline.batch import Batch

MaskSampler = Callable[[torch.Tensor], torch.Tensor]


class HCSC(nn.Module):
    """Query encoder + head, momentum encoder, queue; the HCSC losses (official-code semantics).

    Args:
        model_cfg: encoder, dim, queue size, momentum, temperature, head, shuffle-BN.
        hcsc_cfg: levels, warm-up, selection switches and the deviation flags.
        multi_crop: batches carry 2 global + local views (method.md §5.1).
    """

    # registered buffers (`register_buffer` in `__init__`)
    queue: torch.Tensor
    queue_ptr: torch.Tensor
    queue_index: torch.Tensor

    def __init__(self, model_cfg: ModelConfig, hcsc_cfg: HCSCConfig, *, multi_crop: bool = False) -> None:
        super().__init__()
        self.model_cfg, self.hcsc_cfg, self.multi_crop = model_cfg, hcsc_cfg, multi_crop
        trunk, feat_dim = create_encoder(model_cfg.encoder)
        trunk.fc = build_head(feat_dim, model_cfg.dim, model_cfg.mlp)
        self.encoder_q = trunk
        self.encoder_k = copy.deepcopy(trunk)  # method.md §1: initialised as a copy, never gets gradients
        self.encoder_k.requires_grad_(False)
        queue = F.normalize(torch.randn(model_cfg.dim, model_cfg.queue_size), dim=0)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_index", torch.arange(model_cfg.queue_size, dtype=torch.long))
        self.mask_sampler: MaskSampler = selection.sample_mask  # tests inject forced masks here
        # Called with a detached `StepRecord` after every step when set (inspection, tests); the
        # losses never read it.
        self.step_observer: Callable[[StepRecord], None] | None = None
        self._cache = selection.SelectionCache()

    def use_prototypes(self, epoch: int, prototypes: Prototypes | None) -> bool:
        """HCSC terms from the warm-up epoch on, once a clustering exists (method.md §2.1)."""
        return prototypes is not None and epoch >= self.hcsc_cfg.warmup_epochs

    @torch.no_grad()
    def embed_momentum(self, images: torch.Tensor) -> torch.Tensor:
        """normalize(encoder_k(images)): the 128-d embedding that is clustered (method.md §1, 2.2).
        The caller puts the model in eval mode. Shape: (B, 3, H, W) -> (B, dim)."""
        return F.normalize(self.encoder_k(images), dim=1)

    @torch.no_grad()
    def backbone_features(self, images: torch.Tensor, which: str = "q") -> torch.Tensor:
        """Pooled trunk features before the head (kNN, linear probe). Shape: -> (B, feat_dim)."""
        if which not in ("q", "k"):
            raise ValueError(f"backbone_features: which must be 'q' or 'k', got {which!r}")
        return pooled_features(self.encoder_q if which == "q" else self.encoder_k, images)

    def forward(self, batch: Batch, prototypes: Prototypes | None, *, epoch: int,
                metrics: bool = False) -> dict[str, torch.Tensor]:
        """One step's losses, with the momentum update and the enqueue as side effects.

        Returns `loss` (the total of method.md §5.1) and its terms `loss_inst`, `loss_proto`,
        `loss_local_inst`, `loss_local_proto` (zero when not applicable), and `acc_inst` (percent
        top-1 of the first instance logits: level 1's masked logits when selecting, else MoCo's).
        With `metrics` (the trainer's logging steps) and prototypes in use, also the per-level
        metrics of `model.step_terms.step_metrics`; all are tensors on the step's device.
        """
        views = self._check_views(batch)
        q = F.normalize(self.encoder_q(views[0]), dim=1)
        local_q = [F.normalize(self.encoder_q(v), dim=1) for v in views[2:]]  # one forward per size
        with torch.no_grad():
            momentum_update_(self.encoder_k, self.encoder_q, self.model_cfg.momentum)
            k, k_all = shuffled_keys(self.encoder_k, views[1], self.model_cfg.shuffle_bn)
        queue = self.queue.clone()  # the pre-enqueue queue; saved by autograd for z.Q's backward
        terms = StepLogits()
        if self.use_prototypes(epoch, prototypes):
            assert prototypes is not None  # `use_prototypes` checked it
            out = self._hcsc_losses(q, local_q, k, queue, batch.idx, prototypes, terms)
            if metrics:
                out.update(step_metrics(terms, prototypes.num_levels, len(local_q)))
        else:
            out = self._moco_losses(q, local_q, k, queue, terms)
        out["acc_inst"] = losses.top1_accuracy(terms.inst_logits[0].detach())
        out["loss"] = out["loss_inst"] + out["loss_proto"] + out["loss_local_inst"] + out["loss_local_proto"]
        self._enqueue(k_all, dist.all_gather_equal(batch.idx))
        if self.step_observer is not None:
            self.step_observer(self._detached(terms, q, local_q, k, queue))
        return out

    @staticmethod
    def _detached(terms: StepLogits, q, local_q, k, queue) -> StepRecord:
        """Detached copies only, so the record never holds the autograd graph alive."""
        def det(xs):
            return [det(x) if isinstance(x, list) else (None if x is None else x.detach()) for x in xs]

        return StepRecord(
            q=q.detach(), local_q=det(local_q), k=k, queue=queue, labels=terms.labels,
            inst_logits=det(terms.inst_logits), inst_masks=terms.inst_masks,
            proto_logits=det(terms.proto_logits), proto_masks=terms.proto_masks,
            proto_excluded=terms.proto_excluded, local_inst_logits=det(terms.local_inst_logits),
            local_proto_logits=det(terms.local_proto_logits), local_proto_masks=terms.local_proto_masks)

    def _check_views(self, batch: Batch) -> list[torch.Tensor]:
        n = len(batch.views)
        if (self.multi_crop and n < 3) or (not self.multi_crop and n != 2):
            want = "2 global + local views" if self.multi_crop else "2 views (query, key)"
            raise ValueError(f"batch.views: HCSC(multi_crop={self.multi_crop}) needs {want}, got {n}; "
                             "check data.multi_crop matches the model")
        return batch.views

    def _moco_losses(self, q, local_q, k, queue, terms: StepLogits) -> dict[str, torch.Tensor]:
        """Warm-up / no clustering: plain MoCo v2 InfoNCE, plus plain local terms (method.md §5.1)."""
        terms.inst_logits = [self._moco_logits(q, k, queue)]
        terms.local_inst_logits = [self._moco_logits(z, k, queue) for z in local_q]
        zero = q.new_zeros(())
        return {"loss_inst": losses.info_nce(terms.inst_logits[0]),
                "loss_proto": zero, "loss_local_proto": zero,
                "loss_local_inst": sum((losses.info_nce(x) for x in terms.local_inst_logits), zero)}

    def _moco_logits(self, z, k, queue) -> torch.Tensor:
        return losses.instance_logits((z * k).sum(1, keepdim=True), z @ queue, None,
                                      self.model_cfg.temperature)

    def _hcsc_losses(self, q, local_q, k, queue, idx, protos: Prototypes, terms: StepLogits):
        cfg = self.hcsc_cfg
        if protos.num_levels != len(cfg.num_clusters):
            raise ValueError(f"prototypes: {protos.num_levels} levels, but hcsc.num_clusters has "
                             f"{len(cfg.num_clusters)}; cluster with the same config")
        self._cache.refresh(self.queue, protos, self.model_cfg.temperature,
                            with_queue=cfg.instance_selection)
        labels = [y[idx] for y in protos.im2cluster]  # y_i^l, this epoch's clustering (method.md §3)
        terms.labels = labels
        terms.proto_excluded = [  # N_l from the per-rank batch (method.md §4, 6)
            losses.excluded_prototypes(y, c.shape[0], self._cache.max_label(lvl), cfg.fix_last_prototype)
            for lvl, (y, c) in enumerate(zip(labels, protos.centroids, strict=True))]
        # PCSC (method.md §4): global query, then every local view with freshly drawn masks (method.md §5.1).
        terms.proto_logits, terms.proto_masks = self._proto_level_logits(q, labels, terms, protos)
        for z in local_q:
            logits, masks = self._proto_level_logits(z, labels, terms, protos)
            terms.local_proto_logits.append(logits)
            terms.local_proto_masks.append(masks)
        # ICSC (method.md §3): one Bernoulli mask per level over the pre-enqueue queue, levels stacked.
        masks = self._instance_masks(labels, protos) if cfg.instance_selection else None
        inst = self._masked_instance_logits(q, k, queue, masks)  # (L or 1, B, 1+K)
        local_masks = masks if cfg.selection_on_local else None  # the same s^l (method.md §5.1)
        local_inst = [self._masked_instance_logits(z, k, queue, local_masks) for z in local_q]
        terms.inst_masks = [] if masks is None else list(masks.unbind(0))
        terms.inst_logits = list(inst.unbind(0))
        terms.local_inst_logits = [x for per_view in local_inst for x in per_view.unbind(0)]
        return self._reduce(inst, local_inst, terms, protos.num_levels, q.new_zeros(()))

    def _reduce(self, inst, local_inst, terms: StepLogits, n_levels: int, zero) -> dict[str, torch.Tensor]:
        """docs/method.md §5.1: instance CE summed over levels (averaged with `average_instance_loss`),
        prototype CE averaged over levels; local prototype terms / L, not / (V L)."""
        ce = losses.info_nce

        def levels(logits: torch.Tensor) -> torch.Tensor:
            per_level = losses.info_nce_levels(logits)
            return per_level.mean() if self.hcsc_cfg.average_instance_loss else per_level.sum()

        return {
            "loss_inst": levels(inst),
            "loss_proto": cast(torch.Tensor, sum(ce(x) for x in terms.proto_logits)) / n_levels,
            "loss_local_inst": sum((levels(x) for x in local_inst), zero),
            "loss_local_proto": sum((ce(x) for v in terms.local_proto_logits for x in v), zero) / n_levels,
        }

    def _masked_instance_logits(self, z, k, queue, masks: torch.Tensor | None) -> torch.Tensor:
        """(L, B, 1+K) logits, one matrix per level mask (method.md §3); (1, B, 1+K) plain MoCo without."""
        l_pos, l_neg = (z * k).sum(1, keepdim=True), z @ queue
        if masks is None:
            return losses.instance_logits(l_pos, l_neg, None, self.model_cfg.temperature)[None]
        return losses.instance_logits(l_pos, l_neg, masks, self.model_cfg.temperature,
                                      self.hcsc_cfg.remove_dropped_negatives)

    def _instance_masks(self, labels: list[torch.Tensor], protos: Prototypes) -> torch.Tensor:
        """(L, B, K) bool: s_ij^l ~ Bernoulli(p_ij^l), every level in one draw."""
        with torch.no_grad(), selection.fp32_region(labels[0].device):
            prob = selection.instance_keep_prob_levels(self.queue, protos.centroids, protos.density,
                                                       labels, self._cache.log_norm())
            return self.mask_sampler(prob)

    def _proto_level_logits(self, z, labels, terms: StepLogits, protos: Prototypes):
        """PCSC logits of every level for queries z; masks at levels < L when proto selection is on."""
        logits, masks = [], []
        for lvl, (y, c, phi) in enumerate(zip(labels, protos.centroids, protos.density, strict=True)):
            keep = None
            if self.hcsc_cfg.proto_selection and lvl < protos.num_levels - 1:  # top level: no selection
                with torch.no_grad(), selection.fp32_region(z.device):
                    parents = protos.cluster2cluster[lvl][y]  # u_i = pi_l(y_i^l)
                    keep = self.mask_sampler(selection.proto_keep_prob(self._cache.parent_prob(lvl), parents))
            logits.append(losses.proto_logits(z, c, phi, y, terms.proto_excluded[lvl], keep,
                                              self.hcsc_cfg.remove_dropped_negatives))
            masks.append(keep)
        return logits, masks

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, idx: torch.Tensor) -> None:
        version = selection.version_of(self.queue)
        cols = enqueue_(self.queue, self.queue_ptr, self.queue_index, keys, idx)
        self._cache.advance(self.queue, version, cols, keys)
