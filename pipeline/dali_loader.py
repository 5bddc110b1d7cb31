"""The DALI backend: runs `dali_graph` pipelines and hands out `Batch` objects.

Corrupt samples: DALI has no skip-on-error for decoders and a failed iteration loses its whole
batch. So when a run fails, the loader reads that batch's raw samples again with a reader-only
pipeline (same reader arguments and seed, hence the same order), finds the undecodable ones, logs
each with its tar and key, marks their positions in the ``keep`` input, rebuilds the pipeline and
replays it to the failed batch. The replay costs as much as the epoch so far; corruption is rare
(the builder validates every image) so this is the right trade against checking every sample.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
from PIL import Image

from core.config import DataConfig
from pipeline import augment as aug
from pipeline import dali_graph as graph
from pipeline.loader import Loader
from pipeline.plan import EpochPlan, derive_seed

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline

log = logging.getLogger(__name__)


class DaliLoader(Loader):
    """See `pipeline.loader.build_loader`."""

    def __init__(self, cfg: DataConfig, plan: EpochPlan, *, seed: int, epoch: int, start_batch: int,
                 device: torch.device, linear: bool = False) -> None:
        super().__init__(plan, start_batch, device)
        self.cfg = cfg
        self._linear = linear
        self._gpu = device.type == "cuda"
        self._pipe_seed = derive_seed(seed, epoch, plan.rank, "dali")
        self._reader_seed = derive_seed(seed, epoch, plan.rank, "reader")
        self._masked: dict[int, set[int]] = {}  # batch -> positions of known-corrupt samples
        self._pipe: Pipeline | None = None

    def _keep(self, batch: int) -> np.ndarray:
        keep = np.ones(self.plan.batch_size, dtype=np.bool_)
        keep[list(self._masked.get(batch, ()))] = False
        return keep

    def _build(self) -> Pipeline:
        common = dict(batch_size=self.plan.batch_size, num_threads=self.cfg.workers,
                      device_id=(self.device.index or 0) if self._gpu else None, seed=self._pipe_seed,
                      prefetch_queue_depth=2, exec_dynamic=True)
        dev = "gpu" if self._gpu else "cpu"
        keep = self._keep if self._masked else None  # no masking ops until a corrupt sample is seen
        if self._linear:  # crop + flip only (method.md §7.1)
            pipe = graph.train_pipeline(self.plan, [aug.linear_spec(self.cfg)], False, keep, dev,
                                        self._reader_seed, colour=False, **common)
        elif self.plan.train:
            pipe = graph.train_pipeline(self.plan, aug.view_specs(self.cfg), self.cfg.blur, keep, dev,
                                        self._reader_seed, fast=self.cfg.fast_augment, **common)
        else:
            pipe = graph.eval_pipeline(self.plan, self.cfg.image_size, self.cfg.eval_resize, keep, dev,
                                       self._reader_seed, self.cfg.eval_interpolation, **common)
        pipe.build()
        return pipe

    def __iter__(self):
        self.close()
        if self.start_batch >= self.plan.num_batches:  # resumed at the very end of the epoch
            return
        self._pipe = self._build()
        for j in range(self.plan.num_batches):
            outs = self._run(j)
            if j >= self.start_batch:
                yield self._to_batch(outs, j)

    def _run(self, j: int):
        while True:
            assert self._pipe is not None  # built by `__iter__` (and rebuilt by `_recover`)
            try:
                return self._pipe.run()
            except RuntimeError:
                if not self._recover(j):
                    raise
                log.info("rebuilt the DALI pipeline and replayed %d batches after a corrupt sample", j)

    def _to_batch(self, outs, j: int):
        if self._masked:
            *views, cls, idx, keep = outs
            rows = torch.from_numpy(np.array(keep.as_tensor()).astype(bool).copy())
        else:
            *views, cls, idx = outs
            rows = torch.ones(self.plan.batch_size, dtype=torch.bool)
        views = [self._to_torch(v) for v in views]
        rows[self.plan.valid_in_batch(j):] = False  # eval padding never reaches a caller
        return self._batch(views, self._to_torch(cls, cpu=True), self._to_torch(idx, cpu=True), rows)

    def _to_torch(self, tensor_list, cpu: bool = False) -> torch.Tensor:
        t = tensor_list.as_tensor()
        if not self._gpu:
            # Zero-copy: DALI's dynamic executor (`exec_dynamic=True`) allocates every iteration's
            # outputs afresh and keeps them alive while the DLPack capsule holds them, so a batch
            # stays valid after later runs (tests/pipeline/test_train.py checks it). A copy would cost
            # CPU time the pipeline itself needs (BENCHMARKS.md).
            return torch.from_dlpack(t)
        if cpu:
            return torch.from_numpy(np.array(t.as_cpu() if hasattr(t, "as_cpu") else t))
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def _recover(self, j: int) -> bool:
        """Mask the undecodable samples of batch j (or j+1, the prefetched one), rebuild, replay."""
        found = False
        for batch, pos, shard, key, reason in self._find_corrupt(j):
            if pos in self._masked.setdefault(batch, set()):
                continue
            self._masked[batch].add(pos)
            self._record_skip(shard, key, reason)
            found = True
        if not found:
            return False
        self.close()
        self._pipe = self._build()
        for _ in range(j):
            self._pipe.run()
        return True

    def _find_corrupt(self, j: int):
        pipe = graph.raw_pipeline(self.plan, self._reader_seed, batch_size=self.plan.batch_size,
                                  num_threads=1, device_id=None, seed=self._pipe_seed, prefetch_queue_depth=1)
        pipe.build()
        for batch in range(min(j + 2, self.plan.num_batches)):
            jpg, idx, info = pipe.run()
            if batch < j:
                continue
            for pos in range(self.plan.batch_size):
                reason = _decode_error(np.array(jpg[pos]).tobytes())
                if reason:
                    source = np.array(info[pos]).tobytes().decode(errors="replace")
                    key = np.array(idx[pos]).tobytes().decode(errors="replace")
                    yield batch, pos, source.rsplit(":", 2)[0], key, reason
        del pipe

    def close(self) -> None:
        self._pipe = None


def _decode_error(data: bytes) -> str:
    """Why `data` is not a decodable image ("" when it is)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB").load()
    except Exception as err:  # PIL raises many types for bad bytes; all mean "corrupt"
        return f"{type(err).__name__}: {err}"[:200]
    return ""
