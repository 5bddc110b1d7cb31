"""Pipeline throughput: our default loader against the better of two loaders doing the same work.

Every loader reads the same WebDataset shards (ImageNet-like JPEGs, see `make_images`), produces
the same MoCo v2 "aug+" views of method.md §5.3 as normalised float CHW tensors, and gets the
same number of workers:

- ours: `pipeline.build_loader` with the default `DataConfig` (DALI, CPU mode, `workers` threads).
- ref_pil: the reference loader (`data.backend=torch`: webdataset + torchvision v1 PIL transforms,
  a DataLoader with `workers` processes), the official HCSC recipe.
- tv2: what a competent user would write today: webdataset, `torchvision.io.decode_jpeg` and
  `torchvision.transforms.v2` on uint8 tensors (RandomResizedCrop with antialias, ColorJitter,
  RandomGrayscale, GaussianBlur sigma 0.1-2.0 with p 0.5, flip, ToDtype + Normalize), in a
  DataLoader with `workers` processes.

The headline ratio is against the BETTER baseline, separately on wall time and on CPU time
(`equal_work: true`). `data.fast_augment=true` (the cheaper DALI graph, which deviates from the
recipe) is a separate row marked `equal_work: false`; it is skipped with a message when this
version of core/config.py has no such key.

Wall: images/s over one epoch, from building the loader to the last batch's arrival. CPU: user +
system of this process (DALI's threads) and of its workers (getrusage once they are joined) over
the same epoch, per image. Both include start-up on every side (see `measure`); the rate after
the first batch and the time to it are recorded beside them.

Usage: python bench/pipeline.py [--smoke | --full] [--profile] [--workers N]. Every line of JSON
carries the command, the machine (CPU model, cores, load average at start) and `baseline_desc`;
the last line is the two-view headline. `--full` also writes bench/results/pipeline.json, keyed by
the code it measured (bench/_common.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/: bench/pipeline.py must not shadow the package

import _common as common  # noqa: E402  (bench/_common.py)
from realdata import foolbox_jpegs  # noqa: E402  (bench/realdata.py)

from core.config import DataConfig  # noqa: E402
from pipeline import augment as aug  # noqa: E402
from pipeline import build_loader, dali_graph  # noqa: E402
from pipeline.plan import load_shards  # noqa: E402
from shards.build import build_shards  # noqa: E402

OUT = ROOT / "bench" / "out" / "pipeline"
SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 500), (500, 500), (640, 480)]
GOAL = 2.0
# 64 per tar, so the tv2 baseline's workers (one stream of whole tars each, as WebDataset splits
# them) get equal shares: with 256 per tar, 384 images would give one worker twice the other's.
SAMPLES_PER_SHARD = 64
# torchvision's GaussianBlur takes a fixed kernel; 13 = 2 * ceil(3 * 2.0) + 1 covers 3 sigma at the
# recipe's largest sigma, as PIL's blur (the reference) does.
TV2_BLUR_KERNEL = 2 * math.ceil(3 * aug.SIGMA[1]) + 1
FAST = "data.fast_augment=true"
CODE = (["pipeline", "core", "shards"], ["bench/pipeline.py", "bench/_common.py", "bench/realdata.py"])
DESC = {"ours": "pipeline.build_loader default (DALI CPU, {w} threads)",
        "ours_fast": "pipeline.build_loader with data.fast_augment=true (DALI CPU, {w} threads)",
        "ref_pil": "reference loader: webdataset + torchvision v1 PIL transforms, DataLoader {w} workers",
        "tv2": "webdataset + torchvision.io.decode_jpeg + transforms.v2 on uint8, DataLoader {w} workers"}
BASELINES = ("ref_pil", "tv2")


def make_images(n: int) -> Path:
    """`n` ImageNet-like JPEGs in an ImageFolder (20 classes, one per source photo); cached."""
    folder = OUT / f"imagefolder-{n}"
    if len(list(folder.glob("*/*.jpg"))) == n:
        return folder
    rng = np.random.default_rng(0)
    sources = [Image.open(p).convert("RGB") for p in foolbox_jpegs()]
    for k in range(n):
        src = sources[k % len(sources)]
        w, h = SIZES[rng.integers(len(SIZES))]
        frac = rng.uniform(0.6, 1.0)  # a random window of the source, at the target aspect
        cw = int(min(src.width, src.height * w / h) * frac)
        ch = int(cw * h / w)
        x, y = rng.integers(0, src.width - cw + 1), rng.integers(0, src.height - ch + 1)
        img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        path = folder / f"c{k % len(sources):02d}" / f"{k:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
    return folder


def make_shards(images: Path) -> Path:
    out = OUT / f"shards-{images.name}-{SAMPLES_PER_SHARD}"
    build_shards(f"imagefolder:{images}", out, split="train", samples_per_shard=SAMPLES_PER_SHARD, workers=2,
                 fsync=False, show_progress=False)
    return out


@dataclass
class Run:
    rate: float  # images/s over the epoch: loader construction to the last batch's arrival
    rate_steady: float  # images/s from the first batch's arrival to the last's (start-up left out)
    first_batch_s: float  # construction to the first batch (graph build / worker start, prefetch)
    cpu_ms: float  # CPU ms per image, construction to workers joined, this process and its workers
    images: int


def measure(open_loader: Callable[[], tuple[Iterable, Callable[[], None]]],
            images_of: Callable[[object], int]) -> Run:
    """Time one epoch of a loader: `open_loader()` gives (batches, close).

    The epoch figures include start-up on every side: our trainer builds a loader per epoch, and so
    does a DataLoader without persistent workers. CPU is not read between batches: both DALI and
    the DataLoader prefetch, so the work behind the batches that arrive in an interval is not the
    work done in it (a small run would show a worker-based loader nearly idle).
    """
    cpu0, t0 = common.cpu_seconds(), time.perf_counter()
    batches, close = open_loader()
    try:
        it = iter(batches)
        first = images_of(next(it))
        t_first = t_last = time.perf_counter()
        count = 0
        for batch in it:
            count += images_of(batch)
            # at each arrival, not after the loop: the reference loader joins its workers when the
            # epoch ends, which is not loading work
            t_last = time.perf_counter()
        del it
    finally:
        close()  # joins DataLoader workers, so getrusage counts them
    cpu = common.cpu_seconds() - cpu0
    return Run(rate=(first + count) / (t_last - t0), rate_steady=count / (t_last - t_first),
               first_batch_s=t_first - t0, cpu_ms=cpu * 1000 / (first + count), images=first + count)


def ours(cfg: DataConfig, antialias: bool | None = None) -> Run:
    default = getattr(dali_graph, "TRAIN_ANTIALIAS", None)
    if antialias is not None:
        dali_graph.TRAIN_ANTIALIAS = antialias
    try:
        def open_loader():
            loader = build_loader(cfg, split="train", mode="train", rank=0, world=1, epoch=0, seed=0,
                                  device=torch.device("cpu"))
            return loader, loader.close
        return measure(open_loader, len)
    finally:
        if antialias is not None:
            dali_graph.TRAIN_ANTIALIAS = default


def ref_pil(cfg: DataConfig) -> Run:
    """The reference loader as a user selects it: the same `build_loader`, `data.backend=torch`."""
    torch_cfg = DataConfig(**{**cfg.__dict__, "backend": "torch"})

    def open_loader():
        loader = build_loader(torch_cfg, split="train", mode="train", rank=0, world=1, epoch=0, seed=0,
                              device=torch.device("cpu"))
        return loader, loader.close
    return measure(open_loader, len)


def tv2_view(spec: aug.ViewSpec, blur: bool):
    """method.md §5.3 for one view with torchvision.transforms.v2 on a uint8 CHW tensor."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=aug.ASPECT, antialias=True),
             v2.RandomApply([v2.ColorJitter(*aug.JITTER)], p=aug.P_JITTER),
             v2.RandomGrayscale(p=aug.P_GRAY)]
    if blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(TV2_BLUR_KERNEL, sigma=aug.SIGMA)], p=aug.P_BLUR))
    steps += [v2.RandomHorizontalFlip(p=aug.P_FLIP), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(aug.MEAN, aug.STD)]
    return v2.Compose(steps)


