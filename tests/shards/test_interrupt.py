"""Ctrl-C during a real `hcsc-shards build` (worker processes included): one line, exit 130, and
the same command again finishes with the shards of an uninterrupted build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.faults import STALL_ENV
from shards.build import build_shards
from shards.format import INFO_NAME
from tests.shards.test_resume import ROOT, wait_for

HCSC_SHARDS = Path(sys.executable).parent / "hcsc-shards"


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_is_one_line_and_the_build_resumes(workers, fashion_mnist_dir, tmp_path):
    source = f"fashion-mnist:{fashion_mnist_dir}"
    ref = tmp_path / "ref"
    build_shards(source, ref, samples_per_shard=250, limit=1500, seed=7, show_progress=False)
    out = tmp_path / "out"
    args = [str(HCSC_SHARDS), "build", "--source", source, "--out", str(out), "--samples-per-shard", "250",
            "--limit", "1500", "--seed", "7", "--workers", str(workers), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "HCSC_DEBUG"}
    # A terminal's Ctrl-C goes to the whole foreground process group: the parent and its workers.
    proc = subprocess.Popen(args, env={**env, STALL_ENV: "2"}, start_new_session=True, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / ".build-train"
    wait_for(lambda: (out / "train-000002.tar.tmp").is_file() and len(list(state.glob("*.tar.json"))) >= 2,
             proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert [line for line in stderr.splitlines() if line.strip()] == [
        f"hcsc-shards: interrupted; finished shards of split 'train' are kept in {out}; rerun the same "
        "command to continue the build"]
    assert not (out / INFO_NAME).exists() and (state / "train-000000.tar.json").is_file()  # resumable

    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "keeping 2 complete shards, writing 4" in done.stderr
    assert files(out) == files(ref)  # every tar, index file and _info.json, byte for byte
