"""The same `hcsc-shards build` on a finished split checks every shard against the manifest and
rewrites only the damaged ones, byte-identical to a clean build; `verify` names them and prints it."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from shards import cli
from shards.format import INFO_NAME
from tests.shards.test_verify import rewrite_shard


@pytest.fixture
def shards_copy(folder_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(folder_shards[0], out)
    return out


def files(out: Path) -> dict[str, bytes]:
    """Every file of the folder (tars, index files, _info.json, ...) with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def build_argv(image_folder: Path, out: Path, workers: int = 2) -> list[str]:
    """The command `folder_shards` was built with."""
    return ["build", "--source", f"imagefolder:{image_folder}", "--out", str(out), "--seed", "3",
            "--samples-per-shard", "5", "--workers", str(workers), "--quiet"]


def flip_byte(path: Path, offset: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_build_again_rewrites_only_the_damaged_shards(shards_copy, image_folder, capsys):
    out = shards_copy
    clean = files(out)
    flip_byte(out / "train-000001.tar")
    (out / "train-000003.idx").unlink()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("train-00000[024].*")}
    assert cli.main(build_argv(image_folder, out)) == 0
    captured = capsys.readouterr()  # the summary on stdout, the log lines on stderr
    assert captured.out.splitlines() == [
        f"{out}: split 'train': rewrote 2 of 5 shards (train-000001.tar, train-000003.tar); "
        "the others match the manifest"]
    assert files(out) == clean  # tars, index files and _info.json: byte for byte
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("train-00000[024].*")} == kept
    assert not (out / ".build-train").exists() and not list(out.glob("*.tmp"))
    assert f"{out}: train-000001.tar: sha256 differs from the manifest; rewriting it" in captured.err
    assert f"{out}: train-000003.tar: index file train-000003.idx missing; rewriting it" in captured.err

    # once repaired, the same command finds nothing to rewrite and says so in one line
    assert cli.main(build_argv(image_folder, out)) == 0
    assert capsys.readouterr().out.splitlines() == [f"{out}: split 'train' up to date: 5 shards checked"]
    assert files(out) == clean


def test_missing_and_truncated_shards_in_process(shards_copy, image_folder, capsys):
    out = shards_copy
    clean = files(out)
    (out / "train-000000.tar").unlink()
    tar = out / "train-000004.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    (out / "train-000002.idx").write_text("v1.2 0\n")
    assert cli.main(build_argv(image_folder, out, workers=1)) == 0
    rewrote = "rewrote 3 of 5 shards (train-000000.tar, train-000002.tar, train-000004.tar)"
    assert rewrote in capsys.readouterr().out
    assert files(out) == clean


def test_repair_refuses_a_changed_source(image_folder, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(image_folder, src)
    out = tmp_path / "out"
    argv = build_argv(src, out, workers=1)
    assert cli.main(argv) == 0
    flip_byte(out / "train-000002.tar")
    (src / "n01440764" / "new.JPEG").write_bytes(next(src.glob("n01440764/*.JPEG")).read_bytes())
    before = files(out)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"hcsc-shards: error: --source imagefolder:{src}: changed since")
    assert "--overwrite" in err[0]
    assert files(out) == before  # the damaged shard is left for the user to decide; nothing else moved


