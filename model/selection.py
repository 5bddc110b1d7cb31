"""Selective coding: keep probabilities and Bernoulli masks of ICSC (method.md §3) and PCSC (method.md §4).

Pure tensor functions, no host synchronisation. Every probability is computed in fp32 with autocast
off: the masks are constants of the step (no gradient flows through selection, method.md §3), and bf16
would move keep probabilities near the 0.999 clip by more than the clip itself.

Index names: B queries, K queue keys, d embedding width, M prototypes of level l, U = M_{l+1}.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

MIN_INSTANCE_CONCENTRATION = 1e-3  # method.md §3: phi clamped to >= 1e-3 in ICSC only
INSTANCE_KEEP_CLIP = (0.0, 0.999)  # method.md §3
PROTO_KEEP_CLIP = (1e-4, 0.999)  # method.md §4


def fp32_region(device: torch.device) -> AbstractContextManager:
    """Autocast switched off on `device`, so the selection maths runs in the inputs' fp32."""
    return torch.autocast(device_type=device.type, enabled=False)


def queue_log_normalizer(queue: torch.Tensor, centroids: torch.Tensor, density: torch.Tensor,
                         chunk: int = 4096) -> torch.Tensor:
    """log sum_m exp(q_j . c_m / phi_m) for every queue key j (the softmax denominator of method.md §3).

    Chunked over K so that at most (chunk, M) similarities exist at once.

    Shape: queue (d, K), centroids (M, d), density (M,) -> (K,).
    """
    inv_phi = 1.0 / density.float().clamp_min(MIN_INSTANCE_CONCENTRATION)
    scaled = centroids.float() * inv_phi[:, None]  # (M, d): row m is c_m / phi_m
    keys = queue.float().t()  # (K, d)
    parts = [torch.logsumexp(keys[s:s + chunk] @ scaled.t(), dim=1) for s in range(0, keys.shape[0], chunk)]
    return torch.cat(parts)


def instance_keep_prob_levels(queue: torch.Tensor, centroids: list[torch.Tensor], density: list[torch.Tensor],
                              labels: list[torch.Tensor], log_norm: torch.Tensor) -> torch.Tensor:
    """Keep probabilities of every level at once (one matmul, one exp: fewer, larger kernels).

    Only the B needed columns of each (K, M_l) soft assignment are formed: P(y_i | q_j) =
    exp(q_j . c_{y_i} / phi_{y_i} - log_norm_j), with `log_norm` from `queue_log_normalizer`.

    Shape: queue (d, K), centroids[l] (M_l, d), density[l] (M_l,), labels[l] (B,) int64,
    log_norm (L, K) -> (L, B, K).
    """
    pos = torch.stack([  # (L, B, d): c_{y_i} / phi_{y_i} at each level
        c.float()[y] / phi.float().clamp_min(MIN_INSTANCE_CONCENTRATION)[y, None]
        for c, phi, y in zip(centroids, density, labels, strict=True)])
    assign = torch.exp(pos @ queue.float() - log_norm[:, None, :])  # (L, B, K): P(y_i | q_j)
    return (1.0 - assign).clamp_(*INSTANCE_KEEP_CLIP)


def parent_assignment(logits: torch.Tensor, density_up: torch.Tensor, temperature: float) -> torch.Tensor:
    """P^{l+1}(u | c_j^l) = softmax_u(A^l[j, u] / phi~_u^{l+1}) over the M_{l+1} parents (method.md §4).

    phi~ = phi / mean(phi) * T, as the official code rescales it; equal to phi when mean(phi) = T,
    which the clustering guarantees (method.md §2.4).

    Shape: logits A^l (M, U), density_up (U,) -> (M, U).
    """
    phi = density_up.float()
    phi = phi / phi.mean() * temperature
    return torch.softmax(logits.float() / phi[None, :], dim=1)


def proto_keep_prob(parent_prob: torch.Tensor, parent_labels: torch.Tensor) -> torch.Tensor:
    """r_ij = clip(1 - P^{l+1}(u_i | c_j^l), 1e-4, 0.999), u_i the parent of the query's positive.

    Computed for every prototype j of the level; columns that are not candidate negatives are
    removed later by the logits builder (see `model.losses.proto_logits`).

    Shape: parent_prob (M, U), parent_labels (B,) int64 -> (B, M).
    """
    return (1.0 - parent_prob[:, parent_labels].t()).clamp_(*PROTO_KEEP_CLIP)


