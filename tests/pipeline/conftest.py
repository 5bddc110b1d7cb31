"""Shard fixtures for the pipeline tests, written in the `shards/format.py` format.

Temporary writer until `shards.builder` lands: samples ``{__key__, jpg|png, cls, idx}`` written with
`webdataset.TarWriter`, a DALI index per tar from the `wds2idx` tool the DALI wheel installs, and an
``_info.json`` with the manifest fields the pipeline reads.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards import format as sf

WDS2IDX = Path(sys.executable).parent / "wds2idx"


def fashion_mnist(folder: Path, n: int, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """The first `n` images (uint8 [n, 28, 28]) and labels of a Fashion-MNIST idx split."""
    with gzip.open(folder / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return images.copy(), labels.astype(np.int64)


def encode(image: np.ndarray | Image.Image, ext: str = "jpg", quality: int = 90) -> bytes:
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="JPEG" if ext == "jpg" else "PNG", quality=quality)
    return buf.getvalue()


def write_shards(folder: Path, split: str, encoded: Sequence[bytes], labels: Sequence[int],
                 per_shard: int, ext: str = "jpg", class_names: Sequence[str] | None = None,
                 seed: int = 0) -> dict:
    """Write `encoded` images as shards of `split` (globally shuffled with `seed`, as the builder
    does), their DALI index files and the split's entry of ``_info.json``; returns that entry."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(encoded))
    shards = []
    for s, start in enumerate(range(0, len(order), per_shard)):
        name = sf.shard_name(split, s)
        members = order[start:start + per_shard]
        with wds.TarWriter(str(folder / name)) as sink:
            for i in members:
                sink.write({"__key__": sf.sample_key(int(i)), ext: encoded[i],
                            "cls": sf.encode_cls(int(labels[i])), "idx": sf.encode_idx(int(i))})
        index = sf.index_name(name)
        subprocess.run([str(WDS2IDX), str(folder / name), str(folder / index)], check=True,
                       capture_output=True)
        data = (folder / name).read_bytes()
        shards.append({"name": name, "num_samples": len(members), "sha256": hashlib.sha256(data).hexdigest(),
                       "bytes": len(data), "index": index})
    names = list(class_names) if class_names else [str(c) for c in range(int(max(labels)) + 1)]
    entry = {"num_samples": len(encoded), "class_names": names, "shards": shards,
             "idx_range": [0, len(encoded)]}
    info_path = folder / sf.INFO_NAME
    info = sf.read_info(folder) if info_path.is_file() else {"format_version": sf.FORMAT_VERSION, "splits": {}}
    info["splits"][split] = entry
    sf.write_json_atomic(info_path, info)
    return entry


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory, fashion_mnist_dir) -> Path:
    """Fashion-MNIST: `train` FMNIST_TRAIN = 203 samples (4 shards of 64, 64, 64, 11 as JPEG) and `val` 50 (PNG)."""
    folder = tmp_path_factory.mktemp("fmnist_shards")
    images, labels = fashion_mnist(fashion_mnist_dir, 253)
    names = [f"class{c}" for c in range(10)]
    write_shards(folder, "train", [encode(im) for im in images[:203]], labels[:203], 64, class_names=names)
    write_shards(folder, "val", [encode(im, "png") for im in images[203:]], labels[203:], 32, ext="png",
                 class_names=names)
    return folder


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory, foolbox_jpegs) -> Path:
    """The 20 real 512x512 foolbox ImageNet JPEGs (original bytes) in `train`, 3 shards of 8, 8, 4."""
    folder = tmp_path_factory.mktemp("jpeg_shards")
    labels = list(range(len(foolbox_jpegs)))
    write_shards(folder, "train", [p.read_bytes() for p in foolbox_jpegs], labels, 8)
    return folder


FMNIST_TRAIN = 203


def fmnist_labels(fashion_mnist_dir: Path) -> "torch.Tensor":
    """Labels of the fixture's samples, indexed by the global idx."""
    import torch

    return torch.from_numpy(fashion_mnist(fashion_mnist_dir, 253)[1])


CORRUPT_IDX = (5, 41)


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory, fashion_mnist_dir) -> Path:
    """60 Fashion-MNIST JPEGs in 2 shards of 30, where samples CORRUPT_IDX hold non-image bytes."""
    folder = tmp_path_factory.mktemp("corrupt_shards")
    images, labels = fashion_mnist(fashion_mnist_dir, 60)
    encoded = [encode(im) for im in images]
    for i in CORRUPT_IDX:
        encoded[i] = b"\xff\xd8 not a jpeg " * 8
    write_shards(folder, "train", encoded, labels, 30)
    return folder


@pytest.fixture(scope="session")
def coordinate_shards(tmp_path_factory) -> Path:
    """8 copies of a 256x256 PNG whose red channel is the column and green channel the row, so
    the pixel values of a crop tell where it came from."""
    folder = tmp_path_factory.mktemp("coordinate_shards")
    ramp = np.arange(256, dtype=np.uint8)
    image = np.stack([np.tile(ramp, (256, 1)), np.tile(ramp[:, None], (1, 256)),
                      np.zeros((256, 256), np.uint8)], axis=-1)
    write_shards(folder, "train", [encode(image, "png")] * 8, [0] * 8, 8, ext="png")
    return folder
