"""The start-up check on 2 gloo ranks: the ranks agree, and a mistake seen by one rank stops both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.config import load_config

pytestmark = pytest.mark.dist
ROOT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml")


def _check_on_rank(shards_by_rank: list[str], run_dir: str) -> str:
    from core import dist
    from train import preflight

    overrides = [f"data.shards={shards_by_rank[dist.rank()]}", f"run.output_dir={run_dir}"]
    cfg = load_config(ROOT_CONFIG, overrides, world=2)
    try:
        found = preflight.check(cfg)
    except preflight.PreflightError as err:
        return f"error: {err}"
    return f"ok: {found.train.num_samples}"




def test_ranks_that_see_the_same_shards_pass(dist_run, fmnist_shards, tmp_path):
    results = dist_run(_check_on_rank, 2, [str(fmnist_shards)] * 2, str(tmp_path / "run"))
    assert results == ["ok: 256", "ok: 256"]
    assert not (tmp_path / "run").exists()  # the check writes nothing


def test_ranks_that_see_different_shards_stop_together(dist_run, fmnist_shards, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fmnist_shards, other)
    info = other / "_info.json"
    info.write_text(json.dumps(json.loads(info.read_text()), indent=2))  # valid, but not the same file
    results = dist_run(_check_on_rank, 2, [str(fmnist_shards), str(other)], str(tmp_path / "run"))
    assert all(r.startswith("error: data.shards=") and "ranks see different shard folders" in r
               for r in results), results


def test_a_damaged_shard_on_one_rank_stops_every_rank(dist_run, fmnist_shards, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fmnist_shards, other)
    tar = other / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-512])
    results = dist_run(_check_on_rank, 2, [str(fmnist_shards), str(other)], str(tmp_path / "run"))
    assert results[0] == results[1] and results[0].startswith("error: rank 1: data.train_split=train:")


def test_a_mistake_on_one_rank_stops_every_rank(dist_run, fmnist_shards, tmp_path):
    results = dist_run(_check_on_rank, 2, [str(fmnist_shards), str(tmp_path / "missing")],
                       str(tmp_path / "run"))
    assert results[0] == results[1]
    assert "rank 1: data.shards=" in results[0] and "no such folder" in results[0]
