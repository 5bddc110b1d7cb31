"""`hcsc-shards verify` and `info`: check a shard folder against its ``_info.json``; summarise it.

Per shard: the file exists with the recorded size and sha256; every sample has exactly the members
``jpg|png``, ``cls`` and ``idx``; the key equals the idx digits; cls is a valid class id; idx lies in
the shard's recorded range; the sample count matches; the ``.idx`` file equals the DALI index of the
tar as it is on disk; with ``decode`` every image decodes to an RGB-convertible picture. Per split:
shard counts add up, idx covers ``0..N-1`` exactly once, and no shard file is missing from the
manifest. Every problem is one line naming the split, the shard and, where there is one, the sample.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import tarfile
from collections import defaultdict
from pathlib import Path

from PIL import Image

from shards.build import start_method
from shards.format import (
    CLS_WIDTH,
    IDX_WIDTH,
    IMAGE_EXTS,
    ShardFormatError,
    ShardRecord,
    SplitManifest,
    parse_split,
    read_info,
)
from shards.writer import index_text, sha256_file

MAX_LISTED = 20  # per kind of idx problem; the count of the rest follows in one line


def verify(folder: str | Path, *, split: str | None = None, decode: bool = False,
           workers: int = 1) -> list[str]:
    """All problems found in a shard folder, one line each; an empty list means it is sound."""
    folder = Path(folder)
    try:
        info = read_info(folder)
    except ShardFormatError as err:
        return [str(err)]
    splits = info.get("splits", {})
    if split is not None and split not in splits:
        return [f"{folder}: no split {split!r} in the manifest (has {sorted(splits)})"]
    problems = []
    for name in [split] if split else sorted(splits):
        try:
            entry = parse_split(folder, name, splits[name])
        except ShardFormatError as err:
            problems.append(str(err))
            continue
        problems += _check_split(folder, name, entry, decode, workers)
    return problems


def _check_split(folder: Path, split: str, entry: SplitManifest, decode: bool, workers: int) -> list[str]:
    check = functools.partial(check_shard, folder, split, num_classes=entry.num_classes,
                              decode=decode)
    if workers > 1:
        with multiprocessing.get_context(start_method()).Pool(workers) as pool:
            results = pool.map(check, entry.shards)
    else:
        results = list(map(check, entry.shards))
    problems = [p for shard_problems, _ in results for p in shard_problems]
    listed = {s.name for s in entry.shards}
    problems += [f"{split}/{p.name}: shard file not listed in the manifest"
                 for p in sorted(folder.glob(f"{split}-*.tar")) if p.name not in listed]
    recorded = sum(s.num_samples for s in entry.shards)
    if recorded != entry.num_samples:
        problems.append(f"{split}: shards hold {recorded} samples, manifest says {entry.num_samples}")
    locations = defaultdict(list)
    for shard, (_, samples) in zip(entry.shards, results, strict=True):
        for idx in samples:
            locations[idx].append(shard.name)
    return problems + _coverage(split, entry.num_samples, locations)


def _coverage(split: str, n: int, locations: dict[int, list[str]]) -> list[str]:
    """idx must cover 0..n-1 exactly once (the key into im2cluster, docs/architecture.md#shards)."""
    problems = [f"{split}/{','.join(names)}: sample {idx:0{IDX_WIDTH}d}: idx appears {len(names)} times"
                for idx, names in sorted(locations.items()) if len(names) > 1]
    problems += [f"{split}/{names[0]}: sample {idx:0{IDX_WIDTH}d}: idx outside 0..{n - 1}"
                 for idx, names in sorted(locations.items()) if not 0 <= idx < n]
    missing = [i for i in range(n) if i not in locations]
    problems += [f"{split}: idx {i} is in no shard" for i in missing]
    if len(problems) > MAX_LISTED:
        problems = problems[:MAX_LISTED] + [f"{split}: ... and {len(problems) - MAX_LISTED} more"]
    return problems


def check_shard(folder: Path, split: str, record: ShardRecord, *, num_classes: int,
                decode: bool) -> tuple[list[str], list[int]]:
    """(problems, idx of every readable sample) for one shard and its index file."""
    where = f"{split}/{record.name}"
    path = folder / record.name
    if not path.is_file():
        return [f"{where}: missing"], []
    problems = []
    if path.stat().st_size != record.bytes:
        problems.append(f"{where}: {path.stat().st_size} bytes, manifest says {record.bytes}")
    elif sha256_file(path) != record.sha256:
        problems.append(f"{where}: sha256 differs from the manifest (corrupted or replaced)")
    try:
        samples, entries = _read_tar(path)
    except (tarfile.TarError, OSError, ValueError) as err:
        return problems + [f"{where}: unreadable tar ({err})"], []
    if len(samples) != record.num_samples:
        problems.append(f"{where}: {len(samples)} samples, manifest says {record.num_samples}")
    problems += _check_index(folder / record.index, where, entries)
    idxs = []
    for key, members in samples.items():
        idx, sample_problems = _check_sample(key, members, record.idx_range, num_classes, decode)
        problems += [f"{where}: sample {key}: {p}" for p in sample_problems]
        if idx is not None:
            idxs.append(idx)
    return problems, idxs


def _read_tar(path: Path) -> tuple[dict[str, dict[str, bytes]], list[list[tuple]]]:
    samples: dict[str, dict[str, bytes]] = {}
    entries: list[list[tuple]] = []
    with tarfile.open(path, "r:") as tar:
        last = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            file = tar.extractfile(member)
            assert file is not None  # a regular file member
            data = file.read()
            samples.setdefault(key, {})[ext] = data
            if key != last:
                entries.append([])
                last = key
            entries[-1].append((ext, member.offset_data, member.size, member.name))
    return samples, entries


def _check_index(path: Path, where: str, entries: list[list[tuple]]) -> list[str]:
    if not path.is_file():
        return [f"{where}: index file {path.name} missing"]
    expected, actual = index_text(entries).splitlines(), path.read_text().splitlines()
    if expected == actual:
        return []
    line = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
                min(len(expected), len(actual)))
    return [f"{where}: index file {path.name} does not match the tar (line {line + 1})"]


