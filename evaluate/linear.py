"""Linear probe on a frozen trunk (method.md §7.1, "ImageNet linear", the PCL protocol HCSC uses).

Only a `nn.Linear` is trained: init N(0, 0.01), bias 0; SGD lr 5.0, momentum 0.9, no weight
decay, 100 epochs, lr x0.1 at epochs 60 and 80; batch 256 in total over ranks. The trunk stays in
eval mode (BN frozen) and features are not normalised. Gradients of the classifier are averaged
over ranks through `core.dist` (every rank's train batch has the same size, so the mean of the
per-rank means is the global mean). Validation counts correct predictions over all ranks exactly,
not a per-batch average across ranks as the official script does (method.md §9 item 17).

Resumable: after every epoch rank 0 writes classifier, optimizer, epoch, best and history to
``<out>/linear_state.pt`` (temporary file, then rename); a rerun continues after the last epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core import dist
from core.files import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "linear_state.pt"
Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class LinearConfig:
    """The probe's protocol; defaults are method.md §7.1's."""

    epochs: int = 100
    lr: float = 5.0  # not scaled with the batch (the PCL/HCSC script uses it as is for 256)
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [60, 80])  # epochs where lr *= gamma
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"linear probe: need epochs >= 1, lr > 0, 0 <= momentum < 1, weight decay >= 0; "
                             f"got {self}")

    def lr_at(self, epoch: int) -> float:
        """Step decay: lr x gamma^(number of milestones <= epoch)."""
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)


@dataclass
class LinearResult:
    best_top1: float
    last_top1: float
    last_top5: float
    best_epoch: int
    history: list[dict[str, float]]


def make_classifier(feat_dim: int, num_classes: int) -> nn.Linear:
    """method.md §7.1: fc initialised N(0, 0.01), bias 0."""
    fc = nn.Linear(feat_dim, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


@torch.no_grad()
def accuracy_counts(classifier: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                    chunk: int = 4096) -> dict[str, float]:
    """Top-1/top-5 in percent over the rows of every rank (correct counts are summed, exact)."""
    counts = torch.zeros(3, dtype=torch.float64, device=feats.device)
    for start in range(0, feats.shape[0], chunk):
        logits = classifier(feats[start:start + chunk])
        y = labels[start:start + chunk]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] == y).sum()
        counts[1] += (top == y[:, None]).any(dim=1).sum()
        counts[2] += y.numel()
    counts = dist.all_reduce_sum(counts)
    total = max(float(counts[2]), 1.0)
    return {"top1": 100.0 * float(counts[0]) / total, "top5": 100.0 * float(counts[1]) / total}


def _average_gradients(module: nn.Module) -> None:
    world = dist.world()
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce_sum(p.grad).div_(world)


def _save(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def _resume(path: Path | None, classifier: nn.Module, optimizer: torch.optim.Optimizer,
            cfg: LinearConfig) -> tuple[int, list[dict[str, float]]]:
    if path is None or not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config") != dataclasses.asdict(cfg):
        raise ValueError(f"{path}: written with another protocol {state.get('config')}; rerun with the same "
                         "flags or pick a new --out")
    classifier.load_state_dict(state["classifier"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("linear probe: resuming from %s after epoch %d", path, state["epoch"])
    return int(state["epoch"]), list(state["history"])


def train_linear(classifier: nn.Module, train_batches: Batches,
                 evaluate: Callable[[nn.Module], dict[str, float]], cfg: LinearConfig, *,
                 out_dir: str | os.PathLike | None = None) -> LinearResult:
    """Train `classifier` on frozen features with the method.md §7.1 protocol; call on every rank.

    Args:
        classifier: the linear layer (already on the features' device).
        train_batches: ``train_batches(epoch)`` yields this rank's (features (B, d), labels (B,))
            of one epoch, B equal on every rank; the caller runs the frozen trunk.
        evaluate: top-1/top-5 of the classifier on the held-out split (over all ranks).
        cfg: the protocol.
        out_dir: where the resumable state lives; None keeps nothing.
    """
    optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    path = Path(out_dir) / STATE_FILE if out_dir is not None else None
    start, history = _resume(path, classifier, optimizer, cfg)
    for epoch in range(start, cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(epoch)
        classifier.train()
        loss_sum, steps = 0.0, 0
        for feats, labels in train_batches(epoch):
            loss = F.cross_entropy(classifier(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(classifier)
            optimizer.step()
            loss_sum, steps = loss_sum + float(loss.detach()), steps + 1
        classifier.eval()
        scores = evaluate(classifier)
        history.append({"epoch": epoch, "lr": cfg.lr_at(epoch), "loss": loss_sum / max(steps, 1), **scores})
        log.info("linear epoch %d/%d: lr %.4g loss %.4f val top-1 %.2f top-5 %.2f", epoch + 1, cfg.epochs,
                 cfg.lr_at(epoch), history[-1]["loss"], scores["top1"], scores["top5"])
        if path is not None and dist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(path, {"epoch": epoch + 1, "classifier": classifier.state_dict(),
                         "optimizer": optimizer.state_dict(), "history": history,
                         "config": dataclasses.asdict(cfg)})
        dist.barrier()
    return summarize(history)


def summarize(history: list[dict[str, float]]) -> LinearResult:
    """Best and last top-1 (the official script tracks the best; which one the paper reports is
    unknown, method.md §7.1, so both are given)."""
    if not history:
        raise ValueError("linear probe: no epoch has run")
    best = max(history, key=lambda h: h["top1"])
    return LinearResult(best_top1=best["top1"], last_top1=history[-1]["top1"], last_top5=history[-1]["top5"],
                        best_epoch=int(best["epoch"]), history=history)
