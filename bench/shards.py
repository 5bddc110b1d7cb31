"""Benchmark: shard building, images/s, `hcsc-shards build` (1 and N workers) vs a naive packer.

The input is an ImageNet-like image folder made once from the 20 real ImageNet JPEGs of the foolbox
wheel: random crops re-encoded at about 500x375 (or 375x500) with qualities 75-95, 20 classes,
cached under ``bench/out/``. The naive baseline reads each file and writes it with
``webdataset.TarWriter`` (no checks, no shuffle, no index, no checksum, no fsync), in shards of the
same size; it runs as one process, and as N processes (N = our workers, ``--workers``, default 2),
each packing its contiguous share of the file list into its own tars, as a user with N cores would
split the job (``multiprocessing.Pool.starmap``). Ours copies the JPEGs without re-encoding, after
checking each one, and writes DALI indexes, checksums and the manifest. Like the baseline, the
headline runs do not fsync (``fsync=False``, the CLI's ``--no-fsync``): both leave the same bytes
in the page cache for the kernel to write back. The CLI default, which flushes the shards to disk
before writing the manifest, is reported beside it (``ours_N_workers_fsync``). Inputs are in the
page cache for every run (a warm-up read first), so this measures CPU cost, not the disk;
``cpu_us_per_image`` (user + system, workers included) shows the cost independently of how busy
the shared cores are. Goal: N workers >= 1.8x the naive baseline.

Two ratios, one JSON line each, with ``baseline_desc`` and ``equal_work``: ours with N workers
against the 1-process packer (``equal_work: false``: N processes against one), then, the headline
and last line, against the N-process packer (``equal_work: true``: the same processes and input,
the same image bytes into tars; the baseline skips our checks, index and checksums, which favours
it). Every line carries the command, the parameters and the machine (CPU model, cores, load
average at start).

Usage: ``python bench/shards.py`` (about 2 minutes on 2 cores), ``--smoke`` (seconds, checks that it
runs) or ``--full`` for the recorded numbers, which it also writes to bench/results/shards.json,
keyed by the code it measured (bench/_common.py).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before bench/: bench/shards.py shadows

import _common as common  # noqa: E402  (bench/_common.py)
import webdataset as wds  # noqa: E402
from realdata import foolbox_jpegs  # noqa: E402  (bench/realdata.py)

from shards.build import build_shards, start_method  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
GOAL = 1.8
CODE = (["shards", "core"], ["bench/shards.py", "bench/_common.py", "bench/realdata.py"])


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


def _pack(files: list[tuple[Path, int]], first: int, out: Path, prefix: str, per_shard: int) -> None:
    """The naive packer: read each file, write it with webdataset.TarWriter; keys count from `first`."""
    for s in range(0, len(files), per_shard):
        with open(out / f"{prefix}-{s // per_shard:06d}.tar", "wb") as f, wds.TarWriter(f) as sink:
            for i, (path, cls) in enumerate(files[s:s + per_shard], first + s):
                sink.write({"__key__": f"{i:012d}", "jpg": path.read_bytes(), "cls": cls})


def naive(root: Path, out: Path, per_shard: int, processes: int = 1) -> tuple[float, int]:
    """(images/s, images) of the naive packer in `processes` processes (1: in this process)."""
    start = time.perf_counter()
    files = files_of(root)
    if processes == 1:
        _pack(files, 0, out, "naive", per_shard)
    else:
        jobs = [(files[a:b], a, out, f"naive{p}", per_shard)
                for p, (a, b) in enumerate(common.contiguous_shares(len(files), processes))]
        # the start method our builder uses (fork on Linux), so neither side pays more to start
        with multiprocessing.get_context(start_method()).Pool(processes) as pool:
            pool.starmap(_pack, jobs)
    return len(files) / (time.perf_counter() - start), len(files)


def ours(root: Path, out: Path, per_shard: int, workers: int, fsync: bool) -> tuple[float, int]:
    start = time.perf_counter()
    entry = build_shards(f"imagefolder:{root}", out, samples_per_shard=per_shard, workers=workers,
                         fsync=fsync, show_progress=False)
    if entry.copied != entry.num_samples:  # not assert: the check must survive python -O
        raise SystemExit(f"bench/shards.py measures the copy path, but {entry.num_samples - entry.copied} "
                         "images were converted")
    return entry.num_samples / (time.perf_counter() - start), entry.num_samples


def timed(fn, *args) -> tuple[float, float]:
    """(images/s, CPU microseconds per image) of one run, pool workers included (getrusage counts
    them once the pool has joined them, before `fn` returns)."""
    cpu = common.cpu_seconds()
    rate, n = fn(*args)
    return rate, (common.cpu_seconds() - cpu) / n * 1e6


def fresh(name: str) -> Path:
    path = OUT / "shards_runs" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="5000 images, 5 rounds (recorded numbers)")
    mode.add_argument("--smoke", action="store_true",
                      help="500 images, 1 round: checks that it runs, not a figure")
    parser.add_argument("--workers", type=int, default=2,
                        help="our workers = the parallel packer's processes")
    args = parser.parse_args()
    host = common.machine()  # first: the load average the run starts under
    n, rounds, per_shard = (5000, 5, 250) if args.full else (500, 1, 125) if args.smoke else (3000, 5, 125)
    w = args.workers
    params = {"images": n, "rounds": rounds, "samples_per_shard": per_shard, "workers": w,
              "smoke": args.smoke}
    key = common.code_key(*CODE, extra=params)  # the code as the run starts; compared again at the end
    root = make_folder(n)
    for path, _ in files_of(root):  # warm the page cache: every run reads from memory
        path.read_bytes()
    runs = {"naive_1": (naive, root, "n1", per_shard, 1), f"naive_{w}": (naive, root, "nw", per_shard, w),
            "ours_1": (ours, root, "o1", per_shard, 1, False),
            f"ours_{w}": (ours, root, "ow", per_shard, w, False),
            f"ours_{w}_fsync": (ours, root, "owf", per_shard, w, True)}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    cpus: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):  # interleaved, so drifting load from other jobs hits every side
        for name, (fn, src, out, *rest) in runs.items():
            rate, cpu = timed(fn, src, fresh(out), *rest)
            rates[name].append(rate)
            cpus[name].append(cpu)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} images/s ({cpus[k][-1]:.0f} us CPU/image)"
                                         for k, v in rates.items()), flush=True)
    shutil.rmtree(OUT / "shards_runs", ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    naive_desc = ("naive packer (read file, webdataset.TarWriter; no checks, shuffle, index, checksum or "
                  "fsync)")
    lines = [("vs_naive_1_process", "naive_1", False, f"{naive_desc} in 1 process; ours has {w}"),
             (f"vs_naive_{w}_processes", f"naive_{w}", True,
              f"{naive_desc} in {w} processes, each its contiguous share of the files (Pool.starmap); "
              f"ours does more work per image (checks, index, checksums)")]
    records = []
    for row, base, equal, desc in lines:
        ours_w = med[f"ours_{w}"]
        ratio = ours_w / med[base]
        records.append({
            "bench": "shards", "row": row, "ours": round(ours_w, 1), "baseline": round(med[base], 1),
            "unit": "images/s", "ratio": round(ratio, 3), "goal": GOAL, "meets_goal": ratio >= GOAL,
            "ours_desc": f"hcsc-shards build, copy path, {w} workers, no fsync (as the baseline)",
            "baseline_desc": desc, "equal_work": equal,
            "cpu_ratio": round(cpu[base] / cpu[f"ours_{w}"], 3),
            "ours_1_worker": round(med["ours_1"], 1),
            "ours_1_worker_vs_naive_1": round(med["ours_1"] / med["naive_1"], 3),
            f"ours_{w}_workers_fsync": round(med[f"ours_{w}_fsync"], 1),
            "images_per_s": {k: round(v, 1) for k, v in med.items()},
            "cpu_us_per_image": {k: round(v, 1) for k, v in cpu.items()},
            **params, "command": common.command(), "machine": host})
    record = {"bench": "shards", "command": common.command(), "machine": host, "records": records}
    if args.full and not common.record_run("shards", key, CODE, params, record):
        return
    for rec in records:  # the equal-work comparison is the last line, the headline
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
