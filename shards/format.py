"""The on-disk shard format: the contract between `hcsc-shards`, the pipeline and clustering.

A shard folder holds, for each split S (``train``, ``val``):
  - ``S-000000.tar`` ... : WebDataset tars with equal sample counts (the last one may be short);
  - ``S-000000.idx`` ... : the DALI index of each tar (the format DALI's ``wds2idx`` writes), so
    ``fn.readers.webdataset`` needs no scan;
and one ``_info.json`` (written last, atomically) describing every split built into the folder.

Each sample has four members:
  - ``__key__``: the global index as 12 zero-padded digits (stable for a source and seed);
  - ``jpg`` (or ``png``): the encoded image;
  - ``cls``: the class id as 10 zero-padded ASCII digits;
  - ``idx``: the global int64 index as 12 zero-padded ASCII digits.
Why fixed-width ASCII: ``int(b"0000000042")`` is what webdataset's default ``.cls`` decoder does,
and a fixed width lets DALI hand the digits out as a dense uint8 [B, width] tensor that
`digits_to_int` turns into integers on the device without any host-side string parsing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily so shard-building worker processes start fast
    import torch

FORMAT_VERSION = 1
INFO_NAME = "_info.json"
CLS_WIDTH = 10
IDX_WIDTH = 12
IMAGE_EXTS = ("jpg", "png")


class ShardFormatError(ValueError):
    """A shard folder or manifest that cannot be used; the message names the file."""


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def sample_key(idx: int) -> str:
    return f"{idx:0{IDX_WIDTH}d}"


def encode_cls(cls: int) -> bytes:
    return f"{cls:0{CLS_WIDTH}d}".encode("ascii")


def encode_idx(idx: int) -> bytes:
    return f"{idx:0{IDX_WIDTH}d}".encode("ascii")


def digits_to_int(digits: torch.Tensor) -> torch.Tensor:
    """Fixed-width ASCII digits, uint8 [B, W], to int64 [B] (on the tensor's device)."""
    import torch

    values = digits.to(torch.int64) - ord("0")
    width = values.shape[-1]
    powers = 10 ** torch.arange(width - 1, -1, -1, device=values.device, dtype=torch.int64)
    return (values * powers).sum(-1)


def read_info(folder: str | os.PathLike) -> dict[str, Any]:
    """Load ``_info.json`` of a shard folder, with a one-line error when it is missing or bad."""
    path = Path(folder) / INFO_NAME
    if not path.is_file():
        raise ShardFormatError(f"{path}: no shard manifest; build shards with `hcsc-shards build`")
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ShardFormatError(f"{path}: unreadable manifest ({err})") from None
    if info.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {info.get('format_version')!r}, "
                               f"this tool reads {FORMAT_VERSION}; rebuild the shards")
    return info


def split_info(folder: str | os.PathLike, split: str) -> dict[str, Any]:
    """The manifest entry of one split: num_samples, class_names, shards [{name, num_samples,
    sha256, bytes, index, index_sha256, idx_range}], idx_range ([start, stop), half-open), source,
    params, tool_version, fingerprint, converted {reason: count}, skipped [{input, reason}],
    empty_classes."""
    info = read_info(folder)
    splits = info.get("splits", {})
    if split not in splits:
        raise ShardFormatError(f"{Path(folder) / INFO_NAME}: no split {split!r} "
                               f"(has {sorted(splits)}); build it with --split {split}")
    return splits[split]


