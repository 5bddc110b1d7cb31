"""Atomic, resumable checkpoints in the run folder's `checkpoints/` (layout: `core.runfolder`).

A checkpoint folder holds the DeepSpeed checkpoint (model incl. momentum encoder and queue buffers,
optimizer, ZeRO partitions), our client state under fixed keys (`format_version`, `epoch`,
`batch_in_epoch`, `global_step`, `config_yaml`, `prototypes`), one RNG file per rank, and the
official-layout copy for the official evaluation scripts (docs/method.md §8).
A save writes into `.tmp-<tag>/` and renames it when every rank has finished, then moves the
pointer; a kill at any moment leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.prototypes import Prototypes
from core import dist
from core.cli import UserError
from core.errors import first_line
from core.files import write_json_atomic, write_text_atomic
from core.runfolder import (
    DAMAGED_PREFIX,
    DS_MODEL_FILE,
    FILES_LISTING,
    OFFICIAL_FILE,
    POINTER,
    TMP_PREFIX,
    RunFolder,
    make_tag,
    rng_file,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# A new checkpoint is about as large as the previous one; ask for this much more, for the slack
# of a grown client state and of the file system's blocks.
FREE_SPACE_MARGIN = 1.1


class CheckpointChoiceError(UserError):
    """`run.resume` names a folder that is not an intact checkpoint."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact and the message says what to do."""


@dataclass
class ResumePoint:
    """Where training continues: the first batch not yet trained, and the epoch's prototypes."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    prototypes: Prototypes | None = None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str | Path, point: ResumePoint, *, config_yaml: str, keep_last: int,
         official_state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Save on every rank (collective). Returns the tag."""
    root = RunFolder.at(run_dir).checkpoints
    tag = make_tag(point.epoch, point.batch_in_epoch)
    tmp_tag = TMP_PREFIX + tag
    refusal = None
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
        refusal = _free_space_refusal(root)
    refusal = dist.broadcast_object(refusal)  # every rank stops together, none waits at a barrier
    if refusal:
        raise CheckpointWriteError(refusal)
    client_state = {"format_version": FORMAT_VERSION, "epoch": point.epoch,
                    "batch_in_epoch": point.batch_in_epoch, "global_step": point.global_step,
                    "config_yaml": config_yaml,
                    "prototypes": _prototypes_state(point.prototypes)}
    try:
        engine.save(str(root), tmp_tag, client_state)
        torch.save(_rng_state(), rng_file(root / tmp_tag, dist.rank()))
        if dist.is_main() and official_state_dict is not None:
            torch.save({"epoch": point.epoch, "state_dict": official_state_dict},
                       root / tmp_tag / OFFICIAL_FILE)
    except (OSError, RuntimeError) as err:
        # torch reports a full disk as a RuntimeError ("iostream error", "unexpected pos"); the
        # half-written folder goes at once, so that it does not keep the disk full.
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
        raise CheckpointWriteError(_write_failure(root, tag, err)) from err
    dist.barrier()  # every rank's files are on disk before the rename publishes them
    if dist.is_main():
        _write_listing(root / tmp_tag)
        _clear_tag(root, tag)
        os.replace(root / tmp_tag, root / tag)
        _write_pointer(root, tag)
        _prune(root, keep_last)
        log.info("checkpoint saved: %s", root / tag)
    dist.barrier()
    return tag


