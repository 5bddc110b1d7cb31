"""`build_shards`: source -> shuffled, equal-count shards + DALI indexes + ``_info.json``.

Recipe (docs/architecture.md#shards):
  1. enumerate the source (sorted, deterministic) and take the ``limit`` subset if asked;
  2. scan every input in parallel: copy, convert (with a reason) or skip (with a reason);
  3. shuffle the usable inputs with ``seed``; position in that order is the sample's ``idx``;
  4. write shard k = idx ``[k * samples_per_shard, (k + 1) * samples_per_shard)`` in a worker,
     under a temporary name, renamed when complete; record its checksum in ``.build-<split>/``;
  5. fsync every shard, merge the split's entry into ``_info.json`` (last, atomically), drop
     ``.build-<split>/``.
Rerunning after a kill resumes: the scan is reloaded from ``.build-<split>/plan.json``, completed
shards whose checksums still match are kept, the rest are rewritten with identical bytes. Shards
are not fsynced one by one: after a power loss a shard or record that did not reach the disk fails
that checksum comparison and is rewritten, and nothing is named in the manifest before it is on disk.

A crash test can stall the writer half-way through a shard (`core.faults`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.files import write_json_atomic
from shards.convert import probe_files
from shards.format import FORMAT_VERSION, INFO_NAME, ShardRecord, SplitManifest, parse_split, shard_name
from shards.manifest import BuildError, load_manifest, other_class_names, remove_split, update_manifest
from shards.sources import Listing, SourceSpec, list_inputs, parse_source
from shards.writer import ShardTask, fsync_files, shard_is_complete, write_shard

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 1000  # ~110 MB per shard for ImageNet-sized JPEGs (~110 kB each)
DEFAULT_QUALITY = 95
SCAN_BATCH = 256  # inputs per scan task


def tool_version() -> str:
    try:
        return f"hcsc-shards {metadata.version('hcsc')}"
    except metadata.PackageNotFoundError:
        return "hcsc-shards (not installed)"


def build_shards(source: str, out: str | os.PathLike, *, split: str = "train",
                 samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, seed: int = 0, workers: int = 1,
                 max_side: int | None = None, quality: int = DEFAULT_QUALITY, limit: int | None = None,
                 overwrite: bool = False, resume: bool = False, fsync: bool = True,
                 show_progress: bool = True) -> SplitManifest:
    """Build (or resume, or confirm up to date) one split of a shard folder.

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
        resume: only finish an interrupted build; refuse to start a new one. (An interrupted build
            is resumed without it too: the same call again continues where it stopped.)
        fsync: flush the shards to disk before the manifest names them.
        show_progress: draw tqdm bars.

    Returns:
        The split's manifest entry (see `shards.format.split_info`).

    Raises:
        BuildError: a refusal (bad argument, missing source, folder holding another build).
    """
    _check_args(split, samples_per_shard, workers, max_side, quality, limit)
    spec = parse_source(source, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"seed": seed, "samples_per_shard": samples_per_shard, "max_side": max_side,
              "quality": quality, "limit": limit}
    fingerprint = hashlib.sha256(json.dumps([FORMAT_VERSION, spec.to_json(), split, params], sort_keys=True)
                                 .encode()).hexdigest()[:16]
    done = _prepare_folder(out, split, fingerprint, overwrite, resume)
    if done is not None:
        log.info("%s: split %r is already built by this command; nothing to do", out, split)
        return done
    start = time.perf_counter()
    listing = list_inputs(spec, class_names=other_class_names(out, split, spec))
    with _pool(workers) as pool:
        plan = _load_or_scan(out, split, fingerprint, listing, params, pool, show_progress)
        order = _shuffle(plan, seed)
        records = _write_all(out, split, spec, listing, plan, order, params, pool, show_progress)
    entry = _entry(spec, split, params, fingerprint, listing, plan, records)
    if fsync:
        fsync_files([out / name for r in records for name in (r.name, r.index)])
    update_manifest(out, split, entry)
    shutil.rmtree(out / f".build-{split}", ignore_errors=True)
    _log_summary(out, split, entry, time.perf_counter() - start)
    return entry


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


def _prepare_folder(out: Path, split: str, fingerprint: str, overwrite: bool,
                    resume: bool) -> SplitManifest | None:
    """Refuse another build's split unless overwriting; return the entry when already built."""
    state = out / f".build-{split}"
    raw = load_manifest(out).get("splits", {}).get(split)
    entry = None if raw is None else parse_split(out, split, raw)
    if overwrite and resume:
        raise BuildError("--overwrite and --resume contradict each other; pass one of them")
    if overwrite:
        remove_split(out, split)
        shutil.rmtree(state, ignore_errors=True)
        return None
    if entry is not None:
        if entry.fingerprint == fingerprint:
            shutil.rmtree(state, ignore_errors=True)  # left behind if killed just after the manifest
            return entry
        raise BuildError(f"{out}: holds split {split!r} from a different build (source "
                         f"{entry.source.get('path')}, params {entry.params}); pass --overwrite "
                         "to replace it or choose another --out")
    plan = _read_plan(state)
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


def _pool(workers: int):
    return _InProcess() if workers == 1 else multiprocessing.get_context(start_method()).Pool(workers)


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


def _shuffle(plan: dict, seed: int) -> list[int]:
    """Listing positions of the usable inputs in idx order (the global shuffle,
    docs/architecture.md#shards)."""
    usable = [i for i, d in zip(plan["chosen"], plan["decisions"], strict=True) if not d.startswith("skip:")]
    if not usable:
        reasons = sorted({d[len("skip:"):] for d in plan["decisions"]})[:3]
        raise BuildError(f"no usable images among {len(plan['chosen'])} inputs (skipped: {reasons}); "
                         "check the source")
    perm = np.random.default_rng([seed, 0]).permutation(len(usable))
    return [usable[p] for p in perm]


def _write_all(out: Path, split: str, spec: SourceSpec, listing: Listing, plan: dict, order: list[int],
               params: dict, pool, show_progress: bool) -> list[ShardRecord]:
    decision_of = dict(zip(plan["chosen"], plan["decisions"], strict=True))
    size = params["samples_per_shard"]
    tasks = [ShardTask(str(out), split, k, spec, start, [listing.inputs[i] for i in part],
                       [listing.labels[i] for i in part], [decision_of[i] for i in part],
                       params["max_side"], params["quality"])
             for k, start in enumerate(range(0, len(order), size))
             for part in [order[start:start + size]]]
    state = out / f".build-{split}"
    kept = _completed(state, tasks, pool)
    todo = [t for t in tasks if shard_name(split, t.number) not in kept]
    if kept:
        log.info("%s: keeping %d complete shards, writing %d", out, len(kept), len(todo))
    bar = tqdm(total=len(order), initial=sum(r.num_samples for r in kept.values()), unit="img",
               desc=f"write {split}", disable=not show_progress, smoothing=0.1)
    with bar:
        for record in pool.imap_unordered(write_shard, todo):
            write_json_atomic(state / f"{record.name}.json", record.to_json())
            kept[record.name] = record
            bar.update(record.num_samples)
    return [kept[shard_name(split, t.number)] for t in tasks]


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


__all__ = ["BuildError", "DEFAULT_SAMPLES_PER_SHARD", "build_shards"]
