"""LR schedule (method.md §10 item 11) and run-directory guards."""

from __future__ import annotations

import math

import pytest

from core.config import load_config, to_yaml
from train import rundir
from train.schedule import lr_at


def test_cosine_per_epoch_matches_spec():
    cfg = load_config(None, world=8)
    assert lr_at(cfg, 0, world=8) == pytest.approx(0.03)
    for e in (1, 57, 100, 199):
        assert lr_at(cfg, e, world=8) == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * e / 200)))
    assert lr_at(cfg, 100, world=8) == pytest.approx(0.015)
    assert lr_at(cfg, 0, world=1) == pytest.approx(0.03 * 32 / 256)


def test_constant_schedule():
    cfg = load_config(None, ["optim.schedule=constant"], world=8)
    assert lr_at(cfg, 150, world=8) == pytest.approx(0.03)


def test_run_dir_refuses_a_different_config(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    rundir.prepare(cfg)
    rundir.prepare(load_config(None, [f"run.output_dir={tmp_path}", "run.resume=none",
                                      "eval.knn_k=20"]))  # allowed to differ
    other = load_config(None, [f"run.output_dir={tmp_path}", "optim.lr=0.5"])
    with pytest.raises(rundir.RunDirError, match="differs at optim.lr"):
        rundir.prepare(other)


def test_config_differences_lists_changed_keys():
    a = to_yaml(load_config(None))
    b = to_yaml(load_config(None, ["model.dim=64", "run.log_every=3"]))
    assert rundir.config_differences(a, b) == ["model.dim"]
