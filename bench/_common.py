"""Helpers every benchmark shares: what machine ran it, how to rerun it, what code it measured.

A figure is only worth recording with the command that reproduces it, the machine it ran on, and
the state of the code it measured. `code_key` hashes the working-tree contents of the source
files that decide a result (uncommitted edits included: a figure measured on edited code must not
pass for the committed code's), and `ResultFile` refuses to call a stored result current unless
its key equals the key of the code as it is now.

Imports only the standard library (and `core.config` lazily), so `tests/test_bench.py` can load
it without torch or DALI.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"  # committed: the records behind BENCHMARKS.md
SCRATCH_RESULTS = ROOT / "bench" / "out" / "results"  # ignored: smoke runs, which are not figures


# ---------------------------------------------------------------------------------------------
# The machine and the command


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (what a reader compares machines by)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Call once at the start of a bench: the load average is the one the run began under."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "host": platform.node()}


def command() -> str:
    """The command line that ran this bench, with paths relative to the repository when they are
    inside it, so the lead can paste it from the record."""

    def rel(p: str) -> str:
        path = Path(p).absolute()  # not resolve(): .venv/bin/python is a symlink worth keeping
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else p

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


def cpu_seconds() -> float:
    """User + system CPU of this process (all its threads: DALI's) and of its children that have
    been waited for (DataLoader workers and pools once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def contiguous_shares(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (start, stop) ranges covering 0..n-1 once, sizes differing by at most one:
    how a user splits a job over processes by hand."""
    return [(p * n // parts, (p + 1) * n // parts) for p in range(parts)]


def git_state(paths: Sequence[str] = ()) -> dict[str, Any]:
    """HEAD and whether `paths` (default: everything) differ from it; {} outside a git checkout."""
    try:
        head = _git("rev-parse", "HEAD").strip()
        dirty = bool(_git("status", "--porcelain", "--", *paths).strip())
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": head, "dirty": dirty}


def _git(*args: str, root: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------------------------------------
# The code a result measured


def source_files(folders: Iterable[str], root: Path = ROOT, suffix: str = ".py") -> list[str]:
    """The `suffix` files under `folders`, relative to `root`, sorted.

    Tracked files and untracked ones git does not ignore: a new module that tracked code imports
    changes behaviour before it is committed. Outside a git checkout (a copied tree), every file
    on disk.
    """
    folders = list(folders)
    if not folders:  # git ls-files with no path lists the whole repository
        return []
    try:
        listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *folders,
                      root=root).split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(root)) for f in folders for p in (root / f).rglob(f"*{suffix}")
                  if "__pycache__" not in p.parts]
    return sorted({name for name in listed if name.endswith(suffix)})


def code_key(folders: Iterable[str], files: Iterable[str] = (), extra: Any = None,
             root: Path = ROOT) -> str:
    """sha256 over the working-tree contents of the `.py` files under `folders`, the named `files`
    (configs, the bench script itself) and `extra` (settings, as JSON).

    Contents, not the commit: an uncommitted edit changes the key. Each file enters as its path,
    its length and its bytes, so moving code between files changes the key too. A file that is
    listed but missing on disk (deleted, not yet committed) enters as missing.
    """
    h = hashlib.sha256()
    for name in sorted(set(source_files(folders, root)) | set(files)):
        path = root / name
        data = path.read_bytes() if path.is_file() else b"\0missing"
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


class ResultFile:
    """One bench's stored record (JSON), current only for the code key it was measured with.

    The record carries ``key`` (the code when the run started) and ``key_at_end`` (when it ended):
    a run during which the code changed measured a mixture, so it is never current.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def status(self, key: str) -> str:
        """'missing', 'current' or 'stale' against the code key of now."""
        record = self.read()
        if record is None:
            return "missing"
        if record.get("key") == key and record.get("key_at_end", key) == key:
            return "current"
        return "stale"

    def write(self, record: dict) -> None:
        if "key" not in record:
            raise ValueError("a stored result needs the code key it was measured with")
        now = datetime.datetime.now().astimezone()  # local time with its UTC offset
        record = {**record, "written": now.isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, self.path)

    def describe(self, key: str) -> str:
        """One line saying what is stored and whether it may be read as current."""
        record = self.read()
        name = _display(self.path)
        if record is None:
            return f"{name}: no stored result"
        when = record.get("written", "?")
        if self.status(key) == "current":
            return f"{name}: CURRENT (key {key[:16]}, written {when})"
        changed_during = record.get("key_at_end", record.get("key")) != record.get("key")
        why = "the code changed while it ran" if changed_during else "the code or settings changed since"
        return (f"{name}: STALE, not a result of the code as it is now ({why}): measured with key "
                f"{str(record.get('key'))[:16]}, now {key[:16]}, written {when}; it must be rerun")


def record_run(name: str, key: str, code: tuple[Sequence[str], Sequence[str]], params: dict,
               record: dict) -> bool:
    """Store a finished run's `record` as bench/results/<name>.json with `key` (the code key taken
    when the run started) and the key of now; True when the two agree. A bench prints its JSON lines
    only then: figures measured while the code changed belong to no version of it."""
    store = ResultFile(RESULTS / f"{name}.json")
    key_at_end = code_key(*code, extra=params)
    store.write({**record, "key": key, "key_at_end": key_at_end, "git": git_state(code[0])})
    print(store.describe(key_at_end), flush=True)
    if store.status(key_at_end) != "current":
        print("the code changed while this ran: the record is stored but STALE; run it again", flush=True)
        return False
    return True


def _display(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def stale_prefix(status: str) -> str:
    """What to put before every printed line of a stored result, so a stale figure cannot be
    copied as a current one."""
    return "" if status == "current" else "STALE | "


# ---------------------------------------------------------------------------------------------
# Config overrides


class UnknownKey(Exception):
    """A config override names a key this version of core/config.py does not have."""


def data_config(overrides: Sequence[str] = (), **fields: Any):
    """A `DataConfig` from the schema defaults, `fields` and dotlist `overrides` (``data.blur=false``),
    as `hcsc-train` would merge them.

    Raises:
        UnknownKey: an override names a key the schema lacks (a flag another change has not
            landed yet); the bench skips that row and says why instead of failing.
    """
    from core.config import ConfigError, load_config

    items = [f"data.{k}={json.dumps(v)}" for k, v in fields.items()] + list(overrides)
    try:
        cfg = load_config(None, items, world=1)
    except ConfigError as err:
        if "unknown config key" in str(err):
            raise UnknownKey(str(err)) from None
        raise
    return cfg.data


def emit(record: dict) -> None:
    """Print one JSON line (the benches' machine-readable output)."""
    print(json.dumps(record), flush=True)
