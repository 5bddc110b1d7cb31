"""Data loading: DALI train/eval pipelines over WebDataset shards, and the torch reference loader.

``build_loader(cfg.data, split=..., mode="train"|"eval", rank=..., world=..., epoch=..., seed=...,
start_batch=0, device=None)`` returns an iterable of `Batch` (views, idx, cls) whose ``len()`` is
the batches per epoch per rank, taken from ``_info.json`` alone.

- Backends: ``dali`` (default; CPU mode with ``device_id=None`` when there is no GPU, mixed decode
  on a GPU) and ``torch`` (webdataset + torchvision, PIL; the parity oracle, and the fallback,
  logged once, where DALI is not installed).
- Train: shard order permuted per (seed, epoch), DALI's seeded shuffle buffer, contiguous rank
  ranges; ``N // (world * batch)`` batches on every rank (drop last). Views per method.md §5.3.
- Eval: stored order, resize + center crop, every sample exactly once across ranks; every rank
  yields ``ceil(ceil(N / world) / eval_batch)`` batches and padding is dropped before the caller,
  so a rank's last batch can be short (even empty).
- Resume: deterministic replay (`pipeline.loader`): batches ``start_batch..`` equal an
  uninterrupted run's, pixels included.
- Bad input: a missing/truncated shard or a manifest mismatch raises `ShardFormatError` at build
  time naming the file; a corrupt image is logged with shard and key, skipped and counted in
  ``loader.skipped`` (its batch is one sample short).
- Deviations from the reference augmentation (all measured, see `pipeline.dali_graph` and
  `pipeline.augment`): blur kernel truncated at 2 sigma; colour-jitter ops in a fixed order with
  DALI's linear (YIQ) hue rotation; one clamp after the colour ops instead of one per op.
"""

from pipeline.batch import Batch
from pipeline.loader import Loader, build_loader

__all__ = ["Batch", "Loader", "build_loader"]
