"""The on-disk layout of a run folder: the one place that knows its file names.

    RUN/
      config.yaml                 the resolved config (written once the run starts)
      metrics.jsonl               one JSON record per line (rank 0)
      logs/rank{r}.log            every rank's log
      tb/                         TensorBoard events (rank 0)
      checkpoints/
        latest                    the tag of the newest complete checkpoint (replaced last)
        <tag>/                    epoch{EEEE}-batch{BBBBBB}: DeepSpeed state (mp_rank_00_model_states.pt,
                                  optimizer partitions), rng_rank{r}.pt, hcsc_official.pth.tar,
                                  files.json (every file's size: the integrity check)
        .tmp-<tag>/               a save in progress (renamed to <tag> when every rank finished)
        .damaged-<tag>-<time>/    a damaged checkpoint, moved aside (never deleted) by a later save
      .lock                       held by the live job (host, pid); released when it exits

The trainer writes this layout (`train.checkpoint`, `train.rundir`, `core.logs`); `hcsc-eval`
reads it (`evaluate.checkpoints`). Paths are always relative to the folder, so a run folder can
be copied or moved and still resolves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOGS_DIR = "logs"
TENSORBOARD_DIR = "tb"
CHECKPOINTS_DIR = "checkpoints"
POINTER = "latest"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = ".damaged-"  # a damaged checkpoint moved aside when a new save reaches its tag
FILES_LISTING = "files.json"  # in each checkpoint folder: every file's size, written last
LOCK_FILE = ".lock"  # held by the job that trains in this folder (host and pid inside)
DS_MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's name for the module state, rank 0
OFFICIAL_FILE = "hcsc_official.pth.tar"  # the official key layout (docs/method.md §8)


def make_tag(epoch: int, batch_in_epoch: int) -> str:
    """A checkpoint's folder name; sorts in training order."""
    return f"epoch{epoch:04d}-batch{batch_in_epoch:06d}"


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder (nothing is created or read on construction)."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> RunFolder:
        return cls(Path(root))

    @classmethod
    def of_checkpoint(cls, tag_dir: str | os.PathLike) -> RunFolder | None:
        """The run folder holding checkpoint folder `tag_dir` (None for a folder elsewhere)."""
        tag_dir = Path(tag_dir)
        return cls(tag_dir.parent.parent) if tag_dir.parent.name == CHECKPOINTS_DIR else None

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def pointer(self) -> Path:
        return self.checkpoints / POINTER

    def checkpoint(self, tag: str) -> Path:
        return self.checkpoints / tag

    def latest_tag(self) -> str | None:
        """The tag `latest` names, when that folder exists."""
        if not self.pointer.is_file():
            return None
        tag = self.pointer.read_text().strip()
        return tag if tag and self.checkpoint(tag).is_dir() else None

    def latest_checkpoint(self) -> Path | None:
        tag = self.latest_tag()
        return self.checkpoint(tag) if tag else None

    def complete_tags(self) -> list[str]:
        """Every checkpoint folder that is not a save in progress or moved aside, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir() if p.is_dir() and not p.name.startswith("."))


def rng_file(tag_dir: Path, rank: int) -> Path:
    """One rank's RNG states inside a checkpoint folder."""
    return tag_dir / f"rng_rank{rank}.pt"
