"""Shards for the end-to-end tests of the trainer: a small Fashion-MNIST train and val split."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory, fashion_mnist_dir):
    from shards.build import build_shards

    out = tmp_path_factory.mktemp("fmnist-shards")
    build_shards(f"fashion-mnist:{fashion_mnist_dir}:train", out, split="train", limit=256,
                 samples_per_shard=64, show_progress=False)
    build_shards(f"fashion-mnist:{fashion_mnist_dir}:test", out, split="val", limit=128,
                 samples_per_shard=64, show_progress=False)
    return out


