"""Write one shard: a WebDataset tar and its DALI index, all or nothing.

The tar is written under a temporary name, hashed while it is written, and renamed when complete
(a killed build never leaves a half shard). Members are USTAR with mtime 0,
mode 0444 and uid/gid 0, so a shard is a pure function of its samples: a resumed build writes the
same bytes as an uninterrupted one. The bytes are exactly what `tarfile` writes for those members
(a test checks it), but built from one `tarfile` header template with the name, size and checksum
patched in: `tarfile.addfile` costs ~80 us per member, a third of the copy path's whole budget.
webdataset's TarWriter stamps the current time and does not report member offsets, which the
index needs, so it is not used either.

The index is the text format of DALI's ``wds2idx`` (version ``v1.2``): a header line
``v1.2 <samples>``, then per sample its members as ``<ext> <data offset> <size> <member name>``,
space separated, in tar order. Writing it from the offsets we already know avoids re-reading the
tar with two ``tar`` processes per shard; tests check it equals ``wds2idx``'s output.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from core import faults
from shards.convert import InputError, encode_array, prepare
from shards.format import ShardRecord, encode_cls, encode_idx, index_name, sample_key, shard_name
from shards.manifest import BuildError
from shards.sources import SourceSpec, read_input

INDEX_VERSION = "v1.2"
BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: the samples in idx order, and how to turn inputs into image bytes."""

    out: str
    split: str
    number: int
    spec: SourceSpec
    idx_start: int
    inputs: list[str]
    labels: list[int]
    decisions: list[str]
    max_side: int | None
    quality: int


def _template() -> bytes:
    info = tarfile.TarInfo("")
    info.mode, info.mtime, info.size = 0o444, 0, 0
    return info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")


_TEMPLATE = _template()
_NUL = bytes(BLOCK)
# The header checksum is the byte sum of the header with its own field as spaces. Everything but the
# name and size fields is fixed, so their contribution is summed once here (summing 512 bytes per
# member cost a tenth of the copy path).
_FIXED_SUM = sum(_TEMPLATE[100:124]) + sum(_TEMPLATE[136:148]) + 8 * ord(" ") + sum(_TEMPLATE[156:])


def tar_member(name: str, data: bytes) -> list[bytes]:
    """Header, data and zero padding of one USTAR member, byte-identical to `tarfile`'s output."""
    header = bytearray(_TEMPLATE)
    encoded_name = name.encode("ascii")  # names are 16 ASCII characters
    size_field = b"%011o\0" % len(data)
    header[0:len(encoded_name)] = encoded_name  # the template's name field is all NUL
    header[124:136] = size_field
    header[148:155] = b"%06o\0" % (_FIXED_SUM + sum(encoded_name) + sum(size_field))
    return [bytes(header), data, _NUL[: -len(data) % BLOCK]]


def tar_end(size: int) -> bytes:
    """Two zero blocks, then zeros up to a whole tar record, as `tarfile.TarFile.close` writes."""
    size += 2 * BLOCK
    return bytes(2 * BLOCK + -size % tarfile.RECORDSIZE)


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
    data = None
    try:
        raw = read_input(task.spec, task.inputs[i])
        if not isinstance(raw, bytes):
            return encode_array(raw, task.quality)
        data, decision = prepare(raw, max_side=task.max_side, quality=task.quality)
    except OSError as err:
        decision = f"skip:unreadable file ({err.strerror})"
    except InputError as err:
        decision = f"skip:{err}"
    if decision != task.decisions[i]:
        raise BuildError(f"{task.inputs[i]}: changed during the build (scan said {task.decisions[i]!r}, "
                         f"now {decision!r}); rerun with --overwrite")
    assert data is not None  # the scan's decision for a sample written is never a skip
    return data


def _sample(task: ShardTask, i: int, pos: int) -> tuple[bytes, list[tuple[str, int, int, str]]]:
    """The tar bytes of the task's i-th sample written at offset `pos`, and its index entries."""
    idx = task.idx_start + i
    key = sample_key(idx)
    parts, members = [], []
    for ext, data in (("jpg", sample_image(task, i)), ("cls", encode_cls(task.labels[i])),
                      ("idx", encode_idx(idx))):
        members.append((ext, pos + BLOCK, len(data), f"{key}.{ext}"))
        parts += tar_member(f"{key}.{ext}", data)
        pos += BLOCK + len(data) + len(parts[-1])
    return b"".join(parts), members


def write_shard(task: ShardTask) -> ShardRecord:
    """Write shard ``task.number`` of ``task.split`` (tar + index) atomically; return its record."""
    out = Path(task.out)
    name = shard_name(task.split, task.number)
    tar_path, idx_path = out / name, out / index_name(name)
    entries, sha, pos = [], hashlib.sha256(), 0
    stall_at = faults.shard_stall_sample(task.number, len(task.inputs))
    with open(tmp_path(tar_path), "wb") as f:
        for i in range(len(task.inputs)):
            if i == stall_at:
                f.flush()
                faults.stall()
            blob, members = _sample(task, i, pos)
            f.write(blob)  # one write and one hash update per sample
            sha.update(blob)
            pos += len(blob)
            entries.append(members)
        end = tar_end(pos)
        f.write(end)
        sha.update(end)
        pos += len(end)
    index = index_text(entries).encode("ascii")
    tmp_path(idx_path).write_bytes(index)
    os.replace(tmp_path(idx_path), idx_path)
    os.replace(tmp_path(tar_path), tar_path)  # the tar appears last: it marks the shard complete
    return ShardRecord(name, len(task.inputs), sha.hexdigest(), pos, idx_path.name,
                       hashlib.sha256(index).hexdigest(), (task.idx_start, task.idx_start + len(task.inputs)))


def fsync_files(paths: list[Path]) -> None:
    """Flush files to disk (before the manifest names them; the kernel has written most already)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def shard_problem(out: Path, record: ShardRecord) -> str | None:
    """Why the tar or index of a finished shard does not match its record; None when both match."""
    tar_path, idx_path = out / record.name, out / record.index
    if not tar_path.is_file():
        return "missing"
    if not idx_path.is_file():
        return f"index file {record.index} missing"
    size = tar_path.stat().st_size
    if size != record.bytes:
        return f"{size} bytes, manifest says {record.bytes}"
    if sha256_file(idx_path) != record.index_sha256:
        return f"index file {record.index}: sha256 differs from the manifest"
    if sha256_file(tar_path) != record.sha256:
        return "sha256 differs from the manifest"
    return None


def shard_is_complete(out: Path, record: ShardRecord) -> bool:
    """True when the tar and index of a finished shard exist and match its record's checksums."""
    return shard_problem(out, record) is None
