"""What a run records besides its per-step `train` lines: the start-up summary (`run`), one
`cluster` record per epoch and level, one `epoch` record per epoch, and the images, text and
histograms TensorBoard shows. The names and their meaning are in README ("What a run records").
"""

from __future__ import annotations

import importlib.metadata
import math
import statistics
import time
from typing import Any

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from cluster.prototypes import Prototypes
from core import dist
from core.config import Config, global_batch
from evaluate.metrics import purity
from train.preflight import RunInputs

# ImageNet statistics the pipelines normalise with: undone for the image grid.
_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
_GRID_IMAGES = 16  # first batch's samples shown, every view of each


def run_summary(cfg: Config, inputs: RunInputs, model: torch.nn.Module, steps_per_epoch: int,
                lr: float) -> dict[str, Any]:
    """The `run` record: what this job trains, on what, with what."""
    encoder = model.get_submodule("encoder_q")  # the trained part (the momentum encoder follows it)
    params = sum(p.numel() for p in encoder.parameters())
    return {"train_samples": inputs.train.num_samples,
            "val_samples": inputs.val.num_samples if inputs.val is not None else 0,
            "steps_per_epoch": steps_per_epoch, "epochs": cfg.optim.epochs, "world_size": dist.world(),
            "batch_per_rank": cfg.data.batch_size, "global_batch": global_batch(cfg, dist.world()),
            "lr": lr, "trained_parameters": params, "precision": cfg.engine.precision,
            "device": str(dist.device()), "backend": cfg.data.backend, "encoder": cfg.model.encoder,
            "levels": list(cfg.hcsc.num_clusters) if cfg.hcsc.enabled else [],
            **{f"version_{name}": _version(*packages) for name, packages in (
                ("torch", ("torch",)), ("dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120")),
                ("faiss", ("faiss-cpu", "faiss-gpu")), ("deepspeed", ("deepspeed",)))}}


def _version(*packages: str) -> str:
    """The version of the first of `packages` installed; with several candidates (the builds of one
    library) its name too, since the build matters as much as the version."""
    for package in packages:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version if len(packages) == 1 else f"{version} ({package})"
    return "not installed"


def cluster_records(prototypes: Prototypes, level_sizes: list[torch.Tensor], labels: torch.Tensor | None, *,
                    epoch: int, nredo: int) -> list[dict[str, Any]]:
    """One record per level: what k-means did, the clusters' sizes in images (`level_sizes`, from
    `Prototypes.cluster_sizes`), their concentrations, and (when the shards carry labels) NMI and purity.

    `labels`: every training sample's class, indexed by dataset index (None: no labels).
    """
    rows = []
    for level, (stats, assign, phi, sizes) in enumerate(
            zip(prototypes.stats, prototypes.im2cluster, prototypes.density,
                [s.numpy() for s in level_sizes], strict=True),
            start=1):
        row: dict[str, Any] = {
            "epoch": epoch, "level": level, "samples": int(assign.numel()), "clusters": stats.clusters,
            "objective": stats.final_objective, "seconds": stats.seconds,
            "restarts": 1 if stats.warm else nredo, "iterations": stats.iterations,
            "empty": int((sizes == 0).sum()), "smallest": int(sizes.min()),
            "median": float(np.median(sizes)), "largest": int(sizes.max()), "searched": stats.searched,
            "concentration_mean": float(phi.mean()), "concentration_std": float(phi.std())}
        if labels is not None:
            truth, found = labels.cpu().numpy(), assign.cpu().numpy()
            row["nmi"] = float(normalized_mutual_info_score(truth, found))  # AMI would cost minutes at 1M
            row["purity"] = purity(truth, found)
        rows.append(row)
    return rows


def view_grid(views: list[torch.Tensor]) -> torch.Tensor:
    """The first samples' augmented views, de-normalised, one row per sample (CHW in [0, 1])."""
    from torchvision.utils import make_grid

    n = min(_GRID_IMAGES, views[0].shape[0])
    size = views[0].shape[-1]
    rows = []
    for i in range(n):
        for v in views:
            img = (v[i].detach().float().cpu() * _STD + _MEAN).clamp(0, 1)
            if img.shape[-1] != size:  # local crops are smaller: pad to the global size
                img = torch.nn.functional.pad(img, (0, size - img.shape[-1], 0, size - img.shape[-2]))
            rows.append(img)
    return make_grid(rows, nrow=len(views), padding=2)


class EpochMeter:
    """Sums of the loss terms on the device (no host sync per step), images/s and the data wait."""

    TERMS = ("loss", "loss_inst", "loss_proto", "loss_local_inst", "loss_local_proto", "acc_inst")

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.wait = 0.0
        self.images = 0
        self.steps = 0
        self._sums: dict[str, torch.Tensor] = {}

    def data_ready(self) -> None:
        self.wait += time.perf_counter() - self.mark

    def step_done(self, out: dict[str, torch.Tensor], images: int) -> None:
        for name in self.TERMS:
            self._sums[name] = self._sums[name] + out[name] if name in self._sums else out[name]
        self.images += images
        self.steps += 1
        self.mark = time.perf_counter()

    def throughput(self) -> dict[str, float]:
        elapsed = max(self.mark - self.start, 1e-9)
        return {"images_per_s": self.images / elapsed, "data_wait": self.wait / elapsed}

    def record(self, epoch: int, **seconds: float) -> dict[str, Any]:
        """The `epoch` record (one host sync); `seconds`: feature pass, clustering, evaluation..."""
        means = {name: float(total) / max(self.steps, 1) for name, total in self._sums.items()}
        return {"epoch": epoch, **means, **self.throughput(), "steps": self.steps,
                "epoch_s": time.perf_counter() - self.start, **seconds}


class Eta:
    """Seconds left for the run, from the mean duration of the epochs run by this job."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.durations: list[float] = []

    def after(self, epoch: int, seconds: float) -> float:
        self.durations.append(seconds)
        return statistics.fmean(self.durations) * (self.epochs - epoch - 1)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
