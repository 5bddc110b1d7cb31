"""The one owner of `torch.distributed` (besides the DeepSpeed wrapper in `train/engine.py`).

Every helper returns the single-process answer when no process group is initialised, so model,
cluster and pipeline code can call them unconditionally. Collectives on CPU tensors need gloo;
with NCCL the tensors must live on this rank's GPU (the callers keep data where it was computed).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True under torchrun / the deepspeed launcher (they export RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """This rank's compute device: its local GPU (`gpu_index`), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_index())
    return torch.device("cpu")


def gpu_index() -> int:
    """The index of this rank's GPU among the GPUs this process sees.

    Launchers give GPUs to processes in two ways: every process sees all of the host's GPUs and
    takes the one at its LOCAL_RANK (torchrun, the deepspeed launcher), or each process sees only
    its own (`CUDA_VISIBLE_DEVICES` set per process, e.g. Slurm's `--gpus-per-task=1`), where it is
    always index 0 whatever LOCAL_RANK says. Anything else is a launch mistake, named here rather
    than failing later as "invalid device ordinal".
    """
    visible, local = torch.cuda.device_count(), local_rank()
    if visible == 1:
        return 0
    if local < visible:
        return local
    raise RuntimeError(f"LOCAL_RANK={local} but this process sees only {visible} GPUs "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                       "give every process all of the host's GPUs or exactly one")


def init(backend: str | None = None, timeout_s: float = 1800.0) -> None:
    """Initialise the process group from the launcher's environment (no-op without one).

    `timeout_s` bounds every collective: a rank that died makes the others fail instead of
    hanging forever (the loop turns that failure into a non-zero exit).
    """
    if is_initialized() or not launched():
        return
    backend = backend or default_backend()
    bound: dict[str, Any] = {}
    if backend == "nccl":
        # Bound to its GPU from the start: NCCL then creates its communicator eagerly on the right
        # device instead of guessing it at the first collective (and warning about it).
        bound["device_id"] = device()
        torch.cuda.set_device(bound["device_id"])
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **bound)
    log.info("process group: backend=%s rank=%d world=%d timeout=%ss", backend, rank(), world(),
             timeout_s)


def shutdown() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place; returns it for chaining."""
    if is_initialized() and world() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order. Sizes along dim 0 may differ.

    No gradient flows through the result (use it for keys, indices and features only).
    """
    if not is_initialized() or world() == 1:
        return tensor
    n_local = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n_local) for _ in range(world())]
    tdist.all_gather(sizes, n_local)
    counts = [int(s.item()) for s in sizes]
    n_max = max(counts)
    padded = tensor.new_zeros((n_max, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    tdist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0)


def all_gather_equal(tensor: torch.Tensor) -> torch.Tensor:
    """`all_gather_cat` for tensors of the same shape on every rank (one collective, no sync)."""
    if not is_initialized() or world() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world())]
    tdist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s values (in place)."""
    if is_initialized() and world() > 1:
        tdist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank `src`'s picklable `obj` on every rank."""
    if not is_initialized() or world() == 1:
        return obj
    box = [obj if rank() == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    if not is_initialized() or world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    tdist.all_gather_object(out, obj)
    return out
