"""The reference backend: `webdataset` tar reading + torchvision (v1, PIL) transforms of method.md §5.3.

It is the parity oracle in tests and the loader on hosts without DALI. It reads the same
`EpochPlan` as DALI (same shard order, same contiguous rank ranges), shuffles train samples with
webdataset's seeded buffer, and seeds the augmentation of batch j from (seed, epoch, rank, j), so
batches do not depend on the worker count and resuming at batch k skips k batches undecoded.
DataLoader worker w decodes batches w, w + W, ... and the main process restores batch order.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Iterator
from typing import Any, cast

import torch
import webdataset as wds
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T
from webdataset.tariterators import tarfile_samples

from core.config import DataConfig
from pipeline import augment as aug
from pipeline.batch import Batch
from pipeline.loader import Loader
from pipeline.plan import EpochPlan, derive_seed

log = logging.getLogger(__name__)


class PILGaussianBlur:
    """The reference HCSC blur: PIL GaussianBlur with radius sigma ~ U[0.1, 2.0] (Python `random`)."""

    def __init__(self, sigma: tuple[float, float] = aug.SIGMA) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def view_transform(spec: aug.ViewSpec, blur: bool = True) -> T.Compose:
    """MoCo v2 aug+ (method.md §5.3) for one view, as the reference `hcsc/loader.py` builds it."""
    steps = [T.RandomResizedCrop(spec.size, scale=spec.scale),
             T.RandomApply([T.ColorJitter(*aug.JITTER)], p=aug.P_JITTER),
             T.RandomGrayscale(p=aug.P_GRAY)]
    if blur:
        steps.append(T.RandomApply([PILGaussianBlur()], p=aug.P_BLUR))
    steps += [T.RandomHorizontalFlip(p=aug.P_FLIP), T.ToTensor(), T.Normalize(aug.MEAN, aug.STD)]
    return T.Compose(steps)


def linear_transform(spec: aug.ViewSpec) -> T.Compose:
    """docs/method.md §7.1 linear-probe training: RandomResizedCrop + flip -> normalise."""
    return T.Compose([T.RandomResizedCrop(spec.size, scale=spec.scale), T.RandomHorizontalFlip(p=aug.P_FLIP),
                      T.ToTensor(), T.Normalize(aug.MEAN, aug.STD)])


def eval_transform(image_size: int, resize: int, interpolation: str = "bilinear") -> T.Compose:
    """Resize(shorter side; bilinear, method.md §2.2, or bicubic, §7.1) -> CenterCrop -> normalise."""
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    return T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(aug.MEAN, aug.STD)])


def rank_samples(plan: EpochPlan, seed: int, epoch: int) -> Iterator[dict]:
    """Raw samples of this rank in read order (train: through a seeded shuffle buffer)."""
    urls = ({"url": str(s.tar)} for s in plan.shards)
    start, stop = plan.range
    samples = itertools.islice(tarfile_samples(urls), start, stop)
    if plan.train:
        rng = random.Random(derive_seed(seed, epoch, plan.rank, "reader"))
        samples = wds.filters._shuffle(samples, bufsize=1024, initial=1024, rng=rng)
    return samples


class _Batches(IterableDataset):
    def __init__(self, cfg: DataConfig, plan: EpochPlan, seed: int, epoch: int, start_batch: int,
                 linear: bool) -> None:
        self.cfg, self.plan, self.seed, self.epoch, self.start = cfg, plan, seed, epoch, start_batch
        if linear:
            self.transforms = [linear_transform(aug.linear_spec(cfg))]
        elif plan.train:
            self.transforms = [view_transform(s, cfg.blur) for s in aug.view_specs(cfg)]
        else:
            self.transforms = [eval_transform(cfg.image_size, cfg.eval_resize, cfg.eval_interpolation)]

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        samples = rank_samples(self.plan, self.seed, self.epoch)
        for j in range(self.plan.num_batches):
            raw = list(itertools.islice(samples, self.plan.valid_in_batch(j)))
            if j >= self.start and (j - self.start) % nw == wid:
                yield self._process(j, raw)

    def _process(self, j: int, raw: list[dict]):
        s = derive_seed(self.seed, self.epoch, self.plan.rank, j, "augment")
        random.seed(s)
        torch.manual_seed(s)
        views: list[list[torch.Tensor]] = [[] for _ in self.transforms]
        cls, idx, skipped = [], [], []
        for sample in raw:
            data = sample.get("jpg", sample.get("png"))
            try:
                # no image member (None): BytesIO raises TypeError, recorded as corrupt below
                with Image.open(io.BytesIO(cast(bytes, data))) as img:
                    rgb = img.convert("RGB")
            except Exception as err:  # PIL raises many types for bad bytes; all mean "corrupt"
                skipped.append((sample["__url__"], sample["__key__"], f"{type(err).__name__}: {err}"[:200]))
                continue
            for out, t in zip(views, self.transforms, strict=True):
                out.append(t(rgb))
            cls.append(int(sample["cls"]))
            idx.append(int(sample["idx"]))
        stacked = [torch.stack(v) if v else torch.empty(0, 3, 0, 0) for v in views]
        return j, stacked, torch.tensor(cls, dtype=torch.int64), torch.tensor(idx, dtype=torch.int64), skipped


class TorchLoader(Loader):
    """See `pipeline.loader.build_loader`; `cfg.workers` DataLoader workers."""

    def __init__(self, cfg: DataConfig, plan: EpochPlan, *, seed: int, epoch: int, start_batch: int,
                 device: torch.device, linear: bool = False) -> None:
        super().__init__(plan, start_batch, device)
        self.dataset = _Batches(cfg, plan, seed, epoch, start_batch, linear)
        self.workers = min(cfg.workers, max(1, plan.num_batches - start_batch))
        self._iter: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda")
        self._iter = iter(loader)
        pending: dict[int, tuple] = {}
        for j in range(self.start_batch, self.plan.num_batches):
            while j not in pending:
                item = next(self._iter)
                pending[item[0]] = item
            _, views, cls, idx, skipped = pending.pop(j)
            for shard, key, reason in skipped:
                self._record_skip(shard, key, reason)
            if self.plan.train and len(idx) < self.plan.batch_size:
                rows = self._refill(len(idx))
                views, cls, idx = [v[rows] for v in views], cls[rows], idx[rows]
            nb = self.device.type == "cuda"
            yield Batch([v.to(self.device, non_blocking=nb) for v in views],
                        idx.to(self.device, non_blocking=nb), cls.to(self.device, non_blocking=nb))
        self.close()

    def close(self) -> None:
        self._iter = None  # the DataLoader iterator shuts its workers down when collected