def test_repair_refuses_when_a_rewritten_shard_differs_from_the_manifest(image_folder, tmp_path, capsys):
    """An input changed in place (same size): the rewritten shard cannot match; the line says why."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    jpeg = next(image_folder.glob("n0*/*.JPEG")).read_bytes()
    assert jpeg[6:10] == b"JFIF"
    for i in range(4):
        (src / "a" / f"{i}.JPEG").write_bytes(jpeg)
    out = tmp_path / "out"
    argv = ["build", "--source", f"imagefolder:{src}", "--out", str(out), "--samples-per-shard", "1",
            "--workers", "1", "--quiet"]
    assert cli.main(argv) == 0
    manifest = (out / INFO_NAME).read_bytes()
    for i in range(4):  # the same bytes but the JFIF density: every shard would change
        flip_byte(src / "a" / f"{i}.JPEG", offset=15)
    (out / "train-000001.tar").unlink()
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1]  # after the "rewriting it" progress lines, one line says why it stopped
    assert "Traceback" not in err and line.startswith("hcsc-shards: error:")
    assert "train-000001.tar" in line and "differs from the manifest" in line and "--overwrite" in line
    assert (out / INFO_NAME).read_bytes() == manifest
    assert not (out / ".build-train").exists()


def verify_lines(out: Path, capsys) -> tuple[int, list[str]]:
    rc = cli.main(["verify", str(out), "--workers", "2"])
    return rc, capsys.readouterr().out.splitlines()


def test_verify_summary_and_the_printed_repair_command(shards_copy, image_folder, capsys):
    out = shards_copy
    clean = files(out)
    flip_byte(out / "train-000002.tar")
    (out / "train-000004.idx").unlink()
    (out / "train-000000.tar").unlink()
    rc, lines = verify_lines(out, capsys)
    assert rc == 1
    assert "train/train-000000.tar: missing" in lines
    assert "train/train-000004.tar: index file train-000004.idx missing" in lines
    assert lines[-2] == f"{out}: 2 shards ok, 3 bad: train-000000.tar, train-000002.tar, train-000004.tar"
    assert lines[-1] == (f"repair: hcsc-shards build --source imagefolder:{image_folder.resolve()} "
                         f"--out {out} --split train --seed 3 --samples-per-shard 5")
    command = shlex.split(lines[-1].removeprefix("repair: "))
    assert command[0] == "hcsc-shards"
    assert cli.main(command[1:]) == 0
    assert "rewrote 3 of 5 shards" in capsys.readouterr().out
    assert verify_lines(out, capsys) == (0, [f"{out}: all 5 shards ok"])
    assert files(out) == clean


def test_verify_asks_for_a_rebuild_when_the_manifest_disagrees(shards_copy, image_folder, capsys):
    """A manifest whose counts no longer add up: rewriting shards cannot help; --overwrite does."""
    out = shards_copy
    clean = files(out)
    info = json.loads((out / INFO_NAME).read_text())
    info["splits"]["train"]["num_samples"] = 25
    (out / INFO_NAME).write_text(json.dumps(info))
    rc, lines = verify_lines(out, capsys)
    assert rc == 1
    assert lines[:2] == ["train: shards hold 24 samples, manifest says 25", "train: idx 24 is in no shard"]
    assert lines[2] == f"{out}: all 5 shards ok; problems outside the shards are listed above"
    prefix = "the manifest of split 'train' disagrees with its shards; rebuild it: "
    assert lines[3].startswith(prefix) and lines[3].endswith(" --overwrite") and len(lines) == 4
    assert cli.main(shlex.split(lines[3].removeprefix(prefix))[1:]) == 0
    assert "24 samples in 5 shards" in capsys.readouterr().out
    assert verify_lines(out, capsys) == (0, [f"{out}: all 5 shards ok"])
    assert files(out) == clean


def test_verify_asks_for_a_rebuild_when_a_shard_matches_a_wrong_record(shards_copy, image_folder, capsys):
    """A shard replaced together with its manifest checksums: the manifest is wrong, so only a
    rebuild (--overwrite) can repair the split (the plain command finds every file as recorded)."""
    out = shards_copy
    clean = files(out)
    rewrite_shard(out, 1, lambda name, data: (name, b"0000000099" if name.endswith(".cls") else data))
    rc, lines = verify_lines(out, capsys)
    assert rc == 1
    assert lines[-2] == f"{out}: 4 shards ok, 1 bad: train-000001.tar"
    prefix = "the manifest of split 'train' disagrees with its shards; rebuild it: "
    assert lines[-1].startswith(prefix) and lines[-1].endswith(" --overwrite")
    command = shlex.split(lines[-1].removeprefix(prefix))[1:]
    assert cli.main(command[:-1]) == 0
    assert capsys.readouterr().out == f"{out}: split 'train' up to date: 5 shards checked\n"
    assert cli.main(command) == 0
    capsys.readouterr()
    assert verify_lines(out, capsys) == (0, [f"{out}: all 5 shards ok"])
    assert files(out) == clean


def test_verify_of_a_damaged_split_entry_prints_the_rebuild(shards_copy, capsys):
    out = shards_copy
    clean = files(out)
    info = json.loads((out / INFO_NAME).read_text())
    del info["splits"]["train"]["shards"]
    (out / INFO_NAME).write_text(json.dumps(info))
    rc, lines = verify_lines(out, capsys)
    assert rc == 1 and len(lines) == 3
    assert lines[0].startswith(f"{out / INFO_NAME}: split 'train' has a damaged entry (KeyError")
    assert lines[1] == f"{out}: no shard checked; problems outside the shards are listed above"
    prefix = "the manifest of split 'train' disagrees with its shards; rebuild it: "
    assert lines[2].startswith(prefix) and lines[2].endswith(" --overwrite")
    command = shlex.split(lines[2].removeprefix(prefix))[1:]
    assert cli.main(command[:-1]) == 2  # without --overwrite: one line that says to pass it
    [err] = capsys.readouterr().err.splitlines()
    assert "damaged entry" in err and err.endswith("rebuild the split with --overwrite")
    assert cli.main(command) == 0
    capsys.readouterr()
    assert verify_lines(out, capsys) == (0, [f"{out}: all 5 shards ok"])
    assert files(out) == clean


def test_verify_caps_the_problem_lines_so_the_summary_stays_visible(shards_copy, capsys, monkeypatch):
    monkeypatch.setattr(cli, "MAX_PRINTED", 3)
    (shards_copy / "train-000001.tar").unlink()  # 1 + 5 problem lines
    rc, lines = verify_lines(shards_copy, capsys)
    assert rc == 1 and len(lines) == 6
    assert lines[:3] == ["train/train-000001.tar: missing", "train: idx 5 is in no shard",
                         "train: idx 6 is in no shard"]
    assert lines[3].startswith("... and 3 more problems")
    assert lines[4] == f"{shards_copy}: 4 shards ok, 1 bad: train-000001.tar"
    assert lines[5].startswith("repair: hcsc-shards build ")
