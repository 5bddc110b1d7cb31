"""`build_shards`: source -> shuffled, equal-count shards + DALI indexes + ``_info.json``.

Recipe (docs/architecture.md#shards):
  1. enumerate the source (sorted, deterministic) and take the ``limit`` subset if asked;
  2. scan every input in parallel: copy, convert (with a reason) or skip (with a reason);
  3. shuffle the usable inputs with ``seed``; position in that order is the sample's ``idx``;
  4. write shard k = idx ``[k * samples_per_shard, (k + 1) * samples_per_shard)`` in a worker,
     under a temporary name, renamed when complete; record its checksum in ``.build-<split>/``;
  5. fsync every shard, merge the split's entry into ``_info.json`` (last, atomically), drop
     ``.build-<split>/``.
Rerunning after a kill (or Ctrl-C) resumes: the scan is reloaded from ``.build-<split>/plan.json``,
completed shards whose checksums still match are kept, the rest are rewritten with identical bytes.
Shards are not fsynced one by one: after a power loss a shard or record that did not reach the disk
fails that checksum comparison and is rewritten, and nothing is named in the manifest before it is
on disk. Rerunning after the build finished checks every shard tar and index against the manifest
and repairs: the same listing, scan and shuffle give the same shard tasks, the intact shards count
as done, and only the damaged or missing ones are written again (the manifest is left as it is).
A failure before any shard was written removes the ``.build-<split>/`` it created.

A crash test can stall the writer half-way through a shard (`core.faults`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.files import write_json_atomic
from shards.convert import probe_files
from shards.format import (
    FORMAT_VERSION,
    INFO_NAME,
    ShardFormatError,
    ShardRecord,
    SplitManifest,
    parse_split,
    shard_name,
)
from shards.manifest import BuildError, load_manifest, other_class_names, remove_split, update_manifest
from shards.sources import Listing, SourceSpec, list_inputs, parse_source
from shards.writer import ShardTask, fsync_files, shard_is_complete, shard_problem, write_shard

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 1000  # ~110 MB per shard for ImageNet-sized JPEGs (~110 kB each)
DEFAULT_QUALITY = 95
SCAN_BATCH = 256  # inputs per scan task


def tool_version() -> str:
    try:
        return f"hcsc-shards {metadata.version('hcsc')}"
    except metadata.PackageNotFoundError:
        return "hcsc-shards (not installed)"


@dataclass(frozen=True)
class BuildResult:
    """What `build_split` did.

    Attributes:
        entry: the split's manifest entry (see `shards.format.split_info`).
        written: the shards this call wrote (all of them for a new build, the damaged or missing
            ones when it repaired a finished build, none when that build was intact).
        checked: shards of a finished build of the same command checked against the manifest
            (0 for a new or resumed build).
    """

    entry: SplitManifest
    written: list[str]
    checked: int = 0


def build_shards(source: str, out: str | os.PathLike, *, split: str = "train",
                 samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, seed: int = 0, workers: int = 1,
                 max_side: int | None = None, quality: int = DEFAULT_QUALITY, limit: int | None = None,
                 overwrite: bool = False, resume: bool = False, fsync: bool = True,
                 show_progress: bool = True) -> SplitManifest:
    """Build (or resume, or check and repair) one split of a shard folder; see `build_split`.

    Returns:
        The split's manifest entry (see `shards.format.split_info`).
    """
    return build_split(source, out, split=split, samples_per_shard=samples_per_shard, seed=seed,
                       workers=workers, max_side=max_side, quality=quality, limit=limit, overwrite=overwrite,
                       resume=resume, fsync=fsync, show_progress=show_progress).entry


def build_split(source: str, out: str | os.PathLike, *, split: str = "train",
                samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, seed: int = 0, workers: int = 1,
                max_side: int | None = None, quality: int = DEFAULT_QUALITY, limit: int | None = None,
                overwrite: bool = False, resume: bool = False, fsync: bool = True,
                show_progress: bool = True) -> BuildResult:
    """Build (or resume, or check and repair) one split of a shard folder.

    When the split was already built by the same command (same fingerprint), the size and sha256 of
    every shard tar and its index are checked against the manifest, and only the damaged or missing
    shards are written again, byte-identical to a clean build; the manifest stays as it is.

    Args:
        source: ``imagefolder:PATH``, ``imagenet-val:PATH,LABELS`` or ``fashion-mnist:DIR[:train|test]``.
        out: the shard folder; other splits already in it are kept.
        split: split name used in shard names and the manifest.
        samples_per_shard: samples per tar (the last one may be short).
        seed: global shuffle seed (idx order).
        workers: processes for scanning and writing.
        max_side: re-encode images whose longer side exceeds it (off by default).
        quality: JPEG quality of converted or re-encoded images.
        limit: use a seeded random subset of this many inputs (tests, debugging).
        overwrite: replace a different build of the same split.
        resume: only finish an interrupted build (or repair a finished one); refuse to start a new
            one. (An interrupted build is resumed without it too: the same call again continues
            where it stopped.)
        fsync: flush the shards to disk before the manifest names them.
        show_progress: draw tqdm bars.

    Raises:
        BuildError: a refusal (bad argument, folder holding another build, source changed).
        SourceError: a source spec or path that cannot be used.

    A failure (not Ctrl-C) before any shard was written, or of a repair, removes the
    ``.build-<split>`` folder it created (and ``out`` when it created it and left it empty); an
    interrupted build keeps what it did, so the same call resumes it.
    """
    _check_args(split, samples_per_shard, workers, max_side, quality, limit)
    spec = parse_source(source, split)
    out = Path(out)
    created = _make_folder(out)
    params = {"seed": seed, "samples_per_shard": samples_per_shard, "max_side": max_side,
              "quality": quality, "limit": limit}
    fingerprint = hashlib.sha256(json.dumps([FORMAT_VERSION, spec.to_json(), split, params], sort_keys=True)
                                 .encode()).hexdigest()[:16]
    try:
        existing = _prepare_folder(out, split, spec, params, fingerprint, overwrite, resume)
        state = out / f".build-{split}"
        had_state = state.is_dir()
        try:
            return _run(out, split, spec, params, fingerprint, existing, workers, fsync, show_progress)
        except BaseException as err:
            # A repair needs no state to be resumed (the shards it rewrote match the manifest); a new
            # build keeps the shards it finished; Ctrl-C keeps the scan too.
            keep = had_state or (existing is None and _wrote_shards(out, split)) or (
                isinstance(err, KeyboardInterrupt) and _read_plan(state) is not None)
            if not keep:
                _drop_state(out, split)
            raise
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # only when empty: a folder we made and left nothing in
                out.rmdir()
        raise


def _make_folder(out: Path) -> bool:
    """Create ``--out`` if needed; True when this call created it."""
    if out.is_dir():
        return False
    if out.exists():
        raise BuildError(f"--out {out}: is a file, not a folder; choose a folder for the shards")
    try:
        out.mkdir(parents=True)
    except OSError as err:
        raise BuildError(f"--out {out}: cannot create the folder ({err.strerror or err}); "
                         "choose another --out") from None
    return True


def _run(out: Path, split: str, spec: SourceSpec, params: dict, fingerprint: str,
         existing: SplitManifest | None, workers: int, fsync: bool, show_progress: bool) -> BuildResult:
    start = time.perf_counter()
    known: dict[str, ShardRecord] = {}
    with _pool(workers) as pool:
        if existing is not None:
            bad = _damaged(out, existing, pool)
            if not bad:
                _drop_state(out, split)
                log.info("%s: split %r up to date: %d shards checked", out, split, len(existing.shards))
                return BuildResult(existing, [], len(existing.shards))
            known = {r.name: r for r in existing.shards if r.name not in bad}
        listing = list_inputs(spec, class_names=other_class_names(out, split, spec))
        if existing is not None and existing.source_digest and listing.digest != existing.source_digest:
            raise BuildError(f"--source {spec.to_arg()}: changed since split {split!r} in {out} was built "
                             "(inputs added, removed or resized), so its damaged shards cannot be rewritten "
                             "as they were; pass --overwrite to rebuild the split")
        for name, reason in bad.items() if existing is not None else ():
            log.warning("%s: %s: %s; rewriting it", out, name, reason)
        plan = _load_or_scan(out, split, fingerprint, listing, params, pool, show_progress)
        order = _shuffle(plan, params["seed"], spec)
        if existing is not None and len(order) != existing.num_samples:
            raise BuildError(f"--source {spec.to_arg()}: now gives {len(order)} samples for split {split!r}, "
                             f"the manifest in {out} says {existing.num_samples}; pass --overwrite to "
                             "rebuild the split")
        records, written = _write_all(out, split, spec, listing, plan, order, params, pool, show_progress,
                                      known)
    if fsync:
        fsync_files([out / name for r in records if r.name in written for name in (r.name, r.index)])
    if existing is not None:
        _check_repaired(out, split, existing, records, written)
        _drop_state(out, split)
        log.info("%s: split %r: rewrote %d of %d shards (%s); the manifest is unchanged", out, split,
                 len(written), len(records), ", ".join(written))
        return BuildResult(existing, written, len(existing.shards))
    entry = _entry(spec, split, params, fingerprint, listing, plan, records)
    update_manifest(out, split, entry)
    _drop_state(out, split)
    _log_summary(out, split, entry, time.perf_counter() - start)
    return BuildResult(entry, written)


def _damaged(out: Path, entry: SplitManifest, pool) -> dict[str, str]:
    """Shards of a finished build whose tar or index does not match the manifest -> the reason."""
    reasons = pool.imap(_shard_problem, [(str(out), r) for r in entry.shards])
    return {r.name: reason for r, reason in zip(entry.shards, reasons, strict=True) if reason is not None}


def _shard_problem(args: tuple[str, ShardRecord]) -> str | None:
    out, record = args
    return shard_problem(Path(out), record)


def _check_repaired(out: Path, split: str, existing: SplitManifest, records: list[ShardRecord],
                    written: list[str]) -> None:
    """The rewritten shards must be exactly those the manifest names (else the source changed)."""
    if records == existing.shards:
        return
    recorded = {r.name: r for r in existing.shards}
    differ = [r.name for r in records if recorded.get(r.name) != r] or written
    raise BuildError(f"{out}: rewrote {', '.join(differ)} of split {split!r} from the source, but the result "
                     "differs from the manifest: the source changed since the build; pass --overwrite "
                     "to rebuild the split")


def _wrote_shards(out: Path, split: str) -> bool:
    """True when a failed new build leaves finished shards behind (worth resuming)."""
    state = out / f".build-{split}"
    if state.is_dir() and any(state.glob("*.tar.json")):
        return True
    return any(out.glob(f"{split}-*.tar"))  # a tar finished just before the failure, without its record


def _drop_state(out: Path, split: str) -> None:
    """Remove a build's working state: ``.build-<split>`` and half-written temporary files."""
    shutil.rmtree(out / f".build-{split}", ignore_errors=True)
    for stale in out.glob(f"{split}-*.tmp"):
        stale.unlink(missing_ok=True)


