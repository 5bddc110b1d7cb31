"""`hcsc-shards verify` and `info`: check a shard folder against its ``_info.json``; summarise it.

Per shard: the file exists with the recorded size and sha256; every sample has exactly the members
``jpg|png``, ``cls`` and ``idx``; the key equals the idx digits; cls is a valid class id; idx lies in
the shard's recorded range; the sample count matches; the ``.idx`` file equals the DALI index of the
tar as it is on disk; with ``decode`` every image decodes to an RGB-convertible picture. Per split:
shard counts add up, idx covers ``0..N-1`` exactly once, and no shard file is missing from the
manifest. Every problem is one line naming the split, the shard and, where there is one, the sample.
`check_folder` also says which shards are bad and which ``hcsc-shards build`` command repairs them
(the manifest records the source and the build parameters).
"""

from __future__ import annotations

import bisect
import functools
import io
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from shards.build import build_command, process_pool
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
MAX_NAMED = 10  # bad shards named in the summary line


@dataclass
class SplitReport:
    """The findings of `verify` for one split.

    Attributes:
        split: its name.
        shards: the shards the manifest lists.
        bad: those with at least one problem (their own, or an idx they should hold or hold twice).
        problems: one line each, the split's and its shards'.
        others: problems about no manifest shard (a stray file, a count or idx ranges that do not
            add up, an unreadable entry).
        stray: ``SPLIT-*.tar`` files the manifest does not list (no build removes them but
            ``--overwrite``; moving them away is enough).
        command: the ``hcsc-shards build`` command that repairs the split, None when it is sound (or
            its manifest entry is unreadable): the same command as its build, which rewrites only
            the shards whose files differ from the manifest, or that command with ``--overwrite``
            when the manifest itself disagrees with the shards (a build cannot tell which is right).
    """

    split: str
    shards: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    others: int = 0
    stray: list[str] = field(default_factory=list)
    command: str | None = None


@dataclass
class FolderReport:
    """The findings of `verify` for a shard folder, split by split."""

    folder: Path
    splits: list[SplitReport]

    @property
    def problems(self) -> list[str]:
        return [p for s in self.splits for p in s.problems]

    def summary(self) -> str:
        """``DIR: all N shards ok`` or ``DIR: N shards ok, M bad: <names>`` (and other problems)."""
        total = sum(len(s.shards) for s in self.splits)
        bad = [name for s in self.splits for name in s.bad]
        named = ", ".join(bad[:MAX_NAMED]) + (f", ... ({len(bad) - MAX_NAMED} more)" if len(bad) > MAX_NAMED
                                              else "")
        line = (f"{self.folder}: {total - len(bad)} shards ok, {len(bad)} bad: {named}" if bad
                else f"{self.folder}: all {total} shards ok" if total else f"{self.folder}: no shard checked")
        if any(s.others for s in self.splits):
            line += "; problems outside the shards are listed above"
        return line


def verify(folder: str | Path, *, split: str | None = None, decode: bool = False,
           workers: int = 1) -> list[str]:
    """All problems found in a shard folder, one line each; an empty list means it is sound."""
    try:
        return check_folder(folder, split=split, decode=decode, workers=workers).problems
    except ShardFormatError as err:
        return [str(err)]


def check_folder(folder: str | Path, *, split: str | None = None, decode: bool = False,
                 workers: int = 1) -> FolderReport:
    """Check a shard folder split by split (see the module docstring for what is checked).

    Raises:
        ShardFormatError: no readable manifest, or no split `split` in it.
    """
    folder = Path(folder)
    info = _read_folder(folder)
    splits = info.get("splits", {})
    if split is not None and split not in splits:
        raise ShardFormatError(f"{folder}: no split {split!r} in the manifest (has {sorted(splits)}); "
                               "check --split")
    reports = []
    for name in [split] if split else sorted(splits):
        try:
            entry = parse_split(folder, name, splits[name])
        except ShardFormatError as err:
            reports.append(SplitReport(name, problems=[str(err)], others=1, command=_rebuild_command(
                folder, name, splits[name])))
            continue
        reports.append(_check_split(folder, name, entry, decode, workers))
    return FolderReport(folder, reports)


def _read_folder(folder: Path) -> dict:
    """`read_info`, with its own line for a folder that does not exist."""
    if not folder.is_dir():
        raise ShardFormatError(f"{folder}: no such folder; pass the folder that `hcsc-shards build --out` "
                               "wrote")
    return read_info(folder)


def _rebuild_command(folder: Path, split: str, raw: object) -> str | None:
    """The build command with --overwrite from a damaged entry, when its source and params survive."""
    if not isinstance(raw, dict):
        return None
    return _command(folder, split, raw.get("source"), raw.get("params"), overwrite=True)


def _command(folder: Path, split: str, source: object, params: object, *, overwrite: bool) -> str | None:
    """`build_command`, or None when the manifest's source or params are not what a build records."""
    try:
        return build_command(folder, split, source, params, overwrite=overwrite)  # type: ignore[arg-type]
    except (KeyError, TypeError, AttributeError):
        return None


