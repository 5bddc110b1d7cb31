"""Shard fixtures for the pipeline tests, built by `shards.build.build_shards` from real images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset.tariterators import tarfile_samples

from shards.build import build_shards
from shards.format import sample_key, split_info

FMNIST_TRAIN = 203  # not a multiple of any world x batch the tests use
CORRUPT_IDX = (5, 41)


def build(source: str, out: Path, split: str, per_shard: int, limit: int | None = None) -> Path:
    build_shards(source, out, split=split, samples_per_shard=per_shard, limit=limit, seed=0, workers=1,
                 fsync=False, show_progress=False)
    return out


def shard_labels(folder: Path, split: str = "train") -> torch.Tensor:
    """cls of every sample by idx, read straight from the tars (the oracle for label checks)."""
    entry = split_info(folder, split)
    urls = [{"url": str(folder / s.name)} for s in entry.shards]
    labels = torch.full((entry.num_samples,), -1, dtype=torch.int64)
    for sample in tarfile_samples(urls):
        labels[int(sample["idx"])] = int(sample["cls"])
    assert (labels >= 0).all()
    return labels


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory, fashion_mnist_dir) -> Path:
    """Fashion-MNIST: `train` FMNIST_TRAIN samples (shards of 64, 64, 64, 11), `val` 50 (one shard)."""
    out = tmp_path_factory.mktemp("fmnist_shards")
    build(f"fashion-mnist:{fashion_mnist_dir}:train", out, "train", 64, limit=FMNIST_TRAIN)
    return build(f"fashion-mnist:{fashion_mnist_dir}:test", out, "val", 64, limit=50)


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory, foolbox_jpegs) -> Path:
    """The 20 real foolbox ImageNet JPEGs (copied byte for byte) in `train`, 3 shards of 8, 8, 4."""
    root = tmp_path_factory.mktemp("jpeg_folder")
    for i, path in enumerate(foolbox_jpegs):
        (root / f"c{i % 4}").mkdir(exist_ok=True)
        shutil.copyfile(path, root / f"c{i % 4}" / path.name)
    return build(f"imagefolder:{root}", tmp_path_factory.mktemp("jpeg_shards"), "train", 8)


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory, fashion_mnist_dir) -> Path:
    """60 Fashion-MNIST JPEGs in 2 shards of 30 whose samples CORRUPT_IDX were overwritten in
    place (same length, so sizes and indexes still match) with bytes that are not an image."""
    out = build(f"fashion-mnist:{fashion_mnist_dir}:test", tmp_path_factory.mktemp("corrupt_shards"),
                "train", 30, limit=60)
    for idx in CORRUPT_IDX:
        corrupt_member(out, idx)
    return out


def corrupt_member(folder: Path, idx: int) -> None:
    """Overwrite the jpg of sample `idx` inside its tar, found through the DALI index file."""
    for index in sorted(folder.glob("train-*.idx")):
        for line in index.read_text().splitlines()[1:]:
            fields = line.split()
            for ext, offset, size, name in zip(fields[::4], fields[1::4], fields[2::4], fields[3::4],
                                               strict=True):
                if ext == "jpg" and name == f"{sample_key(idx)}.jpg":
                    with open(index.with_suffix(".tar"), "r+b") as f:
                        f.seek(int(offset))
                        f.write((b"\xff\xd8 not a jpeg " * int(size))[: int(size)])
                    return
    raise AssertionError(f"sample {idx} not found in {folder}")


@pytest.fixture(scope="session")
def coordinate_shards(tmp_path_factory) -> Path:
    """8 copies of a 256x256 image whose red channel is the column and green channel the row, so
    the pixel values of a crop tell where it came from."""
    root = tmp_path_factory.mktemp("coordinate_folder")
    (root / "ramp").mkdir()
    ramp = np.arange(256, dtype=np.uint8)
    image = np.stack([np.tile(ramp, (256, 1)), np.tile(ramp[:, None], (1, 256)),
                      np.zeros((256, 256), np.uint8)], axis=-1)
    for i in range(8):
        Image.fromarray(image).save(root / "ramp" / f"{i}.png")
    return build(f"imagefolder:{root}", tmp_path_factory.mktemp("coordinate_shards"), "train", 8)
