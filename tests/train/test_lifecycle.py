"""`hcsc-train` fails fast and loses nothing: bad inputs stop before any step with one line, and a
run folder can be resumed after damage, moved, extended, overwritten, forked and locked.

Every run goes through the real CLI in a subprocess (configs/debug.yaml: 3 epochs of 4 steps)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from core.faults import DIE_AT_ENV, SIGTERM_ENV
from tests.train._helpers import ROOT, losses_by_step, records, run_env, train_cli, train_command

pytestmark = pytest.mark.slow
QUICK = ("optim.epochs=2", "run.max_steps_per_epoch=1")  # the cheapest run that clusters once


@pytest.fixture(scope="module")
def straight(fmnist_shards, tmp_path_factory) -> Path:
    """An uninterrupted run: the losses every other run is compared with."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train_cli(fmnist_shards, run_dir)
    return run_dir


def _fails(shards, run_dir, *overrides) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(shards, run_dir, *overrides), env=run_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def _copy_shards(shards: Path, dest: Path, *, drop_split: str | None = None,
                 truncate: str | None = None) -> Path:
    shutil.copytree(shards, dest)
    if drop_split:
        import json

        info = json.loads((dest / "_info.json").read_text())
        del info["splits"][drop_split]
        (dest / "_info.json").write_text(json.dumps(info))
    if truncate:
        tar = dest / truncate
        tar.write_bytes(tar.read_bytes()[:1000])
    return dest


def _bad_inputs(shards: Path, tmp: Path, straight: Path) -> dict[str, tuple[list[str], str, list[str]]]:
    """name -> (overrides that fail, text the one line must contain, overrides that fix it)."""
    not_a_folder = tmp / "taken"
    not_a_folder.write_text("my notes\n")
    damaged = tmp / "damaged-ckpt"
    shutil.copytree(straight / "checkpoints" / "epoch0002-batch000000", damaged)
    model_file = damaged / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:4096])
    empty = tmp / "empty-shards"
    empty.mkdir()
    return {
        "val split missing": ([f"data.shards={_copy_shards(shards, tmp / 's1', drop_split='val')}"],
                              "data.val_split=val", ["data.val_split="]),
        "train split missing": (["data.train_split=nope"], "data.train_split=nope", []),
        "no manifest": ([f"data.shards={empty}"], "_info.json", []),
        "shards unset": (["data.shards="], "data.shards: not set", []),
        "truncated shard": ([f"data.shards={_copy_shards(shards, tmp / 's2', truncate='train-000001.tar')}"],
                            "train-000001.tar", []),
        "levels exceed samples": (["hcsc.num_clusters=[500,100,10]"], "hcsc.num_clusters", []),
        "batch exceeds split": (["data.batch_size=512", "model.queue_size=512"], "data.batch_size=512", []),
        "unknown encoder": (["model.encoder=resnet7"], "model.encoder", []),
        "unknown key": (["optim.lrr=0.1"], "optim.lrr", []),
        "output is a file": ([f"run.output_dir={not_a_folder}"], "is a file", []),
        "resume path missing": ([f"run.resume={tmp / 'nope'}"], "run.resume=", ["run.resume=auto"]),
        "resume damaged": ([f"run.resume={damaged}"], "damaged checkpoint", ["run.resume=auto"]),
        **({} if torch.cuda.is_available() else
           {"bf16 without a GPU": (["engine.precision=bf16"], "engine.precision=bf16", [])}),
    }


def test_bad_inputs_stop_before_any_step_with_one_line(fmnist_shards, straight, tmp_path):
    rows = _bad_inputs(fmnist_shards, tmp_path, straight)
    user_files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for name, (bad, expected, fix) in rows.items():
        run_dir = tmp_path / f"run-{name.replace(' ', '-')}"
        proc = _fails(fmnist_shards, run_dir, *QUICK, *bad)
        assert expected in proc.stderr, (name, proc.stderr)
        assert not (run_dir / "config.yaml").exists() and not records(run_dir), name  # no step, no file
        if name in ("val split missing", "levels exceed samples", "resume damaged"):
            good = [o for o in bad if not o.startswith(("hcsc.", "run.resume"))] + fix
            train_cli(fmnist_shards, run_dir, *QUICK, *good)  # the corrected rerun, same folder
            assert records(run_dir), name
    for path, content in user_files.items():
        assert path.read_bytes() == content, f"{path} changed"


def test_a_newest_damaged_checkpoint_falls_back_to_the_older_one(fmnist_shards, straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)  # its .lock is stale (that job ended): taken over
    newest = run_dir / "checkpoints" / "epoch0003-batch000000"
    model_file = newest / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:-4096])
    proc = train_cli(fmnist_shards, run_dir)
    assert "epoch0003-batch000000 is damaged" in proc.stdout
    assert losses_by_step(run_dir) == pytest.approx(losses_by_step(straight), rel=1e-6)
    assert [r["step"] for r in records(run_dir)][-4:] == [9, 10, 11, 12]  # epoch 2 trained again
    moved_aside = list((run_dir / "checkpoints").glob(".damaged-epoch0003-batch000000-*"))
    assert len(moved_aside) == 1 and (moved_aside[0] / "mp_rank_00_model_states.pt").is_file()


