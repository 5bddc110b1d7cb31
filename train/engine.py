"""The one DeepSpeed wrapper: builds the DeepSpeed config from our schema and runs a train step.

What trains: only the query encoder and its head are handed to the optimizer. The momentum
encoder, the queue and its bookkeeping are buffers or frozen parameters of the same `HCSC` module,
so they travel in the engine's module state dict (checkpoints) but are never optimised, never cast
(mixed precision is DeepSpeed's `torch_autocast`, which leaves every weight and buffer in fp32;
docs/architecture.md#decisions) and never all-reduced.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from typing import Any, cast

import torch

from core import dist
from core.config import Config, global_batch

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def prepare_environment() -> None:
    """Make DeepSpeed usable here: CPU accelerator without CUDA, and a process group of one
    when no launcher set one up (DeepSpeed would otherwise look for MPI)."""
    if not torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        log.info("no CUDA device: DeepSpeed runs with DS_ACCELERATOR=cpu and gloo, fp32")
    if not dist.launched():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the schema so the two cannot drift (the hardware is
    train/preflight.py's to check: this is pure)."""
    precision = cfg.engine.precision
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": global_batch(cfg, world),
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # Our client optimizer is plain SGD (method.md §5.2); DeepSpeed only vouches for its own.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronises the device twice per step;
        # the loop measures its own throughput without a sync (train/records.py).
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if precision != "fp32":
        # No module's gradients are reduced in the autocast dtype: by default DeepSpeed tags
        # Linear and Conv2d parameters for bf16/fp16 communication, which under ZeRO-1 all-reduces
        # their gradients in 8 mantissa bits. The official code reduces fp32 gradients.
        ds["torch_autocast"] = {"enabled": True, "dtype": _AUTOCAST_DTYPES[precision],
                                "lower_precision_safe_modules": []}
    return ds


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """SGD over the query encoder only; weight decay on every parameter (method.md §5.2)."""
    params = [p for p in cast(torch.nn.Module, model.encoder_q).parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


def _skip_shared_memory_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on its first start (about
    a minute, BENCHMARKS.md) that only several ranks on one host ever use; one process never
    communicates, so it gets none. (DeepSpeed has no setting for this; its backend looks the
    builder up in this module when it is created. `import deepspeed.comm.torch as m` would bind
    the torch library itself: `deepspeed.comm` re-exports a name `torch`.)"""
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    setattr(ds_comm, "build_shm_op", lambda: None)  # noqa: B010 (a module attribute, by name)


def _tune_for_cuda(model: torch.nn.Module, cfg: Config) -> None:
    """cuDNN autotuning and NHWC weights on a GPU (no effect on the CPU, where both are off).

    channels_last only with ZeRO 0: ZeRO 1 flattens the parameters into one contiguous buffer and
    makes each a view of it, which undoes the format (and would copy every weight at every step).
    Convolutions then run NHWC: the first one converts the batch, the rest keep the format."""
    if dist.device().type != "cuda":
        return
    torch.backends.cudnn.benchmark = cfg.engine.cudnn_benchmark
    if cfg.engine.channels_last and cfg.engine.zero_stage == 0:
        model.to(memory_format=torch.channels_last)
    elif cfg.engine.channels_last:
        log.info("engine.channels_last: off with ZeRO %d (its flat parameter buffer is NCHW)",
                 cfg.engine.zero_stage)


class Engine:
    """A DeepSpeed engine around an `HCSC` module.

    Args:
        model: the HCSC module (query + momentum encoders, queue).
        cfg: the run config.
        lr: the initial learning rate (the loop sets it every epoch).
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, lr: float) -> None:
        import deepspeed  # heavy import, only when an engine is built

        self.cfg = cfg
        if dist.world() == 1 and not torch.cuda.is_available():
            _skip_shared_memory_comm_op()
        model.to(dist.device())
        _tune_for_cuda(model, cfg)
        optimizer = build_optimizer(model, cfg, lr)
        self.ds_config = deepspeed_config(cfg, dist.world())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        self.engine.train()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, batch, prototypes, epoch: int, *, metrics: bool = False) -> dict[str, torch.Tensor]:
        """One step: forward through the engine (autocast applies there), backward, SGD step.

        Returns the detached loss terms (tensors; the caller decides when to sync for logging), with
        the per-level metrics when `metrics` (the logging steps).
        """
        extra = {"metrics": True} if metrics else {}  # a module without metrics never gets asked
        out = self.engine(batch, prototypes, epoch=epoch, **extra)
        self.engine.backward(out["loss"])
        self.engine.step()
        self._share_buffers()
        return {k: v.detach() for k, v in out.items()}

    @torch.no_grad()
    def _share_buffers(self) -> None:
        """Give every rank rank 0's buffers after each step, as the official code's DDP does before
        each forward (`broadcast_buffers`): BatchNorm's running statistics follow each rank's own
        batches, and DeepSpeed broadcasts parameters once, never buffers. Without it the ranks'
        statistics drift apart, clustering and kNN features come from per-rank statistics, and a
        resumed run (every rank loads rank 0's) no longer equals an uninterrupted one. The queue
        buffers are left out: every rank enqueues the same gathered keys, so they never differ."""
        if dist.world() == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for name, buf in self.engine.module.named_buffers():
            if not name.startswith("queue"):
                by_dtype.setdefault(buf.dtype, []).append(buf)
        for bufs in by_dtype.values():  # one broadcast per dtype, not one per buffer
            flat = dist.broadcast_(torch.cat([b.reshape(-1) for b in bufs]))
            for buf, part in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
                buf.copy_(part.view_as(buf))

    def save(self, folder: str, tag: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed checkpoint of model + optimizer (+ ZeRO partitions) into `folder/tag`."""
        self.engine.save_checkpoint(folder, tag=tag, client_state=client_state, save_latest=False)

    def load(self, folder: str, tag: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(
            folder, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{folder}/{tag}: DeepSpeed found no checkpoint to load")
        return client_state
