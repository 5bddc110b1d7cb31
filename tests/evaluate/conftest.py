"""Evaluation fixtures: tiny Fashion-MNIST shards and checkpoints made in the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import HCSCConfig, ModelConfig
from model.checkpoint_io import official_state_dict
from model.hcsc import HCSC

TRAIN_N, VAL_N = 160, 64


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
