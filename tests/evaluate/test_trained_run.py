"""A real (tiny) training run through `hcsc-train`, evaluated by `hcsc-eval`: the DeepSpeed
checkpoint loads with weights_only=True from the run dir, the tag folder and the official copy,
and kNN and clustering reproduce the trainer's own final monitor numbers exactly (the monitor runs
faiss.Kmeans directly, `hcsc-eval cluster` runs the cluster package's faiss-compatible k-means)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluate.cli import main

pytestmark = pytest.mark.slow  # `run_dir` (tests/evaluate/conftest.py) trains a tiny run first
# bilinear: the trainer's monitor resizes as the run's data.eval_interpolation (method.md §2.2), where the
# CLI's kNN and clustering default to method.md §7.1's bicubic
LOADER = ["--image-size", "16", "--resize", "16", "--batch-size", "64", "--workers", "1",
          "--interpolation", "bilinear"]


def _final(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "final")


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_knn_equals_the_trainers_monitor(run_dir, fm_shards, capsys):
    final = _final(run_dir)
    tag = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    for ckpt in (run_dir, tag, tag / "hcsc_official.pth.tar"):
        code = main(["knn", "--checkpoint", str(ckpt), "--train-shards", str(fm_shards), "--val-shards",
                     str(fm_shards), "--k", "10", "--encoder", "resnet18_small", *LOADER])
        assert code == 0
        got = _json(capsys)["knn"]["10"]
        assert got == pytest.approx({"top1": final["knn_top1"], "top5": final["knn_top5"]}), ckpt


def test_cluster_equals_the_trainers_monitor(run_dir, fm_shards, capsys):
    final = _final(run_dir)
    code = main(["cluster", "--checkpoint", str(run_dir), "--shards", str(fm_shards), "--num-clusters", "10",
                 "--nredo", "5", *LOADER])  # encoder from the run's config
    assert code == 0
    (level,) = _json(capsys)["levels"]
    for name in ("nmi", "ami", "ari", "acc"):
        assert level[name] == pytest.approx(final[f"val_{name}"], abs=1e-9), name
