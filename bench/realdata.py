"""Real images shared by the benchmarks: the 20 ImageNet JPEGs the foolbox wheel ships (read as
files, never imported), the raw material for ImageNet-sized test folders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def foolbox_jpegs() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        sys.exit("foolbox is not installed: run scripts/setup.sh (pip install --no-deps foolbox)")
    return sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))
