"""The one way this project writes a file that a user or a later run reads: atomically.

A reader (a resumed run, `hcsc-shards verify`, a browser) must never see half a file, and a write
that fails must leave the previous version in place. So every write goes to a temporary file in
the same folder (same filesystem, so the rename is atomic), is flushed and fsynced, and is then
renamed over the target; on any failure, Ctrl-C included, the temporary file is removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], object], *, binary: bool = True,
                 mode: int = 0o644) -> Path:
    """Call `write(f)` on a temporary file beside `path`, then rename it over `path`.

    Args:
        path: the target; its folder is created when missing.
        write: fills the open file (e.g. ``lambda f: torch.save(obj, f)``).
        binary: open the temporary file in binary (default) or text mode (UTF-8).
        mode: permission bits of the result (mkstemp alone would give 0600).

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, mode)
        text_args: dict[str, Any] = {} if binary else {"encoding": "utf-8"}
        with os.fdopen(fd, "wb" if binary else "w", **text_args) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself, or its closest ancestor that exists: where a write would create folders."""
    found = Path(path).absolute()
    while not found.exists() and found != found.parent:
        found = found.parent
    return found


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """`atomic_write` of `obj` as indented JSON with sorted keys (stable diffs)."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True), binary=False)
