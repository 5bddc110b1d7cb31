"""Read-modify-write of ``_info.json`` for the builder: one entry per split, merged under a lock.

Building split ``val`` into a folder that holds ``train`` is normal: each build replaces only its own
split's entry. The read-modify-write holds an exclusive `fcntl` lock on ``.info.lock`` so two builds
of different splits into one folder cannot lose each other's entry; the file itself is replaced
atomically (`core.files.write_json_atomic`), so readers never see half a manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from core.files import write_json_atomic
from shards.format import (
    FORMAT_VERSION,
    INFO_NAME,
    ShardFormatError,
    SplitManifest,
    index_name,
    parse_split,
    read_info,
)
from shards.sources import SourceSpec


class BuildError(ValueError):
    """A build the tool refuses to run; the message is one line saying what to do."""


def load_manifest(out: Path) -> dict:
    """The folder's manifest, ``{}`` when there is none; a bad one is an error, never overwritten."""
    if not (out / INFO_NAME).is_file():
        return {}
    try:
        return read_info(out)
    except ShardFormatError as err:
        raise BuildError(f"{err}; move it away or build into another --out") from None


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    with open(out / ".info.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_manifest(out: Path, split: str, entry: SplitManifest) -> None:
    """Set ``splits[split] = entry``, keeping the other splits."""
    with _locked(out):
        info = load_manifest(out) or {"format_version": FORMAT_VERSION, "splits": {}}
        info.setdefault("splits", {})[split] = entry.to_json()
        write_json_atomic(out / INFO_NAME, info)


def remove_split(out: Path, split: str) -> None:
    """Forget a split (``--overwrite``): its manifest entry first, then its shard and index files."""
    with _locked(out):
        info = load_manifest(out)
        if split in info.get("splits", {}):
            del info["splits"][split]
            write_json_atomic(out / INFO_NAME, info)
    for tar in out.glob(f"{split}-*.tar"):
        Path(out / index_name(tar.name)).unlink(missing_ok=True)
        tar.unlink()
    for stray in out.glob(f"{split}-*.idx"):
        stray.unlink()


def other_class_names(out: Path, split: str, spec: SourceSpec) -> list[str] | None:
    """For an ``imagenet-val`` source: the class names of the folder's ``train`` split, so that a
    label like ``n01440764`` gets the same id as the train folder of that name."""
    if spec.kind != "imagenet-val" or split == "train":
        return None
    entry = load_manifest(out).get("splits", {}).get("train")
    return None if entry is None else parse_split(out, "train", entry).class_names