def _check_sample(key: str, members: dict[str, bytes], idx_range: tuple[int, int], num_classes: int,
                  decode: bool) -> tuple[int | None, list[str]]:
    problems = []
    images = [e for e in IMAGE_EXTS if e in members]
    extra = sorted(set(members) - set(IMAGE_EXTS) - {"cls", "idx"})
    if len(images) != 1 or extra:
        problems.append(f"members {sorted(members)}: expected one of {list(IMAGE_EXTS)}, cls and idx")
    cls, idx = _digits(members.get("cls"), CLS_WIDTH), _digits(members.get("idx"), IDX_WIDTH)
    if cls is None or not 0 <= cls < num_classes:
        problems.append(f"cls {members.get('cls')!r} is not a class id below {num_classes}")
    if idx is None:
        problems.append(f"idx {members.get('idx')!r} is not {IDX_WIDTH} ASCII digits")
    elif key != members["idx"].decode():
        problems.append(f"key differs from idx {members['idx'].decode()}")
    elif not idx_range[0] <= idx < idx_range[1]:
        problems.append(f"idx {idx} outside the shard's range [{idx_range[0]}, {idx_range[1]}]")
    if decode and images:
        try:
            with Image.open(io.BytesIO(members[images[0]])) as img:
                img.convert("RGB").load()
        except Exception as err:  # any decoder failure is a finding to report, not a crash
            problems.append(f"{images[0]} does not decode ({type(err).__name__}: {err})")
    return idx, problems


def _digits(value: bytes | None, width: int) -> int | None:
    if value is None or len(value) != width or not value.isdigit():
        return None
    return int(value)


def summary(folder: str | Path) -> str:
    """A short human summary of a shard folder: per split samples, classes, shards, bytes, params."""
    folder = Path(folder)
    info = read_info(folder)
    lines = [f"{folder} (format {info['format_version']})"]
    for split, raw in sorted(info.get("splits", {}).items()):
        e = parse_split(folder, split, raw)
        total = sum(s.bytes for s in e.shards)
        names = e.class_names
        shown = ", ".join(names[:5]) + (f", ... ({len(names)})" if len(names) > 5 else "")
        lines += [f"{split}: {e.num_samples} samples, {len(names)} classes [{shown}], "
                  f"{len(e.shards)} shards, {total / 1e6:.1f} MB",
                  f"  source {e.source}",
                  f"  params {e.params}, {e.tool_version}",
                  f"  copied {e.copied}, converted {e.converted or 0}, skipped {len(e.skipped)}"
                  + (f", empty classes {e.empty_classes}" if e.empty_classes else "")]
    return "\n".join(lines)
