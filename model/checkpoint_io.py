"""The official HCSC checkpoint layout (method.md §8) to and from an `HCSC` module.

Official `state_dict` keys come from a DDP-wrapped model: ``module.encoder_q.<torchvision key>``
(head at ``fc.0.*`` / ``fc.2.*``), ``module.encoder_k.*`` and ``module.queue``, ``module.queue_ptr``,
``module.queue_index``. Our module has the same names without ``module.``, so the mapping is the
prefix. Released files may lack the momentum encoder or the queue: then encoder_k becomes a copy
of encoder_q and the queue keeps its current (random) contents, both logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

PREFIX = "module."
QUEUE_KEYS = ("queue", "queue_ptr", "queue_index")


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our HCSC state dict under the official keys (``module.encoder_q.*``, ``module.queue``, ...)."""
    return {PREFIX + k: v for k, v in model.state_dict().items()}


def _strip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]  # a whole training checkpoint (method.md §8 recipe step 1)
    return {k.removeprefix(PREFIX): v for k, v in state_dict.items()}


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an official (or `official_state_dict`) state dict into `model` in place.

    Args:
        model: an `HCSC` module (submodules `encoder_q`, `encoder_k`; queue buffers).
        state_dict: keys with or without the ``module.`` prefix, or a checkpoint dict holding one
            under ``state_dict``.

    Raises:
        KeyError: keys missing from or unexpected in the file, named (beyond the tolerated groups).
        ValueError: a tensor whose shape differs from the model's, named with both shapes.
    """
    given = _strip(state_dict)
    ours = model.state_dict()
    if not any(k.startswith("encoder_k.") for k in given):
        log.warning("checkpoint has no encoder_k: the momentum encoder starts as a copy of encoder_q")
        given.update({"encoder_k." + k[len("encoder_q."):]: v for k, v in given.items()
                      if k.startswith("encoder_q.")})
    absent = [k for k in QUEUE_KEYS if k not in given]
    if absent:
        log.warning("checkpoint has no %s: keeping the model's current values", ", ".join(absent))
        given.update({k: ours[k] for k in absent})
    missing = sorted(set(ours) - set(given))
    unexpected = sorted(set(given) - set(ours))
    if missing or unexpected:
        raise KeyError(f"official checkpoint does not match the model ({len(missing)} missing, "
                       f"{len(unexpected)} unexpected): missing={missing[:20]} unexpected={unexpected[:20]}; "
                       "check model.encoder, model.dim, model.mlp and model.queue_size")
    for key, value in given.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ValueError(f"checkpoint key {PREFIX + key!r} has shape {tuple(value.shape)}, the model "
                             f"expects {tuple(ours[key].shape)}; check model.dim / model.queue_size")
    model.load_state_dict(given, strict=True)
