"""One setup call for logs and metrics.

Rank 0 logs to stdout; every rank logs to its `logs/rank{r}.log` in the run folder; rank 0 appends
metrics to `metrics.jsonl` (one JSON object per line) and to TensorBoard when it is installed;
progress bars show on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from core import dist
from core.runfolder import RunFolder

_FORMAT = "%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"


def setup_logging(run_dir: str | Path | None, *, rank: int | None = None, level: int = logging.INFO,
                  console: TextIO | None = None) -> None:
    """Configure the root logger for this process (idempotent: replaces earlier handlers).

    `console` is rank 0's console stream: stdout by default; the CLIs whose stdout is their
    result (`hcsc-eval`'s JSON, `hcsc-shards`' summary) pass stderr.
    """
    rank = dist.rank() if rank is None else rank
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    formatter = logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    if rank == 0:
        stream = logging.StreamHandler(console or sys.stdout)
        stream.setFormatter(formatter)
        root.addHandler(stream)
    if run_dir is not None:
        log_file = RunFolder.at(run_dir).rank_log(rank)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    # Libraries that log chatty INFO lines on every rank.
    for name in ("DeepSpeed", "deepspeed", "compilers", "distutils", "faiss.loader"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # torch warns "No CUDA runtime is found" on every CPU start where a CUDA toolkit is installed;
    # DeepSpeed's import triggers it, and it says nothing about this run.
    logging.getLogger("torch.utils.cpp_extension").setLevel(max(level, logging.ERROR))


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on rank 0; a silent pass-through elsewhere."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not dist.is_main() or kwargs.pop("disable", False), **kwargs)


class MetricsWriter:
    """Appends metric records to `metrics.jsonl` (and TensorBoard) on rank 0; no-op elsewhere."""

    def __init__(self, run_dir: str | Path, *, enabled: bool | None = None,
                 tensorboard: bool = True) -> None:
        self.enabled = dist.is_main() if enabled is None else enabled
        self.path = RunFolder.at(run_dir).metrics
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self._tb = _tensorboard_writer(RunFolder.at(run_dir).tensorboard)

    def write(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        """One record: {"kind", "step", "time", **values}; floats must be finite or are nulled."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("kind", "step", "time") and isinstance(v, int | float):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; a bare env still logs jsonl
        logging.getLogger(__name__).warning("tensorboard not installed: metrics go to jsonl only")
        return None
    return SummaryWriter(log_dir=str(path))
