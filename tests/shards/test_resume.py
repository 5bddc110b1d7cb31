"""Crash safety: a build killed mid-shard resumes to exactly the shards of an uninterrupted build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.faults import STALL_ENV
from shards.build import build_shards
from shards.format import INFO_NAME
from shards.verify import verify

ROOT = Path(__file__).parents[2]


def cli_args(source: str, out: Path, workers: int, per_shard: int = 250) -> list[str]:
    return [sys.executable, "-m", "shards.cli", "build", "--source", source, "--out", str(out),
            "--samples-per-shard", str(per_shard), "--limit", "1500", "--seed", "7",
            "--workers", str(workers), "--quiet"]


def wait_for(cond, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"build exited early: {proc.communicate()}"
        assert time.monotonic() < end, "build did not reach the stall point"
        time.sleep(0.1)


def kill_mid_build(args: list[str], out: Path, stall_after: int) -> None:
    """Start a real build that stalls half-way through shard `stall_after`, then SIGKILL its group
    once that shard's temporary file and the records of all earlier shards exist."""
    env = dict(os.environ, **{STALL_ENV: str(stall_after)})
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    state = out / ".build-train"
    tmp = out / f"train-{stall_after:06d}.tar.tmp"
    wait_for(lambda: tmp.is_file() and len(list(state.glob("*.tar.json"))) >= stall_after, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kill_and_resume_gives_identical_shards(workers, fashion_mnist_dir, tmp_path):
    source = f"fashion-mnist:{fashion_mnist_dir}"
    reference = build_shards(source, tmp_path / "ref", samples_per_shard=250, limit=1500, seed=7,
                             show_progress=False)
    out = tmp_path / "out"
    kill_mid_build(cli_args(source, out, workers), out, stall_after=2)
    assert not (out / INFO_NAME).exists()  # the manifest is written last
    assert not (out / "train-000002.tar").exists()  # the half shard only exists under its temporary name
    assert (out / "train-000002.tar.tmp").stat().st_size > 0
    kept = (out / "train-000000.tar").stat().st_ino
    damaged = out / "train-000001.tar"  # a completed shard whose checksum no longer matches
    data = bytearray(damaged.read_bytes())
    data[5000] ^= 0xFF
    damaged.write_bytes(bytes(data))

    done = subprocess.run(cli_args(source, out, workers) + ["--resume"], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "keeping 1 complete shards, writing 5" in done.stderr
    assert (out / "train-000000.tar").stat().st_ino == kept  # kept, not rewritten
    for shard in reference.shards:
        for name in (shard.name, shard.index):
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not list(out.glob("*.tmp")) and not (out / ".build-train").exists()
    assert verify(out) == []


def test_resume_refuses_a_changed_source(image_folder, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").mkdir()
    jpeg = next(image_folder.glob("*/n0*.JPEG")).read_bytes()
    for i in range(3):
        (src / "a" / f"{i}.JPEG").write_bytes(jpeg)
    out = tmp_path / "out"
    args = cli_args(f"imagefolder:{src}", out, 1, per_shard=1)
    kill_mid_build(args, out, stall_after=1)
    (src / "a" / "3.JPEG").write_bytes(jpeg)
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "changed since the interrupted build" in done.stderr and "--overwrite" in done.stderr
    assert (out / ".build-train" / "plan.json").is_file()  # the refusal keeps the interrupted build