PARAM_FLAGS = {"seed": ("--seed", 0), "samples_per_shard": ("--samples-per-shard", DEFAULT_SAMPLES_PER_SHARD),
               "max_side": ("--max-side", None), "quality": ("--quality", DEFAULT_QUALITY),
               "limit": ("--limit", None)}


def build_command(out: str | os.PathLike, split: str, source: dict, params: dict, *,
                  overwrite: bool = False) -> str:
    """The ``hcsc-shards build`` command line (shell-quoted) that builds a split with this manifest
    ``source`` and ``params``, so with the same fingerprint; only non-default flags are spelled out."""
    words = ["hcsc-shards", "build", "--source", SourceSpec.from_json(source).to_arg(), "--out", str(out),
             "--split", split]
    for key, (flag, default) in PARAM_FLAGS.items():
        value = params.get(key, default)
        if value != default:
            words += [flag, str(value)]
    return shlex.join(words + (["--overwrite"] if overwrite else []))


def _flags(source: dict, params: dict) -> dict[str, str]:
    values = {"--source": SourceSpec.from_json(source).to_arg()}
    for key, (flag, default) in PARAM_FLAGS.items():
        value = params.get(key, default)
        values[flag] = "not set" if value is None else str(value)
    return values


def _differences(entry: SplitManifest, spec: SourceSpec, params: dict) -> str:
    """How a recorded build's flags differ from this command's, e.g. "--seed 3 there, 4 here"."""
    try:
        there, here = _flags(entry.source, entry.params), _flags(spec.to_json(), params)
    except (KeyError, TypeError):
        return f"source {entry.source}, params {entry.params}"
    diffs = [f"{flag} {there[flag]} there, {here[flag]} here" for flag in there if there[flag] != here[flag]]
    return "; ".join(diffs) or f"built by {entry.tool_version}"


