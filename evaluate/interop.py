"""Checkpoint interoperability (method.md §8): official HCSC import, torchvision and detectron2 export.

- ``import_official``: an official (or any accepted) checkpoint -> ``{"epoch", "state_dict"}`` in
  the official key layout (``module.encoder_q.*`` ...), plain tensors only, no optimizer; what
  `model.checkpoint_io.load_official_state_dict` and every ``hcsc-eval`` command read.
- ``export_torchvision``: the query trunk as a plain ResNet state dict without ``fc``.
- ``export_detectron2``: MoCo's ``convert-pretrain-to-detectron2.py`` renaming, numpy arrays, the
  trunk only (HCSC's converter also wrote encoder_k and the queue; method.md §8 says filter them).
"""

from __future__ import annotations

import logging
import os
import pickle
import re

import torch

from core.files import atomic_write
from evaluate.checkpoints import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

_BATCHES_TRACKED = "num_batches_tracked"


def import_official(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Convert `src` (official ``.pth`` or any accepted checkpoint) to the official layout at `out`.

    Returns:
        ``{"keys": n, "encoder_k": bool, "queue": bool, "epoch": int | None}`` describing `out`.
    """
    ckpt = read_checkpoint(src)
    state = {"module." + k: v.detach().cpu().contiguous() for k, v in ckpt.state.items()}
    payload = {"epoch": ckpt.epoch if ckpt.epoch is not None else -1, "state_dict": state}
    atomic_write(out, lambda f: torch.save(payload, f))
    summary = {"keys": len(state), "encoder_k": any(k.startswith("encoder_k.") for k in ckpt.state),
               "queue": "queue" in ckpt.state, "epoch": ckpt.epoch}
    log.info("wrote %s: %d keys from %s (%s)", out, len(state), ckpt.path, ckpt.kind)
    return summary


def trunk_state_dict(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The query encoder's torchvision keys without the projection head (``fc.*``)."""
    trunk = {k: v.detach().cpu().contiguous() for k, v in read_checkpoint(src).encoder_state("q").items()
             if not k.startswith("fc.")}
    if "conv1.weight" not in trunk:
        raise CheckpointError(f"{src}: no conv1.weight in the query encoder; not a ResNet trunk")
    return trunk


def export_torchvision(src: str | os.PathLike, out: str | os.PathLike) -> int:
    """Save the trunk as a torchvision ResNet state dict (load with ``strict=False``: fc missing)."""
    trunk = trunk_state_dict(src)
    atomic_write(out, lambda f: torch.save(trunk, f))
    return len(trunk)


def detectron2_key(key: str) -> str:
    """method.md §8: MoCo's renaming of one torchvision trunk key to detectron2's ResNet names."""
    if "layer" not in key:
        key = "stem." + key
    key = re.sub(r"layer([1-4])", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"bn([1-3])", r"conv\1.norm", key)
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_model(src: str | os.PathLike) -> dict:
    """The detectron2 pickle payload: renamed trunk keys as numpy arrays, heuristics on.

    BatchNorm ``num_batches_tracked`` counters are dropped: detectron2's (Frozen)BN has no such
    buffer and would only report them as unused.
    """
    model = {detectron2_key(k): v.numpy() for k, v in trunk_state_dict(src).items()
             if not k.endswith(_BATCHES_TRACKED)}
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def export_detectron2(src: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write the detectron2 ``.pkl`` (for R50-C4 configs with ``WEIGHTS`` pointing at it)."""
    payload = detectron2_model(src)
    atomic_write(out, lambda f: pickle.dump(payload, f))
    return len(payload["model"])