def test_a_killed_run_moved_elsewhere_resumes_with_identical_losses(fmnist_shards, straight, tmp_path):
    first = tmp_path / "first"
    proc = subprocess.run(train_command(fmnist_shards, first), env=run_env() | {DIE_AT_ENV: "0:6"},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17 and not records(first, "final")
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(first, moved)
    train_cli(fmnist_shards, moved)
    assert losses_by_step(moved) == pytest.approx(losses_by_step(straight), rel=1e-6)


def test_finished_extended_overwritten_and_forked_runs(fmnist_shards, straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    proc = train_cli(fmnist_shards, run_dir)
    assert "nothing to do" in proc.stdout and (run_dir / "metrics.jsonl").read_text() == before

    train_cli(fmnist_shards, run_dir, "optim.epochs=4")  # extended: epoch 3 is trained
    assert [r["step"] for r in records(run_dir)][-4:] == [13, 14, 15, 16]
    assert len(records(run_dir, "final")) == 2

    refused = _fails(fmnist_shards, run_dir, "optim.lr=0.1")
    assert "run.overwrite=true" in refused.stderr and "optim.lr" in refused.stderr
    train_cli(fmnist_shards, run_dir, *QUICK, "optim.lr=0.1", "run.overwrite=true")
    previous = list(run_dir.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "checkpoints" / "epoch0004-batch000000").is_dir()
    assert [r["step"] for r in records(run_dir)] == [1, 2]  # a fresh run

    fork = tmp_path / "fork"
    train_cli(fmnist_shards, fork, f"run.resume={straight / 'checkpoints' / 'epoch0002-batch000000'}")
    straight_losses = losses_by_step(straight)
    assert losses_by_step(fork) == pytest.approx({s: straight_losses[s] for s in (9, 10, 11, 12)}, rel=1e-6)


def test_a_second_job_on_a_live_folder_is_refused(fmnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as lock:
        lock.write("host elsewhere pid 4242\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = _fails(fmnist_shards, run_dir, *QUICK)
        assert "in use by another job (host elsewhere pid 4242)" in proc.stderr
    train_cli(fmnist_shards, run_dir, *QUICK)  # the lock is gone with its holder


def test_killing_the_launcher_stops_its_workers_with_a_checkpoint(fmnist_shards, tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(train_command(fmnist_shards, run_dir, "optim.epochs=30", ranks=2),
                                env=run_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(records(run_dir)) < 3 and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.1)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if "train.cli" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    _, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, "workers outlived their launcher"
    assert records(run_dir)[-1]["step"] < 30 * 4  # stopped long before the end
    assert (run_dir / "checkpoints" / "latest").is_file(), "SIGTERM from the launcher's death saves first"


@pytest.fixture(scope="module")
def straight_two_ranks(fmnist_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight2") / "run"
    train_cli(fmnist_shards, run_dir, "data.val_split=", ranks=2)
    return run_dir


def test_two_ranks_killed_after_an_epoch_checkpoint_resume_with_identical_losses(
        fmnist_shards, straight_two_ranks, tmp_path):
    """Both ranks' BatchNorm statistics are rank 0's after every step, so the checkpoint holds the
    state of every rank and a resumed 2-rank run clusters and trains as the uninterrupted one."""
    killed = tmp_path / "killed"
    command = train_command(fmnist_shards, killed, "data.val_split=", "engine.collective_timeout_s=60",
                            ranks=2)
    proc = subprocess.run(command, env=run_env() | {DIE_AT_ENV: "1:6"}, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert (killed / "checkpoints" / "epoch0001-batch000000").is_dir()
    train_cli(fmnist_shards, killed, "data.val_split=", ranks=2)
    assert losses_by_step(killed) == pytest.approx(losses_by_step(straight_two_ranks), rel=1e-6)


def test_sigterm_during_clustering_stops_every_rank_before_training_and_resumes(
        fmnist_shards, straight_two_ranks, tmp_path):
    """SIGTERM reaching one rank while epoch 1 clusters: every rank stops inside the clustering (no
    step of epoch 1 is trained), saves the epoch's start, exits 0; the rerun clusters again and ends
    with the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    command = train_command(fmnist_shards, run_dir, "data.val_split=", ranks=2)
    proc = subprocess.run(command, env=run_env() | {SIGTERM_ENV: "1:1"}, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped by a signal to another rank during the clustering of epoch 1" in proc.stdout  # rank 0
    assert {r["epoch"] for r in records(run_dir)} == {0}  # not one step of epoch 1
    assert not records(run_dir, "cluster")  # interrupted before its first level was recorded
    assert (run_dir / "checkpoints" / "epoch0001-batch000000").is_dir()
    train_cli(fmnist_shards, run_dir, "data.val_split=", ranks=2)
    assert losses_by_step(run_dir) == pytest.approx(losses_by_step(straight_two_ranks), rel=1e-6)
