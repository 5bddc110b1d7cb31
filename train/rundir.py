"""The run directory: guarded creation, the resolved config, stop signals, seeding."""

from __future__ import annotations

import logging
import random
import signal
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from core import dist
from core.config import Config, to_yaml
from core.files import write_text_atomic
from core.runfolder import RunFolder

log = logging.getLogger(__name__)

# Keys that may change between a run and its continuation without making it a different run.
_MAY_DIFFER = ("run.resume", "run.log_every", "eval", "data.workers")


class RunDirError(RuntimeError):
    """The run directory belongs to another run; the message says what to do."""


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
    """Create the run dir (rank 0) and write config.yaml; refuse a dir that holds another run."""
    run_dir = Path(cfg.run.output_dir)
    config_path = RunFolder.at(run_dir).config
    text = to_yaml(cfg)
    if dist.is_main():
        if config_path.is_file():
            diff = config_differences(config_path.read_text(), text)
            if diff:
                raise RunDirError(
                    f"run.output_dir {str(run_dir)!r} holds a run with a different config "
                    f"(differs at {', '.join(diff[:5])}); pick another run.output_dir or delete it")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(config_path, text)
    dist.barrier()
    return run_dir


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
        log.warning("%s received: finishing this step, then checkpoint and exit", self.signal_name)

    def any_rank(self) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks)."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        return bool(dist.all_reduce_sum(flag.to(dist.device())).item() > 0)