def _check_args(split: str, samples_per_shard: int, workers: int, max_side: int | None,
                quality: int, limit: int | None) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise BuildError(f"--split {split!r}: use letters, digits and '_' only (e.g. train, val)")
    for flag, value, low in (("--samples-per-shard", samples_per_shard, 1), ("--workers", workers, 1),
                             ("--max-side", max_side, 1), ("--limit", limit, 1), ("--quality", quality, 1)):
        if value is not None and value < low:
            raise BuildError(f"{flag} {value}: must be at least {low}")
    if quality > 100:
        raise BuildError(f"--quality {quality}: must be at most 100 (95 keeps JPEG artefacts low)")


def _prepare_folder(out: Path, split: str, spec: SourceSpec, params: dict, fingerprint: str,
                    overwrite: bool, resume: bool) -> SplitManifest | None:
    """Refuse another build's split unless overwriting; return the entry when built by this command."""
    state = out / f".build-{split}"
    if overwrite and resume:
        raise BuildError("--overwrite and --resume contradict each other; pass one of them")
    raw = load_manifest(out).get("splits", {}).get(split)
    if overwrite:
        remove_split(out, split)
        _drop_state(out, split)
        return None
    try:
        entry = None if raw is None else parse_split(out, split, raw)
    except ShardFormatError as err:
        raise BuildError(f"{err} with --overwrite") from None
    plan = _read_plan(state)
    if entry is not None:
        if entry.fingerprint == fingerprint:
            if plan is None or plan.get("fingerprint") != fingerprint:
                _drop_state(out, split)  # cut short, or left by a build killed just after the manifest
            return entry
        raise BuildError(f"{out}: holds split {split!r} from a different build "
                         f"({_differences(entry, spec, params)}); pass --overwrite to replace it "
                         "or choose another --out")
    if plan is not None and plan.get("fingerprint") != fingerprint:
        raise BuildError(f"{out}: holds an unfinished build of split {split!r} with other settings; "
                         "rerun that command to finish it, or pass --overwrite")
    if plan is None and resume:
        raise BuildError(f"{out}: no unfinished build of split {split!r} to resume; "
                         "drop --resume to start one")
    if plan is None and any(out.glob(f"{split}-*.tar")):
        raise BuildError(f"{out}: holds {split}-*.tar shards of unknown origin (no {INFO_NAME} entry); "
                         "pass --overwrite to replace them or choose another --out")
    for stale in out.glob(f"{split}-*.tmp"):
        stale.unlink()
    return None


