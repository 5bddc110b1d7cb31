"""One reader for every checkpoint an evaluation accepts, and the backbone loader (method.md §8).

Accepted inputs, all read with ``torch.load(..., weights_only=True)`` (no code runs on load):
  - a run directory of our trainer (``RUN/checkpoints/latest`` names the newest tag);
  - one checkpoint tag folder (``mp_rank_00_model_states.pt``, whose ``module`` is the HCSC state
    dict, or else ``hcsc_official.pth.tar``);
  - an official HCSC ``.pth`` (``{"state_dict": {"module.encoder_q.*", ...}}``), with or without
    the ``state_dict`` wrapper or the ``module.`` prefix (also what ``hcsc-eval import-official``
    writes);
  - a trunk exported by ``hcsc-eval export --format torchvision`` (plain ResNet keys, no ``fc``).
Every layout is normalised to HCSC module keys (``encoder_q.*``, optionally ``encoder_k.*`` and
the queue buffers); a plain trunk becomes ``encoder_q.*``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from core.errors import first_line
from core.runfolder import DS_MODEL_FILE, OFFICIAL_FILE, RunFolder
from evaluate.checks import ArgumentError
from model.encoders import create_encoder, list_encoders

log = logging.getLogger(__name__)

_SHOW = 5  # keys named in a mismatch message


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the fix."""


@dataclass
class Checkpoint:
    """A checkpoint normalised to HCSC module keys.

    Attributes:
        state: ``encoder_q.*`` (always), ``encoder_k.*`` / ``queue*`` when the file has them.
        path: the file actually read.
        kind: "deepspeed", "official" or "torchvision" (what the file looked like).
        epoch: the epoch recorded in the file, if any.
        config_yaml: the resolved training config stored with our checkpoints, if any.
    """

    state: dict[str, torch.Tensor]
    path: Path
    kind: str
    epoch: int | None = None
    config_yaml: str | None = None

    def encoder_state(self, which: str = "q") -> dict[str, torch.Tensor]:
        """The torchvision keys of ``encoder_q`` (or ``encoder_k``), head included when present."""
        prefix = f"encoder_{which}."
        return {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}

    def encoder_name(self) -> str | None:
        """``model.encoder`` of the stored training config (our checkpoints only)."""
        if not self.config_yaml:
            return None
        from omegaconf import DictConfig, OmegaConf

        return cast(DictConfig, OmegaConf.create(self.config_yaml)).get("model", {}).get("encoder")


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format: a zip archive
_PICKLE_PROTOCOLS = range(2, 6)  # torch.save's legacy format: a pickle, protocol 2 and up
# What torch's weights-only unpickler says when a pickle needs a class or function to be rebuilt.
_NEEDS_CODE = re.compile(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)")
_BAD_OPCODE = re.compile(r"Unsupported operand \d+")
_HOW = "pass a file saved with torch.save, a run directory or a checkpoint tag folder"


def sniff(path: Path) -> None:
    """Refuse a file that is neither of torch.save's formats (zip archive, pickle) from its first bytes.

    Raises:
        CheckpointError: an empty, unreadable or foreign file (text, an image, random bytes).
    """
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or type(err).__name__}); check its "
                              "permissions") from None
    if not head:
        raise CheckpointError(f"{path}: empty file, not a torch checkpoint; {_HOW}")
    if head != _ZIP_MAGIC and not (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS):
        raise CheckpointError(f"{path}: not a torch checkpoint (neither the zip archive nor the pickle "
                              f"torch.save writes); {_HOW}")


