"""Checks `hcsc-eval` runs before any work: output targets, shard folders and their splits.

Each failure is one line that names what the user typed (the flag, or the path of a positional
argument) and what to do; nothing here writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.cli import UserError
from core.files import nearest_existing
from pipeline.plan import load_split
from shards.format import INFO_NAME, ShardFormatError, SplitManifest, read_info


class ArgumentError(UserError, ValueError):
    """A bad command-line value; the message names the flag the user typed and what to do.

    A `ValueError` too, so Python callers of the evaluation functions catch it as before.
    """


def check_writable_parent(path: str | os.PathLike, label: str) -> None:
    """The folder that will hold `path` exists or can be created, and is writable."""
    path = Path(path)
    folder = nearest_existing(path.parent)
    if not folder.is_dir():
        raise ArgumentError(f"{label}{path}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArgumentError(f"{label}{path}: the folder {folder} is not writable; choose another path")


def check_new_file(path: str | os.PathLike, *, force: bool, flag: str | None = None) -> Path:
    """An output file that may be written: not a folder, and not replaced unless `force`.

    Args:
        path: the target.
        force: the user passed ``--force``.
        flag: how the user named it (``--out``), or None for a positional argument (the path alone).
    """
    path = Path(path)
    label = f"{flag} " if flag else ""
    if path.is_dir():
        raise ArgumentError(f"{label}{path}: is a folder; name the file to write (it may be inside it)")
    if (path.exists() or path.is_symlink()) and not force:
        raise ArgumentError(f"{label}{path}: already exists; pass --force to replace it, or choose "
                            "another name")
    check_writable_parent(path, label)  # the replacement is written beside it, then renamed over it
    return path


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder to write into (it may exist): not a file, and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{flag} {path}: is a file; pass a folder (it is created when missing)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ArgumentError(f"{flag} {path}: the folder is not writable; choose another --out")
    else:
        check_writable_parent(path, f"{flag} ")
    return path


def check_report_folder(path: str | os.PathLike, *, force: bool) -> Path:
    """`hcsc-eval report --out`: a folder (new, or empty, or replaced with ``--force``)."""
    path = check_output_folder(path)
    if path.is_dir() and not force:
        if (path / "index.html").exists():
            raise ArgumentError(f"--out {path}: already holds a report (index.html); pass --force to "
                                "replace it, or choose a new folder")
        if any(path.iterdir()):
            raise ArgumentError(f"--out {path}: the folder is not empty; pass --force to write the report "
                                "into it anyway, or choose a new or empty folder")
    return path


def check_split(folder: str | os.PathLike, split: str, *, folder_flag: str,
                split_flag: str) -> SplitManifest:
    """A shard folder with the split, every tar and index present and matching the manifest.

    Args:
        folder, split: as the user passed them.
        folder_flag, split_flag: the flags they came from (``--train-shards``, ``--train-split``).
    """
    path = Path(folder)
    if not path.exists():
        raise ArgumentError(f"{folder_flag} {path}: no such folder; pass the folder `hcsc-shards build` "
                            "wrote")
    if not path.is_dir():
        raise ArgumentError(f"{folder_flag} {path}: is a file; pass the shard folder (the one holding "
                            f"{INFO_NAME})")
    try:
        splits = read_info(path).get("splits", {})
        if split not in splits:
            raise ArgumentError(f"{split_flag} {split!r}: {path / INFO_NAME} has no such split (it has "
                                f"{sorted(splits)}); pass one of those, or build it with `hcsc-shards build "
                                f"--source ... --out {path} --split {split}`")
        return load_split(path, split)[0]  # every tar and index present, counts as the manifest says
    except ShardFormatError as err:
        raise ShardFormatError(f"{folder_flag} {err}") from None