class _InProcess:
    """The Pool methods we use, run in this process (workers=1: no start-up cost, easy to debug)."""

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)

    imap_unordered = imap

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def start_method() -> str:
    """fork on Linux, as torch's DataLoader does: spawn re-imports the caller's ``__main__`` in
    every worker (seconds with torch, and a hang for scripts without a ``__main__`` guard). The
    workers only read files, run PIL and hashlib, and never touch the parent's torch/DALI threads."""
    return "fork" if sys.platform == "linux" else "spawn"


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it terminates the pool), so a worker
    never prints a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_pool(workers: int):
    """A process pool whose workers ignore SIGINT (`_ignore_sigint`); use it as a context manager."""
    return multiprocessing.get_context(start_method()).Pool(workers, initializer=_ignore_sigint)


def _pool(workers: int):
    return _InProcess() if workers == 1 else process_pool(workers)


def _load_or_scan(out: Path, split: str, fingerprint: str, listing: Listing, params: dict, pool,
                  show_progress: bool) -> dict:
    """The scan result (chosen inputs and a decision for each), reloaded when resuming."""
    path = out / f".build-{split}" / "plan.json"
    plan = _read_plan(path.parent)
    if plan is not None:
        if plan.get("digest") != listing.digest:
            raise BuildError(f"{listing.spec.path}: changed since the interrupted build in {out}; "
                             "pass --overwrite to start again")
        log.info("%s: resuming the build of split %r", out, split)
        return plan
    chosen = np.arange(len(listing.inputs))
    if params["limit"] is not None and params["limit"] < len(chosen):
        chosen = np.sort(np.random.default_rng([params["seed"], 1]).choice(
            len(chosen), params["limit"], replace=False))
    if listing.spec.kind == "fashion-mnist":
        decisions = ["convert:encoded"] * len(chosen)  # raw pixels: always encoded, never unreadable
    else:
        paths = [os.path.join(listing.spec.path, listing.inputs[i]) for i in chosen]
        # A probe costs ~13 us, about what a Pool spends passing one item: hand the workers whole
        # batches (a list each way per batch), or 2 workers scan no faster than 1.
        batches = [paths[i:i + SCAN_BATCH] for i in range(0, len(paths), SCAN_BATCH)]
        probe = functools.partial(probe_files, max_side=params["max_side"])
        decisions = []
        with tqdm(total=len(paths), unit="img", desc=f"scan {split}", disable=not show_progress,
                  leave=False) as bar:
            for part in pool.imap(probe, batches):
                decisions += part
                bar.update(len(part))
    plan = {"fingerprint": fingerprint, "digest": listing.digest, "chosen": chosen.tolist(),
            "decisions": decisions}
    path.parent.mkdir(exist_ok=True)
    write_json_atomic(path, plan)
    return plan