def _write_listing(tag_dir: Path) -> None:
    """Every file of the checkpoint with its size, written last: what `damage` checks."""
    sizes = {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*")) if f.is_file()}
    write_json_atomic(tag_dir / FILES_LISTING, sizes)


def _clear_tag(root: Path, tag: str) -> None:
    """Make room for a new save under `tag`: an intact old one goes, a damaged one is moved aside."""
    if not (root / tag).exists():
        return
    reason = damage(root / tag)
    if reason is None:
        shutil.rmtree(root / tag, ignore_errors=True)
        return
    aside = root / f"{DAMAGED_PREFIX}{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(root / tag, aside)
    log.warning("%s was damaged (%s): moved aside to %s, not deleted", root / tag, reason, aside.name)


def damage(tag_dir: Path) -> str | None:
    """Why the checkpoint folder `tag_dir` cannot be resumed from (one phrase), or None when intact.

    Checks the sizes in its ``files.json`` (every file present, none truncated); a folder written
    before that listing existed is checked by opening each torch file's zip directory, which a
    truncated file has lost.
    """
    if not (tag_dir / DS_MODEL_FILE).is_file():
        return f"{DS_MODEL_FILE} is missing"
    listing = tag_dir / FILES_LISTING
    if listing.is_file():
        try:
            sizes = json.loads(listing.read_text())
        except (OSError, ValueError):
            return f"{FILES_LISTING} is unreadable"
        for name, size in sizes.items():
            path = tag_dir / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
        return None
    for path in sorted(tag_dir.glob("*.pt")):
        if not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or not a torch file"
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _free_space_refusal(root: Path) -> str | None:
    """Why the next save would not fit, judged by the size of the previous checkpoint (None: fits).

    The first save has nothing to judge by and is not refused; a failed write still says why."""
    previous = RunFolder.at(root.parent).latest_tag()
    if previous is None:
        return None
    need = _folder_bytes(root / previous) * FREE_SPACE_MARGIN
    free = shutil.disk_usage(root).free
    if free >= need:
        return None
    return (f"{root}: {free / 2**20:.0f} MiB free, but a checkpoint needs about {need / 2**20:.0f} MiB; "
            f"{_what_remains(root)}")


def _write_failure(root: Path, tag: str, err: BaseException) -> str:
    free = shutil.disk_usage(root).free
    reason = first_line(err)
    return (f"{root / tag}: writing the checkpoint failed ({reason}) with {free / 2**20:.0f} MiB free "
            f"on that disk; {_what_remains(root)}")


def _what_remains(root: Path) -> str:
    """The end of both disk-space messages: what is still there, and the way out."""
    previous = RunFolder.at(root.parent).latest_tag()
    kept = f"the last one, {previous}, is intact" if previous else "no earlier checkpoint exists"
    return (f"{kept}. Free space there or set run.output_dir to a larger disk, then resume with "
            "run.resume=auto")


def _write_pointer(root: Path, tag: str) -> None:
    write_text_atomic(root / POINTER, tag + "\n")


def _prune(root: Path, keep_last: int) -> None:
    for stale in RunFolder.at(root.parent).complete_tags()[:-keep_last]:
        shutil.rmtree(root / stale, ignore_errors=True)
    for leftover in root.glob(TMP_PREFIX + "*"):
        if leftover.is_dir():  # a save killed half-way; never pointed to
            shutil.rmtree(leftover, ignore_errors=True)


def _prototypes_state(prototypes: Prototypes | None) -> dict | None:
    """The epoch's prototypes with the raw centroids that `cluster.warm_start` starts from, so a
    resumed run clusters exactly as the uninterrupted one would."""
    return None if prototypes is None else prototypes.state_dict()


def _prototypes_from_state(state: dict | None, device: torch.device) -> Prototypes | None:
    return None if state is None else Prototypes.from_state_dict(state).to(device)


def resolve(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint folder to resume from for `run.resume` (auto | none | path), or None.

    ``auto`` takes the newest intact checkpoint of `run_dir`, and names every newer one that is
    damaged (nothing is deleted). A path must be an intact checkpoint folder.

    Raises:
        CheckpointChoiceError: a path that is not a checkpoint folder, or a damaged one.
    """
    if resume == "none":
        return None
    run = RunFolder.at(run_dir)
    if resume == "auto":
        for tag in reversed(run.complete_tags()):
            reason = damage(run.checkpoint(tag))
            if reason is None:
                return run.checkpoint(tag)
            log.warning("checkpoint %s is damaged (%s); falling back to an older one",
                        run.checkpoint(tag), reason)
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointChoiceError(f"run.resume={resume}: no such checkpoint folder; pass a folder like "
                                    f"{run.checkpoints}/<tag>, or run.resume=auto")
    reason = damage(path)
    if reason is not None:
        raise CheckpointChoiceError(f"run.resume={resume}: damaged checkpoint ({reason}); pass another "
                                    "checkpoint folder, or run.resume=auto for the newest intact one")
    return path


def load(engine, path: Path, device: torch.device) -> tuple[ResumePoint, str]:
    """Load a checkpoint on every rank; returns the resume point and the saved config YAML."""
    client_state = engine.load(str(path.parent), path.name)
    version = client_state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {version!r}, "
                         f"this trainer reads {FORMAT_VERSION}")
    rng_path = rng_file(path, dist.rank())
    if rng_path.is_file():
        _set_rng_state(torch.load(rng_path, weights_only=False))
    else:
        log.warning("%s missing (world size changed?): RNG streams restart from the seed", rng_path)
    protos = client_state.get("prototypes")
    point = ResumePoint(epoch=client_state["epoch"], batch_in_epoch=client_state["batch_in_epoch"],
                        global_step=client_state["global_step"],
                        prototypes=_prototypes_from_state(protos, device))
    log.info("resumed from %s: epoch %d, batch %d", path, point.epoch, point.batch_in_epoch)
    return point, client_state["config_yaml"]