def _check_split(folder: Path, split: str, entry: SplitManifest, decode: bool, workers: int) -> SplitReport:
    check = functools.partial(_check_shard, folder, split, num_classes=entry.num_classes, decode=decode)
    if workers > 1:
        with process_pool(workers) as pool:
            results = pool.map(check, entry.shards)
    else:
        results = list(map(check, entry.shards))
    report = SplitReport(split, shards=[s.name for s in entry.shards])
    report.problems = [p for shard_problems, _, _ in results for p in shard_problems]
    bad = {s.name for s, (shard_problems, _, _) in zip(entry.shards, results, strict=True) if shard_problems}
    listed = set(report.shards)
    report.stray = stray = [p.name for p in sorted(folder.glob(f"{split}-*.tar")) if p.name not in listed]
    report.problems += [f"{split}/{name}: shard file not listed in the manifest" for name in stray]
    recorded = sum(s.num_samples for s in entry.shards)
    if recorded != entry.num_samples:
        report.problems.append(f"{split}: shards hold {recorded} samples, manifest says {entry.num_samples}")
    tiles = _ranges_tile(entry)
    report.others = len(stray) + (recorded != entry.num_samples) + (not tiles)
    locations = defaultdict(list)
    for shard, (_, samples, _) in zip(entry.shards, results, strict=True):
        for idx in samples:
            locations[idx].append(shard.name)
    report.problems += _coverage(split, entry.num_samples, locations)
    report.bad = [name for name in report.shards if name in bad | _misplaced(entry, locations)]
    if len(report.problems) > len(stray):  # stray files alone need no build
        # Rewriting the shards whose files differ from the manifest gives back what it records; that
        # repairs the split when every shard with a problem of its own is one of them, and the
        # recorded counts and idx ranges tile 0..N-1.
        fixable = {s.name for s, (_, _, fixable) in zip(entry.shards, results, strict=True) if fixable}
        by_shard = bad <= fixable and recorded == entry.num_samples and tiles
        report.command = _command(folder, split, entry.source, entry.params, overwrite=not by_shard)
    return report


def _misplaced(entry: SplitManifest, locations: dict[int, list[str]]) -> set[str]:
    """Shards holding an idx twice or outside the split, or missing one of their recorded range."""
    names = {name for idx, where in locations.items()
             if len(where) > 1 or not 0 <= idx < entry.num_samples for name in where}
    held = sorted(locations)
    for shard in entry.shards:
        start, stop = shard.idx_range
        if bisect.bisect_left(held, stop) - bisect.bisect_left(held, start) < stop - start:
            names.add(shard.name)
    return names


def _ranges_tile(entry: SplitManifest) -> bool:
    """The manifest's own consistency: shard ranges follow each other from 0 to the sample count."""
    start = 0
    for shard in entry.shards:
        if shard.idx_range != (start, start + shard.num_samples):
            return False
        start += shard.num_samples
    return start == entry.num_samples


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
    problems, idxs, _ = _check_shard(folder, split, record, num_classes=num_classes, decode=decode)
    return problems, idxs


def _check_shard(folder: Path, split: str, record: ShardRecord, *, num_classes: int,
                 decode: bool) -> tuple[list[str], list[int], bool]:
    """`check_shard`, and whether rewriting the shard as the manifest records it would fix it: its
    tar differs from the recorded size or sha256, or only its index file is wrong. (A tar that
    matches its record but fails a check means the record itself is wrong.)"""
    where = f"{split}/{record.name}"
    path = folder / record.name
    if not path.is_file():
        return [f"{where}: missing"], [], True
    problems = []
    index = folder / record.index
    if path.stat().st_size != record.bytes:
        problems.append(f"{where}: {path.stat().st_size} bytes, manifest says {record.bytes}")
    elif sha256_file(path) != record.sha256:
        problems.append(f"{where}: sha256 differs from the manifest (corrupted or replaced)")
    tar_differs = bool(problems)
    try:
        samples, entries = _read_tar(path)
    except (tarfile.TarError, OSError, ValueError) as err:
        return problems + [f"{where}: unreadable tar ({err})"], [], tar_differs
    if len(samples) != record.num_samples:
        problems.append(f"{where}: {len(samples)} samples, manifest says {record.num_samples}")
    index_problems = _check_index(index, where, entries)
    problems += index_problems
    idxs = []
    for key, members in samples.items():
        idx, sample_problems = _check_sample(key, members, record.idx_range, num_classes, decode)
        problems += [f"{where}: sample {key}: {p}" for p in sample_problems]
        if idx is not None:
            idxs.append(idx)
    index_differs = not index.is_file() or sha256_file(index) != record.index_sha256
    only_index = len(problems) == len(index_problems)
    return problems, idxs, tar_differs or (index_differs and only_index)


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
    info = _read_folder(folder)
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
