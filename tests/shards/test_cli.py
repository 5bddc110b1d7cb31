"""`hcsc-shards` through its real entry point: every mistake is one line naming what the user typed,
exit 2, and nothing of the user's is touched; an unexpected failure is one line and a log file."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from shards import build as build_module
from shards import cli
from shards.format import INFO_NAME


@dataclass
class Ctx:
    """What a row may use to set up its inputs (all under `tmp`)."""

    tmp: Path
    fmnist: Path
    built: tuple[Path, dict]
    jpeg: bytes

    def built_copy(self) -> Path:
        out = self.tmp / "built"
        shutil.copytree(self.built[0], out)
        return out

    def source_of_built(self) -> str:
        return f"imagefolder:{self.built[1]}"


def _file(ctx: Ctx) -> Path:
    (ctx.tmp / "file.txt").write_text("the user's notes\n")
    return ctx.tmp / "file.txt"


def _broken_source(ctx: Ctx) -> Path:
    (ctx.tmp / "src" / "a").mkdir(parents=True)
    (ctx.tmp / "src" / "a" / "x.JPEG").write_bytes(ctx.jpeg[:100])  # truncated: skipped
    return ctx.tmp / "src"


def _val_folder(ctx: Ctx) -> Path:
    (ctx.tmp / "val").mkdir()
    return ctx.tmp / "val"


def _damaged_manifest(ctx: Ctx) -> Path:
    out = ctx.built_copy()
    (out / INFO_NAME).write_text("{not json")
    return out


FM = "fashion-mnist:"  # the Debian package's folder
BUILD = ["build", "--quiet", "--workers", "1"]
# id -> (argv from the context, substrings the one stderr line must hold)
ROWS: dict[str, tuple[Callable[[Ctx], list[str]], Callable[[Ctx], list[str]]]] = {
    "missing source folder": (
        lambda c: [*BUILD, "--source", f"imagefolder:{c.tmp}/nope", "--out", f"{c.tmp}/o"],
        lambda c: ["--source", f"{c.tmp}/nope", "does not exist"]),
    "source folder that is a file": (
        lambda c: [*BUILD, "--source", f"imagefolder:{_file(c)}", "--out", f"{c.tmp}/o"],
        lambda c: ["--source", f"{c.tmp}/file.txt", "is a file, not a folder"]),
    "empty source path": (
        lambda c: [*BUILD, "--source", "imagefolder:", "--out", f"{c.tmp}/o"],
        lambda c: ["--source 'imagefolder:'", "empty"]),
    "unknown kind": (
        lambda c: [*BUILD, "--source", f"folder:{c.tmp}", "--out", f"{c.tmp}/o"],
        lambda c: ["--source", "unknown kind 'folder'", "imagefolder, imagenet-val or fashion-mnist"]),
    "no kind": (
        lambda c: [*BUILD, "--source", str(c.tmp), "--out", f"{c.tmp}/o"],
        lambda c: ["--source", str(c.tmp), "no KIND: prefix"]),
    "fashion-mnist part val": (
        lambda c: [*BUILD, "--source", f"fashion-mnist:{c.fmnist}:val", "--out", f"{c.tmp}/o"],
        lambda c: ["--source", "got 'val'", 'must be "train" or "test"']),
    "fashion-mnist default folder, part val": (
        lambda c: [*BUILD, "--source", "fashion-mnist::val", "--out", f"{c.tmp}/o"],
        lambda c: ["--source 'fashion-mnist::val'", "got 'val'", 'must be "train" or "test"']),
    "imagenet-val without the labels file": (
        lambda c: [*BUILD, "--source", f"imagenet-val:{_val_folder(c)}", "--out", f"{c.tmp}/o",
                   "--split", "val"],
        lambda c: ["--source", "labels file part is missing", "imagenet-val:PATH,LABELS"]),
    "imagenet-val with an empty labels part": (
        lambda c: [*BUILD, "--source", f"imagenet-val:{_val_folder(c)},", "--out", f"{c.tmp}/o"],
        lambda c: ["--source", "labels file part (after the comma) is empty"]),
    "imagenet-val labels file that does not exist": (
        lambda c: [*BUILD, "--source", f"imagenet-val:{_val_folder(c)},{c.tmp}/labels.txt", "--out",
                   f"{c.tmp}/o"],
        lambda c: ["--source", f"labels file {c.tmp}/labels.txt does not exist"]),
    "samples per shard 0": (
        lambda c: [*BUILD, "--source", FM, "--out", f"{c.tmp}/o", "--samples-per-shard", "0"],
        lambda c: ["--samples-per-shard 0", "at least 1"]),
    "samples per shard not a number": (
        lambda c: [*BUILD, "--source", FM, "--out", f"{c.tmp}/o", "--samples-per-shard", "ten"],
        lambda c: ["--samples-per-shard", "'ten'"]),
    "quality above 100": (
        lambda c: [*BUILD, "--source", FM, "--out", f"{c.tmp}/o", "--quality", "101"],
        lambda c: ["--quality 101", "at most 100"]),
    "workers 0": (
        lambda c: [*BUILD[:-2], "--workers", "0", "--source", FM, "--out", f"{c.tmp}/o"],
        lambda c: ["--workers 0"]),
    "split name with a dash": (
        lambda c: [*BUILD, "--source", FM, "--out", f"{c.tmp}/o", "--split", "val-1"],
        lambda c: ["--split 'val-1'", "letters, digits and '_'"]),
    "no --out": (
        lambda c: [*BUILD, "--source", FM],
        lambda c: ["--out", "required"]),
    "--out that is a file": (
        lambda c: [*BUILD, "--source", FM, "--out", str(_file(c)), "--limit", "5"],
        lambda c: [f"--out {c.tmp}/file.txt", "is a file, not a folder"]),
    "--overwrite with --resume": (
        lambda c: [*BUILD, "--source", FM, "--out", f"{c.tmp}/o", "--overwrite", "--resume"],
        lambda c: ["--overwrite", "--resume"]),
    "--resume without an unfinished build": (
        lambda c: [*BUILD, "--source", FM, "--out", f"{c.tmp}/o", "--limit", "5", "--resume"],
        lambda c: ["--resume", "no unfinished build of split 'train'"]),
    "a folder holding another build, without --overwrite": (
        lambda c: [*BUILD, "--source", c.source_of_built(), "--out", str(c.built_copy()), "--seed", "4",
                   "--samples-per-shard", "5"],
        lambda c: [f"{c.tmp}/built", "different build", "--seed 3 there, 4 here", "--overwrite"]),
    "a damaged manifest": (
        lambda c: [*BUILD, "--source", c.source_of_built(), "--out", str(_damaged_manifest(c)), "--seed", "3",
                   "--samples-per-shard", "5"],
        lambda c: [f"{c.tmp}/built/{INFO_NAME}", "unreadable manifest", "--out"]),
    "no usable image in the source": (
        lambda c: [*BUILD, "--source", f"imagefolder:{_broken_source(c)}", "--out", f"{c.tmp}/o"],
        lambda c: ["--source", f"{c.tmp}/src", "no usable images among 1 inputs"]),
    "no usable image, into an existing folder": (
        lambda c: [*BUILD, "--source", f"imagefolder:{_broken_source(c)}", "--out", str(_val_folder(c))],
        lambda c: ["--source", "no usable images"]),
    "verify of a folder without manifest": (
        lambda c: ["verify", str(_val_folder(c))],
        lambda c: [f"{c.tmp}/val/{INFO_NAME}", "no shard manifest"]),
    "verify of a folder that does not exist": (
        lambda c: ["verify", f"{c.tmp}/nope"],
        lambda c: [f"{c.tmp}/nope", "no such folder"]),
    "verify of a split the folder does not hold": (
        lambda c: ["verify", str(c.built_copy()), "--split", "val"],
        lambda c: ["--split", "no split 'val'", "['train']"]),
    "verify with 0 workers": (
        lambda c: ["verify", str(c.built_copy()), "--workers", "0"],
        lambda c: ["--workers 0"]),
    "info of a folder without manifest": (
        lambda c: ["info", str(_val_folder(c))],
        lambda c: [f"{c.tmp}/val/{INFO_NAME}", "no shard manifest"]),
    "unknown command": (
        lambda c: ["pack", str(c.tmp)],
        lambda c: ["invalid choice: 'pack'"]),
}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for folders)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("row", list(ROWS))
def test_a_mistake_is_one_line_naming_it_and_touches_nothing(row, tmp_path, capsys, fashion_mnist_dir,
                                                              folder_shards, image_folder, foolbox_jpegs):
    argv_of, expected_of = ROWS[row]
    ctx = Ctx(tmp_path, fashion_mnist_dir, (folder_shards[0], image_folder), foolbox_jpegs[0].read_bytes())
    argv = argv_of(ctx)
    before = snapshot(tmp_path)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert lines[0].startswith(("hcsc-shards: error: ", "hcsc-shards build: error: "))
    for part in expected_of(ctx):
        assert part in lines[0], (part, lines[0])
    assert snapshot(tmp_path) == before  # nothing written, removed or left behind


def test_unexpected_failure_is_one_line_with_the_log_file(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line of the message")

    monkeypatch.setattr(build_module, "list_inputs", boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    argv = ["build", "--quiet", "--workers", "1", "--source", "fashion-mnist:", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith("hcsc-shards: failed: RuntimeError: disk on fire (traceback in ")
    log_file = Path(line[line.index("(traceback in ") + len("(traceback in "):-1])
    assert log_file.parent == tmp_path / "tmp" / "hcsc-logs"
    logged = log_file.read_text()
    assert "Traceback" in logged and "disk on fire" in logged and "boom" in logged
    assert not (tmp_path / "o").exists()  # the folder it created and left empty is gone

    for debug_argv, env in ((["--debug", *argv], {}), ([*argv, "--debug"], {}), (argv, {"HCSC_DEBUG": "1"})):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert cli.main(debug_argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and err.splitlines()[-1].startswith("hcsc-shards: failed: RuntimeError")


def test_split_help_names_the_trainer_config_keys(capsys):
    assert cli.main(["build", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "data.train_split (default train)" in text and "data.val_split (default val)" in text


def test_any_split_name_of_letters_digits_and_underscores_is_accepted(tmp_path, capsys):
    argv = ["build", "--quiet", "--workers", "1", "--source", "fashion-mnist:", "--out", str(tmp_path),
            "--split", "holdout_2", "--limit", "12", "--samples-per-shard", "5"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path}: split 'holdout_2': 12 samples in 3 shards; "
                                                    "copied 0, converted {'encoded': 12}, skipped 0"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"holdout_2-00000{i}.tar" for i in range(3)]
    assert cli.main(["verify", str(tmp_path), "--split", "holdout_2", "--workers", "1"]) == 0
