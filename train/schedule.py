"""Learning-rate schedule (method.md §5.2): cosine per epoch, no warm-up, constant within an epoch."""

from __future__ import annotations

import math

from core.config import Config, scaled_lr


def lr_at(cfg: Config, epoch: int, world: int) -> float:
    """lr_e = final + 0.5 (1 + cos(pi e / E)) (lr - final), lr = base x global batch / 256."""
    lr = scaled_lr(cfg, world)
    if cfg.optim.schedule == "constant":
        return lr
    final = cfg.optim.final_lr
    return final + 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.optim.epochs)) * (lr - final)
