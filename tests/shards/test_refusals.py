"""`hcsc-shards build` refuses, in one line naming the input, what it must not do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shards import cli
from shards.format import read_info


def build(*args: str) -> int:
    return cli.main(["build", "--quiet", "--workers", "1", *args])


def refused(capsys, *args: str) -> str:
    assert build(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hcsc-shards: error: ") and "\n" not in err
    return err


@pytest.fixture
def built(folder_shards, tmp_path) -> tuple[Path, str]:
    out = tmp_path / "shards"
    shutil.copytree(folder_shards[0], out)
    return out, read_info(out)["splits"]["train"]["source"]["path"]


def test_different_build_of_the_same_split(built, capsys):
    out, src = built
    before = (out / "train-000000.tar").read_bytes()
    err = refused(capsys, "--source", f"imagefolder:{src}", "--out", str(out), "--seed", "4")
    assert str(out) in err and "different build" in err and "--overwrite" in err
    assert (out / "train-000000.tar").read_bytes() == before  # nothing touched


def test_overwrite_replaces_it(built, capsys):
    out, src = built
    assert build("--source", f"imagefolder:{src}", "--out", str(out), "--seed", "4",
                 "--samples-per-shard", "10", "--overwrite") == 0
    entry = read_info(out)["splits"]["train"]
    assert entry["params"]["seed"] == 4 and len(entry["shards"]) == 3
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-00000{i}.tar" for i in range(3)]


def test_same_command_again_is_a_no_op(built, capsys):
    out, src = built
    mtime = (out / "train-000000.tar").stat().st_mtime_ns
    assert build("--source", f"imagefolder:{src}", "--out", str(out), "--seed", "3",
                 "--samples-per-shard", "5") == 0
    assert (out / "train-000000.tar").stat().st_mtime_ns == mtime
    assert capsys.readouterr().out.splitlines() == [f"{out}: split 'train' up to date: 5 shards checked"]


def test_shards_of_unknown_origin(built, capsys, tmp_path):
    out, src = built
    (out / "_info.json").unlink()
    err = refused(capsys, "--source", f"imagefolder:{src}", "--out", str(out))
    assert "unknown origin" in err


def test_missing_source_and_bad_counts(capsys, tmp_path):
    err = refused(capsys, "--source", f"imagefolder:{tmp_path / 'nope'}", "--out", str(tmp_path / "o"))
    assert str(tmp_path / "nope") in err and "does not exist" in err
    err = refused(capsys, "--source", "fashion-mnist:", "--out", str(tmp_path / "o"),
                  "--samples-per-shard", "0")
    assert "--samples-per-shard 0" in err
    assert not (tmp_path / "o" / "_info.json").exists()


def test_refusal_from_the_console_script_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "shards.cli", "build", "--source", "imagefolder:/no/such",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "hcsc-shards: error: --source 'imagefolder:/no/such': folder /no/such does not exist; check the path"]


def test_unfinished_build_with_other_settings(built, capsys):
    out, src = built
    (out / "_info.json").unlink()
    (out / ".build-train").mkdir()
    (out / ".build-train" / "plan.json").write_text('{"fingerprint": "from-another-command"}')
    err = refused(capsys, "--source", f"imagefolder:{src}", "--out", str(out))
    assert "unfinished build" in err and "--overwrite" in err


def test_resume_without_an_unfinished_build(capsys, tmp_path):
    err = refused(capsys, "--source", "fashion-mnist:", "--out", str(tmp_path), "--limit", "10", "--resume")
    assert "no unfinished build of split 'train' to resume" in err