class TV2Views:
    """Decode once with libjpeg-turbo (torchvision.io), then one v2 transform per view."""

    def __init__(self, cfg: DataConfig) -> None:
        self.transforms = [tv2_view(spec, cfg.blur) for spec in aug.view_specs(cfg)]

    def __call__(self, sample: dict):
        from torchvision.io import ImageReadMode, decode_jpeg

        data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
        img = decode_jpeg(data, mode=ImageReadMode.RGB)
        return [t(img) for t in self.transforms], int(sample["cls"])


def tv2(cfg: DataConfig) -> Run:
    import webdataset as wds

    shards, _ = load_shards(cfg.shards, "train")
    urls = [str(s.tar) for s in shards]
    # whole tars per worker (WebDataset's default split), shuffled tar order and a 1024-sample
    # buffer, as DALI's reader shuffles (pipeline/dali_graph.py SHUFFLE_BUFFER)
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=None, empty_check=False, seed=0)
               .shuffle(1024).map(TV2Views(cfg)))

    def open_loader():
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                             drop_last=True)
        it = iter(loader)
        # join the workers now (the iterator would on garbage collection), so getrusage counts them
        return it, lambda: it._shutdown_workers()
    return measure(open_loader, lambda b: len(b[1]))


def fast_config(cfg: DataConfig) -> DataConfig | str:
    """`cfg` with `data.fast_augment=true`, or why that row cannot run."""
    fields = {k: v for k, v in cfg.__dict__.items()}
    try:
        return common.data_config([FAST], **fields)
    except common.UnknownKey as err:
        return f"{FAST}: {err} (the flag has not landed in core/config.py yet)"


