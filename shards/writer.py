"""Write one shard: a WebDataset tar, its DALI index, and a completion record; all or nothing.

The tar is written under a temporary name, hashed while it is written, and renamed when complete
(design.md section 3: a killed build never leaves a half shard). Headers come from `tarfile`
(USTAR, mtime 0, uid/gid 0) so a shard is a pure function of its samples: a resumed build writes
the same bytes as an uninterrupted one. webdataset's TarWriter stamps the current time and does not
report member offsets, which the index needs, so it is not used here.

The index is the text format of DALI's ``wds2idx`` (version ``v1.2``): a header line
``v1.2 <samples>``, then per sample its members as ``<ext> <data offset> <size> <member name>``,
space separated, in tar order. Writing it from the offsets we already know avoids re-reading the
tar with two ``tar`` processes per shard; tests check it equals ``wds2idx``'s output.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from shards.convert import InputError, encode_array, prepare
from shards.format import encode_cls, encode_idx, index_name, sample_key, shard_name
from shards.manifest import BuildError
from shards.sources import read_input

INDEX_VERSION = "v1.2"
STALL_ENV = "HCSC_SHARDS_TEST_STALL_AFTER"  # test hook, see shards.build
BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: the samples in idx order, and how to turn inputs into image bytes."""

    out: str
    split: str
    number: int
    spec: dict
    idx_start: int
    inputs: list[str]
    labels: list[int]
    decisions: list[str]
    max_side: int | None
    quality: int
    fsync: bool = True


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what goes through it and counts bytes."""

    def __init__(self, f):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.pos += len(b)
        return len(b)


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def index_text(entries: list[list[tuple[str, int, int, str]]]) -> str:
    """DALI ``wds2idx`` v1.2 text from per-sample member lists of (ext, data offset, size, name)."""
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) for sample in entries]
    return "\n".join(lines) + "\n"


def sample_image(task: ShardTask, i: int) -> bytes:
    """The image bytes of the task's i-th sample, checked against the decision of the scan."""
    raw = read_input(task.spec, task.inputs[i])
    if not isinstance(raw, bytes):
        return encode_array(raw, task.quality)
    try:
        data, decision = prepare(raw, max_side=task.max_side, quality=task.quality)
    except InputError as err:
        decision, data = f"skip:{err}", None
    if decision != task.decisions[i]:
        raise BuildError(f"{task.inputs[i]}: changed during the build (scan said {task.decisions[i]!r}, "
                           f"now {decision!r}); rerun with --overwrite")
    return data


def _add(tar: tarfile.TarFile, hf: _HashingFile, name: str, data: bytes) -> tuple[str, int, int, str]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))
    # The data ends where the writer stands, less the zero padding to a whole block.
    offset = hf.pos - (len(data) + BLOCK - 1) // BLOCK * BLOCK
    return name.split(".", 1)[1], offset, len(data), name


def write_shard(task: ShardTask) -> dict:
    """Write shard ``task.number`` of ``task.split`` (tar + index) atomically; return its record."""
    out = Path(task.out)
    name = shard_name(task.split, task.number)
    tar_path, idx_path = out / name, out / index_name(name)
    entries = []
    stall = os.environ.get(STALL_ENV)
    stall_at = len(task.inputs) // 2 if stall and task.number >= int(stall) else -1
    with open(tmp_path(tar_path), "wb") as raw:
        hf = _HashingFile(raw)
        with tarfile.open(fileobj=hf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(len(task.inputs)):
                if i == stall_at:
                    raw.flush()
                    time.sleep(3600)
                idx = task.idx_start + i
                key = sample_key(idx)
                entries.append([_add(tar, hf, f"{key}.jpg", sample_image(task, i)),
                                _add(tar, hf, f"{key}.cls", encode_cls(task.labels[i])),
                                _add(tar, hf, f"{key}.idx", encode_idx(idx))])
        _sync(raw, task.fsync)
    index = index_text(entries).encode("ascii")
    with open(tmp_path(idx_path), "wb") as f:
        f.write(index)
        _sync(f, task.fsync)
    os.replace(tmp_path(idx_path), idx_path)
    os.replace(tmp_path(tar_path), tar_path)  # the tar appears last: it marks the shard complete
    return {"name": name, "num_samples": len(task.inputs), "sha256": hf.sha.hexdigest(),
            "bytes": hf.pos, "index": idx_path.name, "index_sha256": hashlib.sha256(index).hexdigest(),
            "idx_range": [task.idx_start, task.idx_start + len(task.inputs)]}


def _sync(f, enabled: bool) -> None:
    f.flush()
    if enabled:
        os.fsync(f.fileno())


def shard_is_complete(out: Path, record: dict) -> bool:
    """True when the tar and index of a finished shard exist and match its record's checksums."""
    tar_path, idx_path = out / record["name"], out / record["index"]
    if not (tar_path.is_file() and idx_path.is_file()):
        return False
    if tar_path.stat().st_size != record["bytes"]:
        return False
    return (sha256_file(idx_path) == record["index_sha256"]
            and sha256_file(tar_path) == record["sha256"])
