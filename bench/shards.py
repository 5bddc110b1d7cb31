"""Benchmark: shard building, images/s, `hcsc-shards build` (1 and 2 workers) vs a naive packer.

The input is an ImageNet-like image folder made once from the 20 real ImageNet JPEGs of the foolbox
wheel: random crops re-encoded at about 500x375 (or 375x500) with qualities 75-95, 20 classes,
cached under ``bench/out/``. The naive baseline is one process that reads each file and writes it
with ``webdataset.TarWriter`` (no checks, no shuffle, no index, no checksum, no fsync), in shards of
the same size. Ours copies the JPEGs without re-encoding, after checking each one, and writes DALI
indexes, checksums and the manifest. Like the baseline, the headline run does not fsync
(``fsync=False``, the CLI's ``--no-fsync``): both leave the same bytes in the page cache for the
kernel to write back. The CLI default, which flushes the shards to disk before writing the
manifest, is reported beside it (``ours_2_workers_fsync``). Inputs are in the page cache for every
run (a warm-up read first), so this measures CPU cost, not the disk; ``cpu_us_per_image`` (user +
system, workers included) shows the cost independently of how busy the shared cores are.
Goal: 2 workers >= 1.8x the naive baseline.

Usage: ``python bench/shards.py`` (about 2 minutes on 2 cores) or ``--full`` for the recorded numbers.
The last line of output is one JSON object (docs/architecture.md#benchmarks).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402
from realdata import foolbox_jpegs  # noqa: E402  (bench/realdata.py)

from shards.build import build_shards  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def make_folder(n: int) -> Path:
    """n ImageNet-sized JPEGs in 20 class folders, made once and cached."""
    root = OUT / f"shards_src_{n}"
    done = OUT / f"shards_src_{n}.complete"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    sources = [Image.open(p).convert("RGB") for p in foolbox_jpegs()]
    for i in range(n):
        k = i % len(sources)
        img = sources[k]
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        scale = rng.uniform(0.45, 1.0)
        cw = int(img.width * scale)
        ch = min(int(cw * h / w), img.height)
        x, y = rng.integers(0, img.width - cw + 1), rng.integers(0, img.height - ch + 1)
        crop = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / f"n{k:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
        (folder / f"n{k:08d}_{i}.JPEG").write_bytes(buf.getvalue())
    done.touch()
    return root


def files_of(root: Path) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(p, c) for c, name in enumerate(classes) for p in sorted((root / name).iterdir())]


def naive(root: Path, out: Path, per_shard: int) -> float:
    """The baseline: read each file, write it with webdataset.TarWriter; images/s."""
    start = time.perf_counter()
    files = files_of(root)
    for s in range(0, len(files), per_shard):
        with open(out / f"naive-{s // per_shard:06d}.tar", "wb") as f, wds.TarWriter(f) as sink:
            for i, (path, cls) in enumerate(files[s:s + per_shard], s):
                sink.write({"__key__": f"{i:012d}", "jpg": path.read_bytes(), "cls": cls})
    return len(files) / (time.perf_counter() - start), len(files)


def ours(root: Path, out: Path, per_shard: int, workers: int, fsync: bool) -> float:
    start = time.perf_counter()
    entry = build_shards(f"imagefolder:{root}", out, samples_per_shard=per_shard, workers=workers,
                         fsync=fsync, show_progress=False)
    assert entry["copied"] == entry["num_samples"], "the benchmark measures the copy path"
    return entry["num_samples"] / (time.perf_counter() - start), entry["num_samples"]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args) -> tuple[float, float]:
    """(images/s, CPU microseconds per image) of one run."""
    cpu = cpu_seconds()
    rate, n = fn(*args)
    return rate, (cpu_seconds() - cpu) / n * 1e6


def fresh(name: str) -> Path:
    path = OUT / "shards_runs" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="5000 images, 5 rounds (recorded numbers)")
    args = parser.parse_args()
    n, rounds, per_shard = (5000, 5, 250) if args.full else (3000, 5, 125)
    root = make_folder(n)
    for path, _ in files_of(root):  # warm the page cache: every run reads from memory
        path.read_bytes()
    runs = {"naive": (naive, root, "naive", per_shard), "ours_1": (ours, root, "o1", per_shard, 1, False),
            "ours_2": (ours, root, "o2", per_shard, 2, False),
            "ours_2_fsync": (ours, root, "o2f", per_shard, 2, True)}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    cpus: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for name, (fn, src, out, *rest) in runs.items():
            rate, cpu = timed(fn, src, fresh(out), *rest)
            rates[name].append(rate)
            cpus[name].append(cpu)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} images/s ({cpus[k][-1]:.0f} us CPU/image)"
                                         for k, v in rates.items()), flush=True)
    shutil.rmtree(OUT / "shards_runs", ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    ratio = med["ours_2"] / med["naive"]
    print(json.dumps({"bench": "shards", "ours": round(med["ours_2"], 1), "baseline": round(med["naive"], 1),
                      "unit": "images/s", "ratio": round(ratio, 3), "goal": 1.8, "meets_goal": ratio >= 1.8,
                      "ours_1_worker": round(med["ours_1"], 1),
                      "ours_2_workers_fsync": round(med["ours_2_fsync"], 1),
                      "cpu_us_per_image": {k: round(v, 1) for k, v in cpu.items()},
                      "load_avg_1min": round(os.getloadavg()[0], 2), "cores": os.cpu_count(),
                      "images": n, "samples_per_shard": per_shard, "rounds": rounds}))


if __name__ == "__main__":
    main()
