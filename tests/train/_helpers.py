"""Running `hcsc-train` as a user does (a subprocess through the real CLI) and reading its records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "debug_losses.json"
DEBUG = ROOT / "configs" / "debug.yaml"


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def train_command(shards: Path, run_dir: Path, *overrides: str, ranks: int = 1,
             launcher: str = "torchrun") -> list[str]:
    args = ["--config", str(DEBUG), f"data.shards={shards}", f"run.output_dir={run_dir}", *overrides]
    if ranks == 1:
        return [sys.executable, "-m", "train.cli", *args]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), f"--num_gpus={ranks}",
                f"--master_port={free_port()}", "--module", "train.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}", "-m", "train.cli", *args]


def train_cli(shards, run_dir, *overrides, ranks=1, launcher="torchrun",
           timeout=600) -> subprocess.CompletedProcess:
    cmd = train_command(shards, run_dir, *overrides, ranks=ranks, launcher=launcher)
    proc = subprocess.run(cmd, env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run re-logs the steps it repeats)."""
    return {r["step"]: r["loss"] for r in records(run_dir)}


