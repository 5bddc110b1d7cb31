"""Data loading: DALI train/eval pipelines over WebDataset shards, and the torch reference loader.

``build_loader(cfg.data, split=..., mode="train"|"eval", rank=..., world=..., epoch=..., seed=...,
start_batch=0, device=None)`` returns an iterable of `Batch` (views, idx, cls) whose ``len()`` is
the batches per epoch per rank, taken from ``_info.json`` alone.

- Backends: ``dali`` (default; CPU mode with ``device_id=None`` when there is no GPU, mixed decode
  on a GPU) and ``torch`` (webdataset + torchvision, PIL; the reference and parity oracle). There is
  no fallback between them: ``data.backend=dali`` where DALI does not import raises
  `BackendUnavailable` (a `core.cli.UserError`: one line naming the setting and both fixes);
  `check_backend` raises it up front.
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
- Augmentation: DALI's default train graph computes the reference's torchvision/PIL operations
  (`pipeline.dali_pil`): jitter in a random order per sample, each rounded as PIL rounds, PIL's HSV
  hue and box-pass GaussianBlur; after the crop (whose resampler differs from PIL's by a fraction of
  a grey level) equal to torchvision's but for rare one-level float ties in the blur
  (tests/pipeline/contract.py states the contract and its tolerances). ``data.fast_augment``
  selects the older approximation, a documented deviation: jitter in a fixed order with DALI's
  linear (YIQ) hue, one rounding at the end, grayscale folded into the saturation, a Gaussian blur
  cut at 2 sigma on the normalised view.
"""

from pipeline.batch import Batch
from pipeline.loader import BackendUnavailable, Loader, build_loader, check_backend

__all__ = ["BackendUnavailable", "Batch", "Loader", "build_loader", "check_backend"]