def _read_plan(state: Path) -> dict | None:
    """The scan of an interrupted build; None when there is none (or a crash cut it short)."""
    try:
        plan = json.loads((state / "plan.json").read_text())
    except (OSError, ValueError):
        return None
    return plan if isinstance(plan, dict) and "fingerprint" in plan else None


def _shuffle(plan: dict, seed: int, spec: SourceSpec) -> list[int]:
    """Listing positions of the usable inputs in idx order (the global shuffle,
    docs/architecture.md#shards)."""
    usable = [i for i, d in zip(plan["chosen"], plan["decisions"], strict=True) if not d.startswith("skip:")]
    if not usable:
        reasons = sorted({d[len("skip:"):] for d in plan["decisions"]})[:3]
        raise BuildError(f"--source {spec.to_arg()}: no usable images among {len(plan['chosen'])} inputs "
                         f"(skipped: {reasons}); check the source")
    perm = np.random.default_rng([seed, 0]).permutation(len(usable))
    return [usable[p] for p in perm]


def _write_all(out: Path, split: str, spec: SourceSpec, listing: Listing, plan: dict, order: list[int],
               params: dict, pool, show_progress: bool,
               known: dict[str, ShardRecord]) -> tuple[list[ShardRecord], list[str]]:
    """Write every shard not in `known` (intact shards of a finished build) nor finished by an
    interrupted run; returns the records of all shards in order and the names written now."""
    decision_of = dict(zip(plan["chosen"], plan["decisions"], strict=True))
    size = params["samples_per_shard"]
    tasks = [ShardTask(str(out), split, k, spec, start, [listing.inputs[i] for i in part],
                       [listing.labels[i] for i in part], [decision_of[i] for i in part],
                       params["max_side"], params["quality"])
             for k, start in enumerate(range(0, len(order), size))
             for part in [order[start:start + size]]]
    state = out / f".build-{split}"
    kept = _completed(state, [t for t in tasks if shard_name(split, t.number) not in known], pool)
    resumed = len(kept)
    kept.update(known)
    todo = [t for t in tasks if shard_name(split, t.number) not in kept]
    if resumed and not known:
        log.info("%s: keeping %d complete shards, writing %d", out, len(kept), len(todo))
    bar = tqdm(total=len(order), initial=sum(r.num_samples for r in kept.values()), unit="img",
               desc=f"write {split}", disable=not show_progress, smoothing=0.1)
    written = []
    with bar:
        for record in pool.imap_unordered(write_shard, todo):
            write_json_atomic(state / f"{record.name}.json", record.to_json())
            kept[record.name] = record
            written.append(record.name)
            bar.update(record.num_samples)
    return [kept[shard_name(split, t.number)] for t in tasks], sorted(written)