def sample_mask(prob: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent Bernoulli(prob) draws as a boolean mask (True = keep): u < p with u ~ U[0, 1)."""
    u = torch.rand(prob.shape, device=prob.device, generator=generator)
    return u < prob


class SelectionCache:
    """The constants of selection that change only when the prototypes or the queue change.

    - `log_norm(l)`: the (K,) log softmax denominators of the queue keys against level l, refreshed
      column by column on every enqueue (`advance`), so one step costs O(B K d) instead of the
      reference's O(K M d) for the full queue-to-prototype softmax.
    - `parent_prob(l)`: P^{l+1}(u | c_j^l), (M_l, M_{l+1}), fixed for an epoch.
    - `max_label(l)`: max over the dataset of `im2cluster[l]`, a 0-dim tensor (method.md §4 off-by-one).

    Staleness is detected by tensor identity and in-place version counters of every input (the
    queue included), so a new `Prototypes`, a checkpoint load or a `.to()` recomputes everything.
    Not part of the state dict: it is derived data.
    """

    def __init__(self) -> None:
        self._proto_src: tuple = ()
        self._queue_src: tuple = ()
        self._log_norm = torch.empty(0)
        self._parent: list[torch.Tensor] = []
        self._max_label: list[torch.Tensor] = []
        self._centroids: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def _stamp(tensors) -> tuple:
        return tuple((t, version_of(t)) for t in tensors)

    @staticmethod
    def _same(stamp: tuple, tensors) -> bool:
        tensors = list(tensors)
        return len(stamp) == len(tensors) and all(
            a is t and v == version_of(t) for (a, v), t in zip(stamp, tensors, strict=True))

    def _proto_tensors(self, protos) -> list[torch.Tensor]:
        return [*protos.im2cluster, *protos.centroids, *protos.density, *protos.logits]

    def refresh(self, queue: torch.Tensor, protos, temperature: float, with_queue: bool = True) -> None:
        """Recompute whatever is stale for these prototypes (and this queue, if `with_queue`)."""
        with torch.no_grad(), fp32_region(queue.device):
            if not self._same(self._proto_src, self._proto_tensors(protos)):
                self._parent = [parent_assignment(a, protos.density[i + 1], temperature)
                                for i, a in enumerate(protos.logits)]
                self._max_label = [y.max() for y in protos.im2cluster]
                self._proto_src = self._stamp(self._proto_tensors(protos))
                self._queue_src = ()
            if with_queue and not self._same(self._queue_src, [queue]):
                self._log_norm = torch.stack([queue_log_normalizer(queue, c, d)
                                              for c, d in zip(protos.centroids, protos.density, strict=True)])
                self._queue_src = self._stamp([queue])
                self._centroids = list(zip(protos.centroids, protos.density, strict=True))

    def advance(self, queue: torch.Tensor, version_before: int, cols: torch.Tensor,
                keys: torch.Tensor) -> None:
        """After an enqueue of `keys` (n, d) into columns `cols`: update the cached denominators.

        Only when the cache was fresh for the queue as it was before the enqueue; otherwise the next
        `refresh` recomputes from scratch.
        """
        fresh = bool(self._queue_src) and self._queue_src[0][0] is queue
        if not fresh or self._queue_src[0][1] != version_before:
            return
        with torch.no_grad(), fp32_region(queue.device):
            fresh_cols = torch.stack([queue_log_normalizer(keys.t(), c, d) for c, d in self._centroids])
            self._log_norm.index_copy_(1, cols, fresh_cols)
        self._queue_src = self._stamp([queue])

    def log_norm(self, level: int | None = None) -> torch.Tensor:
        """(K,) of one level, or (L, K) of all levels when `level` is None."""
        return self._log_norm if level is None else self._log_norm[level]

    def parent_prob(self, level: int) -> torch.Tensor:
        return self._parent[level]

    def max_label(self, level: int) -> torch.Tensor:
        return self._max_label[level]


def version_of(t: torch.Tensor) -> int:
    """In-place version counter; inference-mode tensors have none (they are treated as constant)."""
    try:
        return t._version
    except RuntimeError:
        return -1
