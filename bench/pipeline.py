"""Pipeline throughput: our DALI loader from shards vs the reference HCSC loader, same images and cores.

Ours: `pipeline.build_loader` (DALI, CPU mode, `workers` threads) over WebDataset shards.
Reference: the official HCSC loader's recipe, torchvision ImageFolder + PIL transforms of method.md §5.3
(`TwoCropsTransform` / multi-crop) in a DataLoader with the same number of workers.
Images: the 20 real foolbox ImageNet JPEGs re-encoded as ImageNet-like photos (random crops,
500x375 / 375x500 / 500x333 / 333x500 and a few others, quality 90), cached under bench/out/.

Usage: python bench/pipeline.py [--full] [--profile]. The last output line is the JSON record
(docs/architecture.md#benchmarks); ``ours`` / ``baseline`` are two-view images/s at 224 px.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realdata import foolbox_jpegs  # noqa: E402  (bench/realdata.py)

from core.config import DataConfig  # noqa: E402
from pipeline import augment as aug  # noqa: E402
from pipeline import build_loader, dali_graph  # noqa: E402
from pipeline.reference import view_transform  # noqa: E402
from shards.build import build_shards  # noqa: E402

OUT = ROOT / "bench" / "out" / "pipeline"
SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 500), (500, 500), (640, 480)]
GOAL = 2.0


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
    out = OUT / f"shards-{images.name}"
    build_shards(f"imagefolder:{images}", out, split="train", samples_per_shard=256, workers=2, fsync=False,
                 show_progress=False)
    return out


def cpu_seconds() -> float:
    """CPU time of this process (all DALI threads) and of its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(batches, images_per_batch) -> tuple[float, float]:
    """(images/s over all batches after the first, so start-up is excluded on both sides;
    CPU ms per image over the whole epoch, workers included). The CPU figure is the steadier one
    on a machine shared with other jobs."""
    cpu0 = cpu_seconds()
    it = iter(batches)
    total = images_per_batch(next(it))
    start, count = time.perf_counter(), 0
    for b in it:
        count += images_per_batch(b)
    wall = time.perf_counter() - start
    del it  # joins DataLoader workers, so their CPU time is counted
    return count / wall, (cpu_seconds() - cpu0) * 1000 / (total + count)


def ours(shards: Path, cfg: DataConfig, antialias: bool | None = None) -> tuple[float, float]:
    cfg = DataConfig(**{**cfg.__dict__, "shards": str(shards)})
    default = dali_graph.TRAIN_ANTIALIAS
    dali_graph.TRAIN_ANTIALIAS = default if antialias is None else antialias
    try:
        with build_loader(cfg, split="train", mode="train", rank=0, world=1, epoch=0, seed=0,
                          device=torch.device("cpu")) as loader:
            return timed(loader, len)
    finally:
        dali_graph.TRAIN_ANTIALIAS = default


class MultiViews:
    """The reference `TwoCropsTransform` / `MultiCropsTransform`: one transform per view."""

    def __init__(self, cfg: DataConfig) -> None:
        self.transforms = [view_transform(spec, cfg.blur) for spec in aug.view_specs(cfg)]

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def reference(images: Path, cfg: DataConfig) -> tuple[float, float]:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(images), transform=MultiViews(cfg))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                         num_workers=cfg.workers, drop_last=True)
    return timed(loader, lambda b: len(b[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="1024 images, 3 repeats (recorded numbers)")
    parser.add_argument("--profile", action="store_true", help="also time decode/blur variants of ours")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    n, repeats = (1024, 3) if args.full else (384, 1)
    images = make_images(n)
    shards = make_shards(images)
    cfg = DataConfig(image_size=224, batch_size=32, workers=args.workers)
    multi = DataConfig(**{**cfg.__dict__, "multi_crop": True})
    runs = {"ours": lambda: ours(shards, cfg), "baseline": lambda: reference(images, cfg),
            "ours_multicrop": lambda: ours(shards, multi),
            "baseline_multicrop": lambda: reference(images, multi)}
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    # Warm-up, untimed: first use loads DALI's and torchvision's libraries, converts the DALI graph
    # (autograph) and fills the page cache; neither side should pay that inside its numbers.
    ours(shards, cfg)
    reference(images, cfg)
    for r in range(repeats):  # interleaved, so drifting load from other jobs hits both sides
        for name, run in runs.items():
            rows[name].append(run())
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1][0]:.1f} images/s ({v[-1][1]:.1f} CPU ms/image)"
                                          for k, v in rows.items()), flush=True)
    if args.profile:
        no_blur = DataConfig(**{**cfg.__dict__, "blur": False})
        for name, c, aa in [("default", cfg, None), ("no blur", no_blur, None),
                            ("no antialias", cfg, False), ("multi-crop", multi, None)]:
            speed, cpu = ours(shards, c, aa)
            print(f"profile: {name}: {speed:.1f} images/s, {cpu:.2f} CPU ms/image", flush=True)
    med = {k: float(np.median([x[0] for x in v])) for k, v in rows.items()}
    cpu = {k: float(np.median([x[1] for x in v])) for k, v in rows.items()}
    ratio = med["ours"] / med["baseline"]
    print(f"two views at 224, {args.workers} workers, {n} images: ours {med['ours']:.1f} images/s, "
          f"reference {med['baseline']:.1f} images/s, ratio {ratio:.2f}x; CPU per image: ours "
          f"{cpu['ours']:.1f} ms, reference {cpu['baseline']:.1f} ms, "
          f"ratio {cpu['baseline'] / cpu['ours']:.2f}x")
    print(f"six views (multi-crop): ours {med['ours_multicrop']:.1f} images/s, "
          f"reference {med['baseline_multicrop']:.1f} images/s, "
          f"ratio {med['ours_multicrop'] / med['baseline_multicrop']:.2f}x; CPU ratio "
          f"{cpu['baseline_multicrop'] / cpu['ours_multicrop']:.2f}x")
    print(json.dumps({"bench": "pipeline", "ours": round(med["ours"], 1),
                      "baseline": round(med["baseline"], 1), "unit": "images/s", "ratio": round(ratio, 2),
                      "goal": GOAL, "meets_goal": ratio >= GOAL,
                      "cpu_ms_per_image": round(cpu["ours"], 2),
                      "baseline_cpu_ms_per_image": round(cpu["baseline"], 2),
                      "cpu_ratio": round(cpu["baseline"] / cpu["ours"], 2),
                      "ours_multicrop": round(med["ours_multicrop"], 1),
                      "baseline_multicrop": round(med["baseline_multicrop"], 1),
                      "multicrop_ratio": round(med["ours_multicrop"] / med["baseline_multicrop"], 2),
                      "images": n, "workers": args.workers, "repeats": repeats}))


if __name__ == "__main__":
    main()
