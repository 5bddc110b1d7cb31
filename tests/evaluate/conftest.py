"""Evaluation fixtures: tiny Fashion-MNIST shards and checkpoints made in the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.config import HCSCConfig, ModelConfig
from model.checkpoint_io import official_state_dict
from model.hcsc import HCSC

TRAIN_N, VAL_N = 160, 64
ROOT = Path(__file__).resolve().parents[2]


def tiny_hcsc(encoder: str = "resnet18_small", seed: int = 0) -> HCSC:
    torch.manual_seed(seed)
    return HCSC(ModelConfig(encoder=encoder, dim=16, queue_size=32), HCSCConfig(num_clusters=[8, 4]))


@pytest.fixture(scope="session")
def fm_shards(tmp_path_factory, fashion_mnist_dir) -> Path:
    """Fashion-MNIST: `train` 160 images (shards of 64), `val` 64 test images (shards of 32)."""
    from shards.build import build_shards

    out = tmp_path_factory.mktemp("eval-fm-shards")
    build_shards(f"fashion-mnist:{fashion_mnist_dir}:train", out, split="train", limit=TRAIN_N,
                 samples_per_shard=64, show_progress=False)
    build_shards(f"fashion-mnist:{fashion_mnist_dir}:test", out, split="val", limit=VAL_N,
                 samples_per_shard=32, show_progress=False)
    return out


@pytest.fixture(scope="session")
def official_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised resnet18_small HCSC in the official layout (method.md §8)."""
    path = tmp_path_factory.mktemp("eval-ckpt") / "hcsc_random.pth.tar"
    torch.save({"epoch": 0, "arch": "resnet18_small", "state_dict": official_state_dict(tiny_hcsc())}, path)
    return path


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, fm_shards) -> Path:
    """A real (tiny) run through `hcsc-train` on `fm_shards`: configs/debug.yaml (resnet18_small, 16 px,
    levels 16/8/4, warm-up 1 epoch), 2 epochs of 2 steps. Its checkpoints: epoch0001-batch000000 (end
    of the warm-up: no prototypes) and epoch0002-batch000000, `latest` (the prototypes of epoch 1)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # configs/debug.yaml: kNN k=10 T=0.07 and NMI at the end of training
    cmd = [sys.executable, "-m", "train.cli", "--config", str(ROOT / "configs" / "debug.yaml"),
           f"data.shards={fm_shards}", f"run.output_dir={run}", "optim.epochs=2", "run.max_steps_per_epoch=2"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run
