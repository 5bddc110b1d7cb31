"""What a run records, through the real CLI on configs/debug.yaml (3 epochs of 4 steps, warm-up 1):
per-level metrics, `cluster`, `epoch`, `run` and `init` records, TensorBoard's text, image and
histograms, and the optional W&B logger (offline)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from tests.train._helpers import records, train_cli

pytestmark = pytest.mark.slow
LEVELS = (1, 2, 3)
PER_LEVEL = ("loss_inst", "acc_inst", "loss_proto", "acc_proto", "kept_inst", "kept_proto")


@pytest.fixture(scope="module")
def run_dir(fmnist_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("records") / "run"
    train_cli(fmnist_shards, run, "run.wandb.enabled=true", "run.wandb.mode=offline")
    return run


def test_per_level_metrics_from_the_first_clustering_epoch(run_dir):
    train = records(run_dir)
    hcsc = [r for r in train if r["epoch"] >= 1]
    assert hcsc and all(not any("/l" in k for k in r) for r in train if r["epoch"] == 0)
    for r in hcsc:
        for name in PER_LEVEL:
            for level in LEVELS:
                value = r[f"{name}/l{level}"]
                assert value is not None and math.isfinite(value), (name, level, r)
        # the official summation: the instance loss is the sum of the levels' InfoNCE
        assert sum(r[f"loss_inst/l{lvl}"] for lvl in LEVELS) == pytest.approx(r["loss_inst"], rel=1e-5)
        assert all(0 <= r[f"kept_{w}/l{lvl}"] <= 1 for w in ("inst", "proto") for lvl in LEVELS)
        assert r["kept_proto/l3"] == 1.0  # the top level is never selected
        assert not any(k.startswith("loss_local") and "/l" in k for k in r)  # no multi-crop here


def test_cluster_epoch_run_and_init_records(run_dir):
    clusters = records(run_dir, "cluster")
    assert sorted((r["epoch"], r["level"]) for r in clusters) == [(e, lvl) for e in (1, 2) for lvl in LEVELS]
    for r in clusters:
        assert r["samples"] == 256 and r["clusters"] == [16, 8, 4][r["level"] - 1]
        assert r["smallest"] <= r["median"] <= r["largest"] and 0 <= r["searched"] <= 1
        assert 0 <= r["nmi"] <= 1 and 0 < r["purity"] <= 1  # the shards carry labels
        assert r["concentration_mean"] == pytest.approx(0.2, rel=1e-4)  # mean phi is T (method.md §2.4)
    epochs = records(run_dir, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    for r in epochs:
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1
        assert r["eta_s"] >= 0 and r["epoch_s"] > 0
    assert all("clustering_s" in r and "features_s" in r for r in epochs[1:])
    [run] = records(run_dir, "run")
    assert run["train_samples"] == 256 and run["steps_per_epoch"] == 4 and run["global_batch"] == 8
    assert run["version_torch"] and run["trained_parameters"] > 0
    # the builds in use, named (the DALI build the run read its batches with, the faiss build)
    assert run["version_dali"].endswith("(nvidia-dali-cuda130)") and "(faiss-" in run["version_faiss"]
    [init] = records(run_dir, "init")
    [final] = records(run_dir, "final")
    assert set(init) - {"step", "time"} == set(final) - {"step", "time"}


def test_selection_off_keeps_everything(fmnist_shards, tmp_path):
    run = tmp_path / "run"
    train_cli(fmnist_shards, run, "optim.epochs=2", "run.max_steps_per_epoch=2", "data.val_split=",
              "hcsc.instance_selection=false", "hcsc.proto_selection=false")
    hcsc = [r for r in records(run) if r["epoch"] == 1]
    kept = [r[f"kept_{w}/l{lvl}"] for r in hcsc for w in ("inst", "proto") for lvl in LEVELS]
    assert hcsc and kept == [1.0] * len(kept)
    assert all(r["loss_inst/l1"] == pytest.approx(r["loss_inst"]) for r in hcsc)  # one unmasked loss


def test_tensorboard_has_the_config_the_views_and_the_cluster_sizes(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0, "images": 0,
                                                                 "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "augmented_views" in tags["images"]
    image = events.Images("augmented_views")[0]
    assert image.width > 0 and image.height > 0
    assert {f"cluster_sizes/l{lvl}" for lvl in LEVELS} <= set(tags["histograms"])
    assert any(t.startswith("config") for t in tags["tensors"])  # add_text is stored as a tensor
    assert "train/loss_inst/l1" in tags["scalars"] and "cluster/nmi/l1" in tags["scalars"]


def test_wandb_offline_run_receives_the_records(run_dir):
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    [data] = list(runs[0].glob("*.wandb"))
    content = data.read_bytes()
    for key in (b"train/loss_inst/l1", b"cluster/nmi/l1", b"epoch/images_per_s", b"final/knn_top1"):
        assert key in content, key


def test_wandb_missing_is_one_line_and_metrics_go_on(tmp_path, monkeypatch, caplog):
    from core.config import WandbConfig
    from core.logs import MetricsWriter

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, wandb=WandbConfig(enabled=True))
    writer.write("train", 1, {"loss": 1.0})
    writer.close()
    assert [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()] == [
        "run.wandb.enabled=true but the wandb package is not installed (pip install 'hcsc[wandb]'): "
        "metrics go to metrics.jsonl and TensorBoard only"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
