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
    """Appends metric records to `metrics.jsonl`, TensorBoard and (optionally) Weights & Biases on
    rank 0; a no-op elsewhere.

    A record is ``{"kind", "step", "time", **values}``. Its scalars become TensorBoard tags
    ``<kind>/<key><suffix>`` (the suffix tells apart records of one kind at one step, e.g. the
    levels of a `cluster` record) and W&B keys of the same name.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool | None = None, tensorboard: bool = True,
                 wandb: Any = None, config: Mapping[str, Any] | None = None) -> None:
        self.enabled = dist.is_main() if enabled is None else enabled
        run = RunFolder.at(run_dir)
        self.path = run.metrics
        self._tb = None
        self._wandb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self._tb = _tensorboard_writer(run.tensorboard)
            if wandb is not None and wandb.enabled:
                self._wandb = _wandb_run(run, wandb, dict(config or {}))

    def write(self, kind: str, step: int, values: Mapping[str, Any], *, tag_suffix: str = "") -> None:
        """One record; floats must be finite or are written as null."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"{kind}/{k}{tag_suffix}": v for k, v in record.items()
                   if k not in ("kind", "step", "time") and isinstance(v, int | float)
                   and not isinstance(v, bool)}
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, int(step))
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=int(step))

    def text(self, tag: str, text: str) -> None:
        """A text panel (TensorBoard renders Markdown)."""
        if self._tb is not None:
            self._tb.add_text(tag, text, 0)

    def images(self, tag: str, grid: Any, step: int) -> None:
        """An image (CHW float in [0, 1], e.g. a `torchvision.utils.make_grid`)."""
        if self._tb is not None:
            self._tb.add_image(tag, grid, int(step))
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(grid.permute(1, 2, 0).numpy())}, step=int(step))

    def histogram(self, tag: str, values: Any, step: int) -> None:
        if self._tb is not None:
            self._tb.add_histogram(tag, values, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every readable record of a metrics.jsonl, in file order ([] when there is no such file); a line
    cut short by a kill, or not JSON at all, is skipped."""
    path = Path(path)
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_records(run_dir: str | Path, kind: str, *, since_step: int = 0) -> list[dict[str, Any]]:
    """The records of one kind in a run folder's metrics.jsonl, at or after `since_step`."""
    return [r for r in read_jsonl(RunFolder.at(run_dir).metrics)
            if r.get("kind") == kind and r.get("step", -1) >= since_step]


def config_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts (for W&B's run config)."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.structured(cfg)))  # type: ignore[arg-type]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _wandb_run(run: RunFolder, settings: Any, config: dict[str, Any]):
    """A W&B run for this run folder (`run.wandb`); None, with one line saying why, when wandb is not
    installed. Offline runs are written under the run folder (`wandb sync` uploads them later)."""
    try:
        import wandb
    except ImportError:
        logging.getLogger(__name__).warning(
            "run.wandb.enabled=true but the wandb package is not installed (pip install 'hcsc[wandb]'): "
            "metrics go to metrics.jsonl and TensorBoard only")
        return None
    return wandb.init(project=settings.project, entity=settings.entity or None,
                      name=settings.name or run.root.resolve().name, mode=settings.mode,
                      dir=str(run.root), config=config)


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; a bare env still logs jsonl
        logging.getLogger(__name__).warning("tensorboard not installed: metrics go to jsonl only")
        return None
    return SummaryWriter(log_dir=str(path))
