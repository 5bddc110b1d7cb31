"""Small synthetic models, batches and prototypes shared by the model tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.prototypes import Prototypes
from core.config import HCSCConfig, ModelConfig
from model.hcsc import HCSC
from pipeline.batch import Batch

DIM = 16
SIZES = (12, 6, 3)
T = 0.2


def make_prototypes(n: int = 40, sizes=SIZES, dim: int = DIM, seed: int = 0) -> Prototypes:
    """A consistent 3-level hierarchy: y^{l+1} = pi_l[y^l], unit centroids, mean(phi) = T."""
    g = torch.Generator().manual_seed(seed)
    y = [torch.randint(0, sizes[0], (n,), generator=g)]
    y[0][:sizes[0]] = torch.arange(sizes[0])  # every fine cluster used, so max(y^1) = M_1 - 1
    parents = []
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        p = torch.randint(0, hi, (lo,), generator=g)
        p[:hi] = torch.arange(hi)
        parents.append(p)
        y.append(p[y[-1]])
    cents = [F.normalize(torch.randn(m, dim, generator=g), dim=1) for m in sizes]
    dens = [torch.rand(m, generator=g) + 0.05 for m in sizes]
    dens = [d / d.mean() * T for d in dens]
    logits = [a @ b.t() for a, b in zip(cents, cents[1:], strict=False)]
    return Prototypes(y, cents, dens, parents, logits)


def make_model(*, queue: int = 64, multi_crop: bool = False, seed: int = 0, **hcsc) -> HCSC:
    torch.manual_seed(seed)
    mcfg = ModelConfig(encoder="resnet18_small", dim=DIM, queue_size=queue, temperature=T)
    hcfg = HCSCConfig(num_clusters=list(SIZES), warmup_epochs=1, **hcsc)
    model = HCSC(mcfg, hcfg, multi_crop=multi_crop)
    record_last_step(model)
    return model


def record_last_step(model: HCSC) -> None:
    """Keep the last step's `StepRecord` as `model.last_terms` (what the tests inspect)."""
    model.step_observer = lambda record: setattr(model, "last_terms", record)


def make_batch(b: int = 8, n: int = 40, size: int = 8, local: int = 0, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 3, size, size, generator=g) for _ in range(2)]
    views += [torch.randn(b, 3, size // 2, size // 2, generator=g) for _ in range(local)]
    idx = torch.randperm(n, generator=g)[:b]
    return Batch(views, idx, torch.zeros(b, dtype=torch.long))


def constant_sampler(value: bool):
    return lambda prob: torch.full(prob.shape, value, dtype=torch.bool)


class RecordingSampler:
    """Bernoulli sampling that also records every probability matrix it is given."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.probs: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    def __call__(self, prob: torch.Tensor) -> torch.Tensor:
        mask = torch.rand(prob.shape, generator=self.gen) < prob
        self.probs.append(prob.clone())
        self.masks.append(mask)
        return mask


def moco_ce(z: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """Naive MoCo v2 InfoNCE, row by row."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(z.shape[0]):
        logits = torch.cat([(z[i] @ k[i])[None], z[i] @ queue]).double() / T
        total += torch.logsumexp(logits, 0) - logits[0]
    return total / z.shape[0]
