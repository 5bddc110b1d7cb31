"""Repository rules that keep the design honest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["shards", "pipeline", "model", "cluster", "train", "evaluate", "bench"]
ALLOWED = {Path("core/dist.py"), Path("train/engine.py")}
DIST_USE = re.compile(r"torch\.distributed|from torch import distributed")


def test_torch_distributed_only_in_dist_and_engine():
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel not in ALLOWED and DIST_USE.search(path.read_text()):
                offenders.append(str(rel))
    assert not offenders, f"torch.distributed used outside core/dist.py and train/engine.py: {offenders}"


@pytest.mark.parametrize("script", ["hcsc-train", "hcsc-shards", "hcsc-eval"])
def test_console_scripts_have_help(script):
    exe = Path(sys.executable).parent / script
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