def _check_record(args: tuple[str, str]) -> ShardRecord | None:
    out, record_path = args
    try:
        record = ShardRecord.from_json(json.loads(Path(record_path).read_text()))
        return record if shard_is_complete(Path(out), record) else None
    except (OSError, ValueError, KeyError, TypeError):  # a record cut short by a crash: rewrite the shard
        return None


def _completed(state: Path, tasks: list[ShardTask], pool) -> dict[str, ShardRecord]:
    """Records of shards finished by an earlier run whose files still match their checksums."""
    names = [shard_name(t.split, t.number) for t in tasks]
    paths = [(str(state.parent), str(state / f"{n}.json")) for n in names if (state / f"{n}.json").is_file()]
    return {r.name: r for r in pool.imap(_check_record, paths) if r is not None}


def _entry(spec: SourceSpec, split: str, params: dict, fingerprint: str, listing: Listing, plan: dict,
           records: list[ShardRecord]) -> SplitManifest:
    decisions = Counter(plan["decisions"])
    skipped = list(listing.skipped) + [
        {"input": listing.inputs[i], "reason": d[len("skip:"):]}
        for i, d in zip(plan["chosen"], plan["decisions"], strict=True) if d.startswith("skip:")]
    return SplitManifest(
        num_samples=sum(r.num_samples for r in records), class_names=listing.class_names, shards=records,
        split=split, source=spec.to_json(), params=params, tool_version=tool_version(),
        fingerprint=fingerprint, source_digest=listing.digest, num_inputs=len(plan["chosen"]),
        copied=decisions.get("copy", 0),
        converted={d[len("convert:"):]: n for d, n in sorted(decisions.items()) if d.startswith("convert:")},
        skipped=skipped, empty_classes=listing.empty_classes)


def _log_summary(out: Path, split: str, entry: SplitManifest, seconds: float) -> None:
    total = sum(r.bytes for r in entry.shards)
    log.info("%s: split %r: %d samples, %d classes, %d shards, %.1f MB in %.1f s (%.0f images/s); "
             "copied %d, converted %s, skipped %d, empty classes %d", out, split, entry.num_samples,
             entry.num_classes, len(entry.shards), total / 1e6, seconds,
             entry.num_samples / max(seconds, 1e-9), entry.copied, entry.converted or 0,
             len(entry.skipped), len(entry.empty_classes))
    if entry.empty_classes:
        log.warning("class folders without images (ids kept, no samples): %s", entry.empty_classes)
    for item in entry.skipped[:10]:
        log.warning("skipped %s: %s", item["input"], item["reason"])
    if len(entry.skipped) > 10:
        log.warning("... and %d more skipped inputs, listed in %s", len(entry.skipped) - 10,
                    out / INFO_NAME)


__all__ = ["BuildError", "BuildResult", "DEFAULT_SAMPLES_PER_SHARD", "build_command", "build_shards",
           "build_split", "process_pool"]
