"""The start-up check of `hcsc-train`: every mistake that can be found before any work is found here.

It runs on every rank before the run folder is touched, and the ranks agree on the outcome (one
all-gather), so a mistake stops every rank at once with the same one line, exit code 2. What it
covers: the shard folder, its manifest and every split the run reads (train; val when the kNN
monitor and the final evaluation are on), each shard's size against the manifest (the full
checksum is `hcsc-shards verify`'s job), the global batch against the split, the finest clustering
level against the split, the GPU the config asks for against the one torch can use (no silent CPU
run), the output folder, the checkpoint to resume from, and that every rank sees the same shards.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.kmeans import faiss_gpu_problem
from core import dist
from core.cli import UserError
from core.config import Config, global_batch
from core.errors import first_line
from core.files import nearest_existing
from pipeline import BackendUnavailable, check_backend
from pipeline.plan import load_split
from shards.format import INFO_NAME, ShardFormatError, SplitManifest
from train import checkpoint


class PreflightError(UserError):
    """A mistake found before training; the message names the key or path and what to do."""


@dataclass(frozen=True)
class RunInputs:
    """What the check established, for the run to use."""

    train: SplitManifest
    val: SplitManifest | None  # None when data.val_split is ""
    resume_from: Path | None  # the checkpoint folder to continue from, if any


def check(cfg: Config) -> RunInputs:
    """Run every check on this rank, then agree with the other ranks (a collective).

    Raises:
        PreflightError: on every rank, with the first failing rank's message.
    """
    found: RunInputs | None = None
    problem = None
    try:
        found = _check_local(cfg, dist.world())
    except (PreflightError, checkpoint.CheckpointChoiceError) as err:
        problem = str(err)
    view = _shard_view(cfg.data.shards, found) if found is not None else None
    reports = dist.all_gather_object((problem, view))
    for rank, (message, _) in enumerate(reports):
        if message:
            raise PreflightError(message if dist.world() == 1 else f"rank {rank}: {message}")
    views = {v for _, v in reports}
    if len(views) > 1:
        raise PreflightError(f"data.shards={cfg.data.shards}: the ranks see different shard folders "
                             "(manifests or shard sizes differ); put the shards where every node reads "
                             "the same files")
    assert found is not None  # no rank reported a problem
    return found


def _check_local(cfg: Config, world: int) -> RunInputs:
    train = _split(cfg, cfg.data.train_split, "data.train_split", "")
    val = None
    if cfg.data.val_split:
        val = _split(cfg, cfg.data.val_split, "data.val_split",
                     "; or pass data.val_split= (empty) to turn off the kNN monitor and the final evaluation")
    _check_sizes(cfg, train, world)
    _check_hardware(cfg)
    _check_output_dir(cfg.run.output_dir)
    return RunInputs(train, val, _resume_from(cfg))


def _resume_from(cfg: Config) -> Path | None:
    if not cfg.run.overwrite:
        return checkpoint.resolve(cfg.run.output_dir, cfg.run.resume)
    if cfg.run.resume == "auto":  # a fresh start: the folder's old checkpoints are moved aside
        return None
    path = checkpoint.resolve(cfg.run.output_dir, cfg.run.resume)
    own = Path(cfg.run.output_dir).resolve()
    if path is not None and own in path.resolve().parents:
        raise PreflightError(f"run.resume={cfg.run.resume}: run.overwrite=true moves this folder's "
                             "checkpoints aside; to fork from it, choose another run.output_dir")
    return path


def _split(cfg: Config, split: str, key: str, alternative: str) -> SplitManifest:
    folder = cfg.data.shards
    if not folder:
        raise PreflightError("data.shards: not set; pass data.shards=FOLDER, a folder built by "
                             "`hcsc-shards build`")
    if not Path(folder).is_dir():
        raise PreflightError(f"data.shards={folder}: no such folder; build the shards with "
                             "`hcsc-shards build --out FOLDER ...` or fix the path")
    try:
        manifest, _ = load_split(folder, split)  # every tar present, of the recorded size, with its index
    except ShardFormatError as err:
        raise PreflightError(f"{key}={split}: {err}{alternative}") from None
    return manifest


def _check_sizes(cfg: Config, train: SplitManifest, world: int) -> None:
    n, batch = train.num_samples, global_batch(cfg, world)
    if n // batch < 1:
        raise PreflightError(f"data.batch_size={cfg.data.batch_size}: the global batch ({batch} = "
                             f"{cfg.data.batch_size} x {world} ranks) exceeds the {n} samples of split "
                             f"{cfg.data.train_split!r}, so an epoch would have no step; lower "
                             f"data.batch_size to at most {n // world}")
    finest = cfg.hcsc.num_clusters[0]
    if cfg.hcsc.enabled and finest > n:
        raise PreflightError(f"hcsc.num_clusters={list(cfg.hcsc.num_clusters)}: {finest} clusters at the "
                             f"finest level, but split {cfg.data.train_split!r} has {n} samples; lower "
                             "the levels (fine to coarse, strictly decreasing)")


NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")  # present where an NVIDIA kernel driver is loaded


def _check_hardware(cfg: Config) -> None:
    """What the config asks of the GPU against what torch can use: never a silent CPU run."""
    cuda, why_not = _cuda_usable()
    if not cuda and why_not:
        raise PreflightError(f"this machine has an NVIDIA driver but torch {torch.__version__} (CUDA "
                             f"{torch.version.cuda}) cannot use it: {why_not}; update the driver "
                             "(README.md#gpu), or to train on the CPU on purpose set CUDA_VISIBLE_DEVICES=")
    precision = cfg.engine.precision
    if precision != "fp32" and not cuda:
        raise PreflightError(f"engine.precision={precision}: mixed precision needs a CUDA GPU and this "
                             "machine has none; set engine.precision=fp32")
    if cuda and "bf16" in (precision, cfg.cluster.feature_precision) and not torch.cuda.is_bf16_supported():
        raise PreflightError(f"bf16 (engine.precision={precision}, cluster.feature_precision="
                             f"{cfg.cluster.feature_precision}): {torch.cuda.get_device_name()} has no "
                             "bf16 support; use fp16 for engine.precision and fp32 for the feature pass")
    try:
        check_backend(cfg.data)
    except BackendUnavailable as err:
        raise PreflightError(str(err)) from None
    if cfg.cluster.search == "faiss-gpu":
        problem = faiss_gpu_problem(dist.device())
        if problem:
            raise PreflightError(f"cluster.search=faiss-gpu: cannot run here: {problem}; set "
                                 "cluster.search=auto (torch on the GPU) or install the gpu extra "
                                 "(README.md#gpu)")
    if cfg.cluster.feature_precision != "fp32" and not cuda:
        raise PreflightError(f"cluster.feature_precision={cfg.cluster.feature_precision}: needs a CUDA "
                             "GPU and this machine has none; set cluster.feature_precision=fp32")


def _cuda_usable() -> tuple[bool, str]:
    """(torch can use a GPU, why not where a driver is loaded but torch sees none). Hiding every
    GPU with an empty CUDA_VISIBLE_DEVICES is a choice, not a fault."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")
    if usable or hidden or not NVIDIA_DRIVER.exists():
        return usable, ""
    driver = NVIDIA_DRIVER.read_text(errors="replace").splitlines()[:1]
    reason = first_line(Warning(caught[0].message)) if caught else "torch.cuda.is_available() is False"
    return False, f"{reason} ({driver[0].strip() if driver else 'driver version unknown'})"


def _check_output_dir(output_dir: str) -> None:
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"run.output_dir={output_dir}: is a file, not a folder; choose another "
                             "run.output_dir")
    existing = nearest_existing(path)  # where the run folder would be made
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"run.output_dir={output_dir}: {existing} is not writable; choose a "
                             "run.output_dir you can write to")


def _shard_view(shards: str, found: RunInputs) -> str:
    """A digest of what this rank sees of the shards: the manifest and every read shard's size."""
    folder = Path(shards)
    digest = hashlib.sha256((folder / INFO_NAME).read_bytes())
    for manifest in (found.train, found.val):
        for shard in manifest.shards if manifest is not None else ():
            digest.update(f"{shard.name}:{(folder / shard.name).stat().st_size}".encode())
    return digest.hexdigest()
