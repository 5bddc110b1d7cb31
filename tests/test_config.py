"""Config schema: defaults, YAML + dotlist merge, and one-line errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import Config, ConfigError, load_config, scaled_lr, to_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_match_the_official_recipe():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.model.dim == 128 and cfg.model.queue_size == 16384
    assert cfg.model.momentum == 0.999 and cfg.model.temperature == 0.2 and cfg.model.mlp
    assert cfg.hcsc.num_clusters == [3000, 2000, 1000] and cfg.hcsc.warmup_epochs == 20
    assert cfg.hcsc.instance_selection and cfg.hcsc.proto_selection
    assert not cfg.hcsc.selection_on_local
    assert not (cfg.hcsc.remove_dropped_negatives or cfg.hcsc.fix_last_prototype
                or cfg.hcsc.average_instance_loss)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.03, 0.9, 1e-4)
    assert cfg.optim.schedule == "cosine" and cfg.optim.epochs == 200
    assert cfg.engine.zero_stage == 0 and cfg.engine.precision == "fp32"
    assert (cfg.cluster.niter, cfg.cluster.nredo) == (20, 5)


def test_lr_scales_with_global_batch():
    cfg = load_config(None, world=8)
    assert scaled_lr(cfg, world=8) == pytest.approx(0.03)  # 8 x 32 = 256
    assert scaled_lr(cfg, world=4) == pytest.approx(0.015)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    world = 8 if name.startswith("hcsc_r50") else 1
    cfg = load_config(CONFIGS / name, world=world)
    assert cfg.data.num_views in (2, 6)


def test_multicrop_recipe_has_six_views():
    cfg = load_config(CONFIGS / "hcsc_r50_200ep_multicrop.yaml", world=8)
    assert cfg.data.num_views == 6 and cfg.hcsc.selection_on_local


def test_overrides_win_over_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\nhcsc:\n  num_clusters: [30, 20]\n")
    cfg = load_config(path, ["optim.lr=0.06", "data.backend=torch"])
    assert cfg.optim.lr == 0.06 and cfg.data.backend == "torch"
    assert cfg.hcsc.num_clusters == [30, 20]


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["optim.epochs=7", "hcsc.warmup_epochs=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("overrides, key, words", [
    (["optim.lrr=1"], "optim.lrr", "unknown config key"),
    (["nosuchsection.x=1"], "nosuchsection", "unknown config key"),
    (["optim.lr=abc"], "optim.lr", "could not be converted"),
    (["optim.lr=-1"], "optim.lr", "must be > 0"),
    (["data.backend=pil"], "data.backend", "must be one of"),
    (["engine.zero_stage=3"], "engine.zero_stage", "must be 0 or 1"),
    (["engine.precision=fp8"], "engine.precision", "must be one of"),
    (["hcsc.num_clusters=[10,20]"], "hcsc.num_clusters", "strictly decreasing"),
    (["hcsc.warmup_epochs=200"], "hcsc.warmup_epochs", "must be < optim.epochs 200"),
    (["model.queue_size=1000"], "model.queue_size", "1000 is not divisible by the global batch 32"),
    (["optim.lr"], "optim.lr", "expected key=value"),
])
def test_each_failure_names_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert key in message and words in message


def test_moco_baseline_needs_no_warmup_check():
    cfg = load_config(None, ["hcsc.enabled=false", "hcsc.warmup_epochs=500"])
    assert not cfg.hcsc.enabled


def test_queue_check_uses_the_world_size():
    load_config(None, ["data.batch_size=64", "model.queue_size=256"], world=4)
    with pytest.raises(ConfigError, match="queue size 256 is not divisible by the global batch 384"):
        load_config(None, ["data.batch_size=64", "model.queue_size=256"], world=6)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_typo_exits_nonzero_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "train.cli", "optim.lrr=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lrr" in lines[0]
