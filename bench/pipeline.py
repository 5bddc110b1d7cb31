"""Pipeline throughput: our DALI loader from shards vs the reference HCSC loader, same images and cores.

Ours: `pipeline.build_loader` (DALI, CPU mode, `workers` threads) over WebDataset shards.
Reference: the official HCSC loader's recipe, torchvision ImageFolder + PIL transforms of spec 5.3
(`TwoCropsTransform` / multi-crop) in a DataLoader with the same number of workers.
Images: the 20 real foolbox ImageNet JPEGs re-encoded as ImageNet-like photos (random crops,
500x375 / 375x500 / 500x333 / 333x500 and a few others, quality 90), cached under bench/out/.

Usage: python bench/pipeline.py [--full] [--profile]. The last output line is the JSON record
(design.md section 5); ``ours`` / ``baseline`` are two-view images/s at 224 px.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import augment as aug  # noqa: E402
from pipeline import build_loader, dali_loader  # noqa: E402
from pipeline.reference import view_transform  # noqa: E402
from shards.build import build_shards  # noqa: E402
from train.config import DataConfig  # noqa: E402

OUT = ROOT / "bench" / "out" / "pipeline"
SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 500), (500, 500), (640, 480)]
GOAL = 2.0


def foolbox_jpegs() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        sys.exit("bench/pipeline.py: foolbox is not installed; run scripts/setup.sh")
    return sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))


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


def timed(batches, images_per_batch) -> float:
    """Images/s over all batches after the first (pipeline start-up excluded on both sides)."""
    it = iter(batches)
    next(it)
    start, count = time.perf_counter(), 0
    for b in it:
        count += images_per_batch(b)
    return count / (time.perf_counter() - start)


def ours(shards: Path, cfg: DataConfig, roi: bool | None = None) -> float:
    cfg = DataConfig(**{**cfg.__dict__, "shards": str(shards)})
    if roi is not None:
        dali_loader.ROI_DECODE_CPU = roi
    with build_loader(cfg, split="train", mode="train", rank=0, world=1, epoch=0, seed=0,
                      device=torch.device("cpu")) as loader:
        return timed(loader, len)


class MultiViews:
    """The reference `TwoCropsTransform` / `MultiCropsTransform`: one transform per view."""

    def __init__(self, cfg: DataConfig) -> None:
        self.transforms = [view_transform(spec, cfg.blur) for spec in aug.view_specs(cfg)]

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def reference(images: Path, cfg: DataConfig) -> float:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(images), transform=MultiViews(cfg))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                         num_workers=cfg.workers, drop_last=True)
    return timed(loader, lambda b: len(b[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="2048 images, 3 repeats (recorded numbers)")
    parser.add_argument("--profile", action="store_true", help="also time decode/blur variants of ours")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    n, repeats = (2048, 3) if args.full else (448, 1)
    images = make_images(n)
    shards = make_shards(images)
    cfg = DataConfig(image_size=224, batch_size=32, workers=args.workers)
    multi = DataConfig(**{**cfg.__dict__, "multi_crop": True})
    rows = {"ours": [], "baseline": [], "ours_multicrop": [], "baseline_multicrop": []}
    for r in range(repeats):
        rows["ours"].append(ours(shards, cfg))
        rows["baseline"].append(reference(images, cfg))
        rows["ours_multicrop"].append(ours(shards, multi))
        rows["baseline_multicrop"].append(reference(images, multi))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True)
    if args.profile:
        no_blur = DataConfig(**{**cfg.__dict__, "blur": False})
        for name, c, roi in [("decode once", cfg, False), ("ROI decode", cfg, True),
                             ("decode once, no blur", no_blur, False), ("ROI decode, no blur", no_blur, True),
                             ("multi-crop decode once", multi, False), ("multi-crop ROI", multi, True)]:
            print(f"profile: {name}: {ours(shards, c, roi):.1f} images/s", flush=True)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    ratio = med["ours"] / med["baseline"]
    print(f"two views at 224, {args.workers} workers, {n} images: ours {med['ours']:.1f} images/s, "
          f"reference {med['baseline']:.1f} images/s, ratio {ratio:.2f}x")
    print(f"six views (multi-crop): ours {med['ours_multicrop']:.1f} images/s, "
          f"reference {med['baseline_multicrop']:.1f} images/s, "
          f"ratio {med['ours_multicrop'] / med['baseline_multicrop']:.2f}x")
    print(json.dumps({"bench": "pipeline", "ours": round(med["ours"], 1), "baseline": round(med["baseline"], 1),
                      "unit": "images/s", "ratio": round(ratio, 2), "goal": GOAL, "meets_goal": ratio >= GOAL,
                      "ours_multicrop": round(med["ours_multicrop"], 1),
                      "baseline_multicrop": round(med["baseline_multicrop"], 1),
                      "images": n, "workers": args.workers, "repeats": repeats}))


if __name__ == "__main__":
    main()
