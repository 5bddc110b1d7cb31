"""Benchmark: shard building, images/s, `hcsc-shards build` (1 and 2 workers) vs a naive packer.

The input is an ImageNet-like image folder made once from the 20 real ImageNet JPEGs of the foolbox
wheel: random crops re-encoded at about 500x375 (or 375x500) with qualities 75-95, 20 classes,
cached under ``bench/out/``. The naive baseline is one process that reads each file and writes it
with ``webdataset.TarWriter`` (no checks, no shuffle, no index, no checksum, no fsync), in shards of
the same size. Ours copies the JPEGs without re-encoding, after checking each one, and writes DALI
indexes, checksums and the manifest. Inputs are in the page cache for every run (a warm-up read
first), so this measures CPU cost, not the disk. Goal: 2 workers >= 1.8x the naive baseline.

Usage: ``python bench/shards.py`` (about 2 minutes on 2 cores) or ``--full`` for the recorded numbers.
The last line of output is one JSON object (design.md section 5).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402

from shards.build import build_shards  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def foolbox_jpegs() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        sys.exit("foolbox not installed: run scripts/setup.sh (pip install --no-deps foolbox)")
    return sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))


def make_folder(n: int) -> Path:
    """n ImageNet-sized JPEGs in 20 class folders, made once and cached."""
    root = OUT / f"shards_src_{n}"
    done = root / ".complete"
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
    return len(files) / (time.perf_counter() - start)


def ours(root: Path, out: Path, per_shard: int, workers: int, fsync: bool) -> float:
    start = time.perf_counter()
    entry = build_shards(f"imagefolder:{root}", out, samples_per_shard=per_shard, workers=workers,
                         fsync=fsync, show_progress=False)
    assert entry["copied"] == entry["num_samples"], "the benchmark measures the copy path"
    return entry["num_samples"] / (time.perf_counter() - start)


def fresh(name: str) -> Path:
    path = OUT / "shards_runs" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="5000 images, 3 rounds (recorded numbers)")
    args = parser.parse_args()
    n, rounds, per_shard = (5000, 3, 250) if args.full else (2000, 2, 125)
    root = make_folder(n)
    for path, _ in files_of(root):  # warm the page cache: every run reads from memory
        path.read_bytes()
    results: dict[str, list[float]] = {"naive": [], "ours_1": [], "ours_2": [], "ours_2_nofsync": []}
    for r in range(rounds):
        results["naive"].append(naive(root, fresh("naive"), per_shard))
        results["ours_1"].append(ours(root, fresh("ours1"), per_shard, 1, True))
        results["ours_2"].append(ours(root, fresh("ours2"), per_shard, 2, True))
        results["ours_2_nofsync"].append(ours(root, fresh("ours2n"), per_shard, 2, False))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()), flush=True)
    shutil.rmtree(OUT / "shards_runs", ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["ours_2"] / med["naive"]
    print(json.dumps({"bench": "shards", "ours": round(med["ours_2"], 1), "baseline": round(med["naive"], 1),
                      "unit": "images/s", "ratio": round(ratio, 3), "goal": 1.8, "meets_goal": ratio >= 1.8,
                      "ours_1_worker": round(med["ours_1"], 1),
                      "ours_2_workers_no_fsync": round(med["ours_2_nofsync"], 1),
                      "images": n, "samples_per_shard": per_shard, "rounds": rounds}))


if __name__ == "__main__":
    main()
