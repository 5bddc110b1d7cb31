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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class ShardRecord:
    """One tar of a split as the manifest records it (also a finished shard's resume record)."""

    name: str  # SPLIT-NNNNNN.tar
    num_samples: int
    sha256: str  # of the tar
    bytes: int  # size of the tar
    index: str  # the DALI index file's name
    index_sha256: str
    idx_range: tuple[int, int]  # [start, stop) of the global idx of its samples

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "idx_range": list(self.idx_range)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardRecord:
        start, stop = d["idx_range"]
        return cls(str(d["name"]), int(d["num_samples"]), str(d["sha256"]), int(d["bytes"]),
                   str(d["index"]), str(d["index_sha256"]), (int(start), int(stop)))


@dataclass(frozen=True)
class SplitManifest:
    """One split's entry in ``_info.json``: what it holds and how it was built."""

    num_samples: int
    class_names: list[str]  # class id -> name
    shards: list[ShardRecord]
    split: str
    source: dict[str, Any]  # `shards.sources.SourceSpec.to_json()`
    params: dict[str, Any]  # seed, samples_per_shard, max_side, quality, limit
    tool_version: str
    fingerprint: str  # of (format, source, split, params): what makes a rerun "the same build"
    source_digest: str = ""  # of the listed inputs and their sizes
    num_inputs: int = 0  # inputs considered (after --limit)
    copied: int = 0  # JPEG bytes copied unchanged
    converted: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"input", "reason"}
    empty_classes: list[str] = field(default_factory=list)  # class folders without an image

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def idx_range(self) -> tuple[int, int]:
        return 0, self.num_samples

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(shards=[s.to_json() for s in self.shards], num_classes=self.num_classes,
                   idx_range=list(self.idx_range))
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SplitManifest:
        return cls(num_samples=int(d["num_samples"]), class_names=list(d["class_names"]),
                   shards=[ShardRecord.from_json(s) for s in d["shards"]], split=str(d["split"]),
                   source=dict(d["source"]), params=dict(d["params"]),
                   tool_version=str(d["tool_version"]), fingerprint=str(d["fingerprint"]),
                   source_digest=str(d.get("source_digest", "")), num_inputs=int(d.get("num_inputs", 0)),
                   copied=int(d.get("copied", 0)), converted=dict(d.get("converted") or {}),
                   skipped=list(d.get("skipped", [])), empty_classes=list(d.get("empty_classes", [])))


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


def split_info(folder: str | os.PathLike, split: str) -> SplitManifest:
    """The manifest entry of one split of a shard folder."""
    splits = read_info(folder).get("splits", {})
    if split not in splits:
        raise ShardFormatError(f"{Path(folder) / INFO_NAME}: no split {split!r} "
                               f"(has {sorted(splits)}); build it with --split {split}")
    return parse_split(folder, split, splits[split])


def parse_split(folder: str | os.PathLike, split: str, entry: Mapping[str, Any]) -> SplitManifest:
    """`SplitManifest.from_json` with a one-line error naming the manifest and the bad field."""
    try:
        return SplitManifest.from_json(entry)
    except (KeyError, TypeError, ValueError) as err:
        raise ShardFormatError(f"{Path(folder) / INFO_NAME}: split {split!r} has a damaged entry "
                               f"({type(err).__name__}: {err}); rebuild the split") from None


