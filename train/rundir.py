"""The run folder's lifecycle: one job at a time, fresh / continued / extended / moved / forked /
overwritten runs, the resolved config; stop signals (including the launcher's death); seeding.

What a second start in a used folder does:
  - the same config (only keys in `_MAY_DIFFER` changed, `run.output_dir` included, so a copied or
    moved folder continues): resume from the newest intact checkpoint (`run.resume=auto`);
  - `optim.epochs` raised: the run is extended (the cosine schedule is recomputed for the new length
    from the resumed epoch on, so the learning rate jumps up at the resume point);
  - another config: refused, pointing to `run.overwrite=true` (the old run's files are moved to
    `previous-<time>/` inside the folder, nothing is deleted) or another `run.output_dir`;
  - a finished run started again: nothing to do (see `train.loop`).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from core import dist
from core.cli import UserError
from core.config import Config, to_yaml
from core.files import write_text_atomic
from core.runfolder import CHECKPOINTS_DIR, CONFIG_FILE, LOGS_DIR, METRICS_FILE, TENSORBOARD_DIR, RunFolder

log = logging.getLogger(__name__)

# Keys that may change between a run and its continuation without making it a different run: where
# the folder is, how a restart finds its checkpoint, how often to log, save and evaluate, how many
# epochs in all (an extension), CPU threads, how long a collective may wait for a dead rank, and the
# hardware-only choices (a run may move between GPU and CPU hosts: the k-means search backend and
# batch give the same clusters up to float near-ties, cuDNN tuning and memory format the same model).
_MAY_DIFFER = ("run.output_dir", "run.resume", "run.overwrite", "run.log_every", "run.checkpoint_every",
               "run.keep_last", "run.wandb", "eval", "data.workers", "optim.epochs",
               "engine.collective_timeout_s", "engine.cudnn_benchmark", "engine.channels_last",
               "cluster.search", "cluster.feature_batch_size")
PREVIOUS_PREFIX = "previous-"
# Files of a run that `run.overwrite=true` moves out of the way (never deletes).
_RUN_FILES = (CONFIG_FILE, METRICS_FILE, LOGS_DIR, TENSORBOARD_DIR, CHECKPOINTS_DIR)


class RunDirError(UserError):
    """The run folder cannot be used as asked; the message says what to do."""


def _flatten(yaml_text: str) -> dict[str, object]:
    def walk(node, prefix=""):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from walk(value, name + ".")
            else:
                yield name, value
    return dict(walk(OmegaConf.to_container(OmegaConf.create(yaml_text))))


def config_differences(old_yaml: str, new_yaml: str) -> list[str]:
    """Keys whose values differ, ignoring those that may change on a continuation."""
    old, new = _flatten(old_yaml), _flatten(new_yaml)
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)
            and not any(k == p or k.startswith(p + ".") for p in _MAY_DIFFER)]


def prepare(cfg: Config) -> Path:
    """Take the folder for this job and write config.yaml (collective; rank 0 does the work).

    Raises:
        RunDirError: on every rank: the folder is in use, or holds another run.
    """
    run = RunFolder.at(cfg.run.output_dir)
    problem = None
    if dist.is_main():
        try:
            _prepare_on_main(cfg, run)
        except RunDirError as err:
            problem = str(err)
    problem = dist.broadcast_object(problem)
    if problem:
        raise RunDirError(problem)
    return run.root


def _prepare_on_main(cfg: Config, run: RunFolder) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    _LOCK.acquire(run)
    text = to_yaml(cfg)
    if cfg.run.overwrite:
        _move_previous_run(run)
    elif run.config.is_file():
        old = run.config.read_text()
        diff = config_differences(old, text)
        if diff:
            _LOCK.release()
            raise RunDirError(
                f"run.output_dir={run.root} holds a run with another config (differs at "
                f"{', '.join(diff[:5])}); add run.overwrite=true to start afresh there (its files move "
                f"to {PREVIOUS_PREFIX}<time>/, nothing is deleted), or choose another run.output_dir")
        old_epochs = OmegaConf.create(old).optim.epochs
        if old_epochs != cfg.optim.epochs:
            log.info("run.output_dir=%s: optim.epochs %s -> %s (the cosine schedule now spans %s epochs "
                     "from the resumed epoch on)", run.root, old_epochs, cfg.optim.epochs, cfg.optim.epochs)
    write_text_atomic(run.config, text)


def _move_previous_run(run: RunFolder) -> None:
    present = [name for name in _RUN_FILES if (run.root / name).exists()]
    if not present:
        return
    aside = run.root / f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for name in present:
        os.replace(run.root / name, aside / name)
    log.warning("run.overwrite=true: moved the previous run's %s to %s (nothing deleted)",
                ", ".join(present), aside)


def release() -> None:
    """Give up the run folder (end of the job; the lock also goes when the process dies)."""
    _LOCK.release()


class _RunLock:
    """An exclusive `flock` on the run folder's `.lock`, holding the owner's host and pid.

    The kernel releases it when the process dies, however it dies, so a dead job's lock is simply
    taken over; the file's text only tells the user who holds a live one.
    """

    def __init__(self) -> None:
        self._fd: int | None = None

    def acquire(self, run: RunFolder) -> None:
        if self._fd is not None:
            return
        fd = os.open(run.lock, os.O_RDWR | os.O_CREAT, 0o644)
        holder = os.read(fd, 200).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(f"run.output_dir={run.root}: in use by another job ({holder or 'unknown'}); "
                              "wait for it to end or stop it, or choose another run.output_dir") from None
        if holder:
            log.info("run.output_dir=%s: taking over the lock of a job that has ended (%s)", run.root, holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


_LOCK = _RunLock()


def stop_with_launcher() -> None:
    """Under torchrun or the deepspeed launcher, have the kernel send SIGTERM to this worker when
    its launcher process dies (Linux `PR_SET_PDEATHSIG`): a killed launcher must not leave
    workers training (and writing into the run folder) behind it. SIGTERM is `StopFlag`'s signal,
    so the worker saves a checkpoint at the next logging step where it can, and exits."""
    if not dist.launched() or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("could not ask to be stopped with the launcher (prctl errno %d)", ctypes.get_errno())
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def seed_everything(seed: int, *, per_rank: bool) -> None:
    """Seed python, numpy and torch. `per_rank=False` before building the model (every rank builds
    the same weights and queue); `per_rank=True` afterwards, so each rank draws its own selection
    masks, as independent processes do in the reference."""
    seed = seed + (1_000_003 * dist.rank() if per_rank else 0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop finishes the step, saves, and exits 0 (requeue-friendly)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping at the next safe point (a logging step, a feature batch or a "
                    "k-means iteration), then checkpoint and exit", self.signal_name)

    def any_rank(self) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks)."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        return bool(dist.all_reduce_sum(flag.to(dist.device())).item() > 0)