def torch_load(path: str | os.PathLike) -> object:
    """`torch.load` with ``weights_only=True`` and one-line errors for people.

    Three failures are told apart: a file that is no torch checkpoint at all (random bytes, text, a
    plain pickle), a damaged one (a truncated archive), and a real checkpoint that holds objects only
    code can rebuild (refused: ``weights_only`` runs no code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    sniff(path)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols would add console lines
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        code = _NEEDS_CODE.search(str(err))
        if code:
            raise CheckpointError(f"{path}: refusing to unpickle code (it holds a {code.group(1)}, and "
                                  "weights_only=True rebuilds only tensors, dicts, lists and numbers); "
                                  "re-save it as plain tensors, e.g. torch.save({'state_dict': sd}, path)"
                                  ) from None
        opcode = _BAD_OPCODE.search(str(err))
        raise CheckpointError(f"{path}: not a torch checkpoint (a pickle torch.save did not write: "
                              f"{opcode.group(0) if opcode else first_line(err)}); {_HOW}") from None
    except Exception as err:  # a damaged file fails anywhere inside torch.load
        raise CheckpointError(f"{path}: not a readable torch checkpoint, damaged or truncated? "
                              f"({type(err).__name__}: {first_line(err)})") from None


def check_checkpoint(path: str | os.PathLike) -> Path:
    """Before any work: the file `path` names exists and looks like a torch checkpoint."""
    file = resolve(path)
    sniff(file)
    return file


def resolve(path: str | os.PathLike) -> Path:
    """The file to read for `path`: a run dir -> its latest tag -> the tag's model file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if path.is_file():
        return path
    run = RunFolder.at(path)
    if run.checkpoints.is_dir():  # a run directory
        if not run.pointer.is_file():
            raise CheckpointError(f"{path}: run directory without {run.pointer.relative_to(path)}; "
                                  "it has no complete checkpoint yet")
        path = run.checkpoint(run.pointer.read_text().strip())
        if not path.is_dir():
            raise CheckpointError(f"{run.pointer}: names {path.name!r}, which does not exist")
    for name in (DS_MODEL_FILE, OFFICIAL_FILE):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: folder holds neither {DS_MODEL_FILE} nor {OFFICIAL_FILE}; pass a run "
                          "directory, a checkpoint tag folder or a .pth file")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any accepted checkpoint (see the module docstring) into HCSC module keys."""
    file = resolve(path)
    obj = torch_load(file)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, expected a dict of tensors")
    epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    config_yaml = obj.get("config_yaml") if isinstance(obj.get("config_yaml"), str) else None
    if config_yaml is None and file.name == DS_MODEL_FILE:
        config_yaml = _run_config(file)
    if isinstance(obj.get("module"), Mapping):  # DeepSpeed model states: HCSC module keys
        state, kind = dict(obj["module"]), "deepspeed"
    elif isinstance(obj.get("state_dict"), Mapping):  # method.md §8 recipe step 1
        state, kind = dict(obj["state_dict"]), "official"
    else:
        state, kind = dict(obj), "official"
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not any(k.startswith("encoder_q.") for k in tensors):
        if "conv1.weight" not in tensors:
            raise CheckpointError(f"{file}: no encoder_q.* (official HCSC) and no conv1.weight (torchvision "
                                  f"trunk) keys; first keys: {sorted(tensors)[:_SHOW]}")
        tensors, kind = {"encoder_q." + k: v for k, v in tensors.items()}, "torchvision"
    return Checkpoint(tensors, file, kind, epoch, config_yaml)


def stored_eval_sizes(path: str | os.PathLike) -> tuple[int, int] | None:
    """(data.image_size, data.eval_resize) of the run that wrote `path` (our checkpoints only), so
    evaluating a 32 px run does not default to ImageNet's 224/256."""
    try:
        file = resolve(path)
    except CheckpointError:
        return None
    text = _run_config(file)
    if not text:
        return None
    from omegaconf import DictConfig, OmegaConf

    data = cast(DictConfig, OmegaConf.create(text)).get("data", {})
    if "image_size" not in data or "eval_resize" not in data:
        return None
    return int(data["image_size"]), int(data["eval_resize"])


def _run_config(model_file: Path) -> str | None:
    """The config.yaml of the run whose checkpoint folder holds `model_file`, if any."""
    run = RunFolder.of_checkpoint(model_file.parent)
    return run.config.read_text() if run is not None and run.config.is_file() else None


def load_backbone(path: str | os.PathLike, encoder: str | None = None) -> tuple[nn.Module, int]:
    """The frozen query-encoder trunk of a checkpoint, head dropped (method.md §7.1, method.md §8 recipe).

    Args:
        path: run dir, checkpoint tag folder, official ``.pth`` or exported torchvision file.
        encoder: registry name; None takes ``model.encoder`` from our checkpoint's config, else
            "resnet50".

    Returns:
        ``(trunk, feat_dim)``: ``trunk(x)`` gives pooled features (B, feat_dim); eval mode, no grads.

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not fit `encoder` (named).
        ArgumentError: `encoder` is not a registered name.
    """
    if encoder is not None and encoder not in list_encoders():
        raise ArgumentError(f"--encoder {encoder!r}: unknown encoder; choose one of {list_encoders()}")
    ckpt = read_checkpoint(path)
    stored = ckpt.encoder_name() if encoder is None else None
    if stored is not None and stored not in list_encoders():
        raise CheckpointError(f"{ckpt.path}: its run used encoder {stored!r}, which this install does not "
                              f"know; pass --encoder, one of {list_encoders()}")
    encoder = encoder or stored or "resnet50"
    trunk, feat_dim = create_encoder(encoder)
    load_trunk_weights(trunk, feat_dim, ckpt.encoder_state("q"), where=f"{ckpt.path} (encoder {encoder!r})")
    trunk.fc = nn.Identity()
    trunk.eval().requires_grad_(False)
    log.info("loaded %s trunk from %s (%s checkpoint%s)", encoder, ckpt.path, ckpt.kind,
             f", epoch {ckpt.epoch}" if ckpt.epoch is not None else "")
    return trunk, feat_dim


def load_trunk_weights(trunk: nn.Module, feat_dim: int, state: Mapping[str, torch.Tensor], *,
                       where: str) -> None:
    """Load trunk keys (``fc.*`` dropped) into `trunk`; only ``fc.weight``/``fc.bias`` may be missing.

    The trunk gets a real ``fc`` first, so the method.md §8 check "missing == {fc.weight, fc.bias}" is
    a real check rather than a tautology of ``fc = Identity``.
    """
    trunk.fc = nn.Linear(feat_dim, 1)
    keep = {k: v for k, v in state.items() if not k.startswith("fc.")}
    ours = trunk.state_dict()
    bad_shapes = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in keep.items()
                  if k in ours and tuple(v.shape) != tuple(ours[k].shape)]
    missing = sorted(set(ours) - set(keep) - {"fc.weight", "fc.bias"})
    unexpected = sorted(set(keep) - set(ours))
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"{where}: weights do not fit: {len(missing)} missing {missing[:_SHOW]}, {len(unexpected)} "
            f"unexpected {unexpected[:_SHOW]}, {len(bad_shapes)} of another shape {bad_shapes[:_SHOW]}; "
            "pass the --encoder the checkpoint was trained with")
    result = trunk.load_state_dict(keep, strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"}, result  # method.md §8 recipe step 5
