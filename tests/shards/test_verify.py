"""`hcsc-shards verify` finds each kind of damage and names the shard and sample."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from shards import cli
from shards.format import INFO_NAME
from shards.verify import verify
from shards.writer import sha256_file


@pytest.fixture
def shards_copy(folder_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(folder_shards[0], out)
    return out


def run_verify(out: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    rc = cli.main(["verify", str(out), "--workers", "1", *extra])
    return rc, capsys.readouterr().out.splitlines()


def repair_line(image_folder: Path, out: Path) -> str:
    """What verify prints last for the `folder_shards` build when shards are bad."""
    return (f"repair: hcsc-shards build --source imagefolder:{image_folder.resolve()} --out {out} "
            "--split train --seed 3 --samples-per-shard 5")


def test_sound_folder_passes(shards_copy, capsys):
    assert run_verify(shards_copy, capsys, "--decode") == (0, [f"{shards_copy}: all 5 shards ok"])


def test_flipped_byte(shards_copy, capsys, image_folder):
    path = shards_copy / "train-000002.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0x01  # inside the first image
    path.write_bytes(bytes(data))
    rc, lines = run_verify(shards_copy, capsys)
    assert rc == 1
    assert lines == ["train/train-000002.tar: sha256 differs from the manifest (corrupted or replaced)",
                     f"{shards_copy}: 4 shards ok, 1 bad: train-000002.tar",
                     repair_line(image_folder, shards_copy)]


def test_missing_shard(shards_copy, capsys, image_folder):
    (shards_copy / "train-000001.tar").unlink()
    rc, lines = run_verify(shards_copy, capsys)
    assert rc == 1
    assert lines[0] == "train/train-000001.tar: missing"
    assert lines[1:6] == [f"train: idx {i} is in no shard" for i in range(5, 10)]
    assert lines[6:] == [f"{shards_copy}: 4 shards ok, 1 bad: train-000001.tar",
                         repair_line(image_folder, shards_copy)]


def rewrite_shard(out: Path, number: int, change) -> None:
    """Rewrite shard `number` with `change(name, data) -> (name, data)` applied to every member, then
    make its index (with DALI's own wds2idx) and manifest checksums consistent again, so only deeper
    checks can find what changed."""
    path = out / f"train-{number:06d}.tar"
    with tarfile.open(path) as tar:
        members = [change(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(path), str(path.with_suffix(".idx"))],
                   check=True, capture_output=True)
    info = json.loads((out / INFO_NAME).read_text())
    info["splits"]["train"]["shards"][number].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (out / INFO_NAME).write_text(json.dumps(info))


def test_duplicated_idx(shards_copy, capsys):
    """A sample of shard 1 carries idx 3, which shard 0 also holds."""
    def to_idx_3(name: str, data: bytes) -> tuple[str, bytes]:
        if not name.startswith("000000000005."):
            return name, data
        return "000000000003." + name.split(".")[1], b"000000000003" if name.endswith(".idx") else data

    rewrite_shard(shards_copy, 1, to_idx_3)
    rc, lines = run_verify(shards_copy, capsys)
    assert rc == 1
    assert "train/train-000000.tar,train-000001.tar: sample 000000000003: idx appears 2 times" in lines
    assert "train: idx 5 is in no shard" in lines
    assert "train/train-000001.tar: sample 000000000003: idx 3 outside the shard's range [5, 10]" in lines
    assert not any("sha256" in line or "index file" in line for line in lines)


def test_index_file_that_does_not_match(shards_copy, capsys, image_folder):
    idx = shards_copy / "train-000003.idx"
    lines = idx.read_text().splitlines()
    lines[2] += " x"
    idx.write_text("\n".join(lines) + "\n")
    rc, out = run_verify(shards_copy, capsys)
    assert rc == 1
    assert out == ["train/train-000003.tar: index file train-000003.idx does not match the tar (line 3)",
                   f"{shards_copy}: 4 shards ok, 1 bad: train-000003.tar",
                   repair_line(image_folder, shards_copy)]


def test_stray_shard_and_missing_manifest(shards_copy, capsys, tmp_path):
    shutil.copy(shards_copy / "train-000000.tar", shards_copy / "train-000099.tar")
    assert verify(shards_copy) == ["train/train-000099.tar: shard file not listed in the manifest"]
    rc, lines = run_verify(shards_copy, capsys)
    assert rc == 1
    assert lines == ["train/train-000099.tar: shard file not listed in the manifest",
                     f"{shards_copy}: all 5 shards ok; problems outside the shards are listed above",
                     "not part of split 'train', move away: train-000099.tar"]
    # no manifest at all is a mistake in the command (exit 2), one line on stderr, as every refusal
    (tmp_path / "nothing").mkdir()
    rc = cli.main(["verify", str(tmp_path / "nothing"), "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.splitlines() == [f"hcsc-shards: error: {tmp_path / 'nothing' / INFO_NAME}: no shard "
                                         "manifest; build shards with `hcsc-shards build`"]


def test_decode_catches_a_broken_image_with_consistent_checksums(shards_copy):
    """--decode reads pixels: a truncated image that every other check accepts."""
    def cut(name: str, data: bytes) -> tuple[str, bytes]:
        return name, data[:100] if name == "000000000020.jpg" else data

    rewrite_shard(shards_copy, 4, cut)
    assert verify(shards_copy) == []
    problems = verify(shards_copy, decode=True)
    assert len(problems) == 1
    assert problems[0].startswith("train/train-000004.tar: sample 000000000020: jpg does not decode")


def test_parallel_verify_reports_the_same(shards_copy):
    (shards_copy / "train-000003.tar").unlink()
    assert verify(shards_copy, workers=2) == verify(shards_copy, workers=1) != []