def compare(rows: dict[str, list[Run]], name: str, workers: int) -> dict:
    """`name` against the better baseline, on wall and on CPU separately (medians of repeats)."""
    rate = {k: statistics.median(r.rate for r in v) for k, v in rows.items()}
    cpu = {k: statistics.median(r.cpu_ms for r in v) for k, v in rows.items()}
    steady = {k: statistics.median(r.rate_steady for r in v) for k, v in rows.items()}
    first = {k: statistics.median(r.first_batch_s for r in v) for k, v in rows.items()}
    wall_best = max(BASELINES, key=lambda b: rate[b])
    cpu_best = min(BASELINES, key=lambda b: cpu[b])
    ratio = rate[name] / rate[wall_best]
    desc = (f"better of [{DESC['ref_pil'].format(w=workers)}] and [{DESC['tv2'].format(w=workers)}]: "
            f"wall {wall_best}, CPU {cpu_best}")
    return {"ours": round(rate[name], 1), "baseline": round(rate[wall_best], 1), "unit": "images/s",
            "ratio": round(ratio, 3), "goal": GOAL, "meets_goal": ratio >= GOAL,
            "cpu_ms_per_image": round(cpu[name], 2), "baseline_cpu_ms_per_image": round(cpu[cpu_best], 2),
            "cpu_ratio": round(cpu[cpu_best] / cpu[name], 3),
            "ours_desc": DESC[name].format(w=workers), "baseline_desc": desc,
            "baseline_wall": wall_best, "baseline_cpu": cpu_best,
            "all": {k: {"images_per_s": round(rate[k], 1), "cpu_ms_per_image": round(cpu[k], 2),
                        "images_per_s_after_first_batch": round(steady[k], 1),
                        "first_batch_s": round(first[k], 3)} for k in rows}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true",
                      help="1024 images, 3 repeats, multi-crop too (the recorded figures)")
    mode.add_argument("--smoke", action="store_true",
                      help="128 images, 1 repeat, no warm-up: checks that it runs, not a figure")
    parser.add_argument("--profile", action="store_true", help="also time variants of ours (no blur, ...)")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers")
    args = parser.parse_args()
    host = common.machine()  # first: the load average the run starts under
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # DataLoader workers run one thread each; the main process only collects
    n, repeats = (1024, 3) if args.full else (128, 1) if args.smoke else (384, 1)
    shards = make_shards(make_images(n))
    cfg = common.data_config(shards=str(shards), image_size=224, batch_size=32, workers=args.workers)
    settings = {"two_views": cfg}
    if args.full:
        settings["multi_crop"] = DataConfig(**{**cfg.__dict__, "multi_crop": True})
    params = {"images": n, "repeats": repeats, "workers": args.workers, "batch_size": cfg.batch_size,
              "image_size": cfg.image_size, "samples_per_shard": SAMPLES_PER_SHARD, "smoke": args.smoke}
    key = common.code_key(*CODE, extra=params)  # the code as the run starts; compared again at the end
    records = []
    for setting, base in settings.items():
        fast = fast_config(base)
        runs: dict[str, Callable[[], Run]] = {"ours": partial(ours, base), "ref_pil": partial(ref_pil, base),
                                              "tv2": partial(tv2, base)}
        if isinstance(fast, str):
            print(f"{setting}: skipping the data.fast_augment row: {fast}", flush=True)
        else:
            runs["ours_fast"] = partial(ours, fast)
        if not args.smoke:
            # untimed: first use loads DALI's and torchvision's libraries, converts the DALI graph
            # and fills the page cache; no side should pay that inside its numbers
            for run in runs.values():
                run()
        rows: dict[str, list[Run]] = {k: [] for k in runs}
        for r in range(repeats):  # interleaved, so drifting load from other jobs hits every side
            for name, run in runs.items():
                rows[name].append(run())
            print(f"{setting} repeat {r}: " + ", ".join(
                f"{k} {v[-1].rate:.1f} images/s ({v[-1].cpu_ms:.1f} CPU ms/image, first batch "
                f"{v[-1].first_batch_s:.2f} s)" for k, v in rows.items()),
                flush=True)
        views = base.num_views
        for name, equal in [("ours_fast", False), ("ours", True)]:  # the faithful row last
            if name not in rows:
                continue
            rec = {"bench": "pipeline", "row": f"{setting}{'_fast_augment' if name == 'ours_fast' else ''}",
                   **compare(rows, name, args.workers), "equal_work": equal, "views": views, **params,
                   "overrides": [FAST] if name == "ours_fast" else [], "command": common.command(),
                   "machine": host}
            if not equal:
                rec["not_equal_because"] = ("the fast graph does less work than the recipe the baselines "
                                            "run (see data.fast_augment in core/config.py)")
            print(f"{rec['row']}: ours {rec['ours']} images/s vs {rec['baseline']} ({rec['baseline_wall']}): "
                  f"{rec['ratio']:.2f}x wall; CPU {rec['cpu_ms_per_image']} vs "
                  f"{rec['baseline_cpu_ms_per_image']} ms/image ({rec['baseline_cpu']}): "
                  f"{rec['cpu_ratio']:.2f}x; equal_work {equal}", flush=True)
            records.append(rec)
    if args.profile:
        no_blur = DataConfig(**{**cfg.__dict__, "blur": False})
        for name, c, aa in [("default", cfg, None), ("no blur", no_blur, None), ("no antialias", cfg, False)]:
            run = ours(c, aa)
            print(f"profile: {name}: {run.rate:.1f} images/s, {run.cpu_ms:.2f} CPU ms/image", flush=True)
    records.sort(key=lambda r: r["row"] == "two_views")  # the headline is the last line
    record = {"bench": "pipeline", "command": common.command(), "machine": host, "records": records}
    if args.full and not common.record_run("pipeline", key, CODE, params, record):
        return
    for rec in records:
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
