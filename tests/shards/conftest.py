"""Shard-test fixtures: a small ImageNet-style image folder of real JPEGs plus awkward inputs."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.build import build_shards

SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361"]
EMPTY_CLASS = "n09999999"


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def awkward_inputs(real: Path) -> dict[str, bytes]:
    """Inputs ImageNet really contains (CMYK, grayscale, PNG named .JPEG) and broken ones, by name."""
    rgb = Image.open(real).convert("RGB")
    png = io.BytesIO()
    rgb.resize((64, 48)).save(png, "PNG")
    deep = io.BytesIO()
    # 16-bit grayscale: a ramp over the full 0..65535 range (PIL saves mode I;16 as a 16-bit PNG)
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(deep, "PNG")
    data = real.read_bytes()
    return {
        "cmyk.JPEG": jpeg_bytes(rgb.convert("CMYK"), quality=90),
        "gray.JPEG": jpeg_bytes(rgb.convert("L"), quality=90),
        "png_named.JPEG": png.getvalue(),
        "sixteen.png": deep.getvalue(),
        "truncated.JPEG": data[: len(data) // 2],
        "empty.JPEG": b"",
        "notes.txt": b"not an image\n",
    }


def make_image_folder(root: Path, jpegs: list[Path]) -> dict[str, str]:
    """20 real JPEGs over 4 synset folders (5 each), awkward inputs in the first, one empty class.

    Returns file name -> synset for every image file written.
    """
    where = {}
    for i, src in enumerate(jpegs):
        synset = SYNSETS[i % len(SYNSETS)]
        (root / synset).mkdir(parents=True, exist_ok=True)
        name = f"{synset}_{i}.JPEG"
        shutil.copyfile(src, root / synset / name)
        where[name] = synset
    for name, data in awkward_inputs(jpegs[0]).items():
        (root / SYNSETS[1] / name).write_bytes(data)
        where[name] = SYNSETS[1]
    (root / EMPTY_CLASS).mkdir()
    return where


@pytest.fixture(autouse=True)
def _no_debug_tracebacks(monkeypatch):
    """The CLI tests count stderr lines; HCSC_DEBUG=1 in the caller's shell would add tracebacks."""
    monkeypatch.delenv("HCSC_DEBUG", raising=False)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, foolbox_jpegs) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    make_image_folder(root, foolbox_jpegs)
    return root


@pytest.fixture(scope="session")
def folder_shards(tmp_path_factory, image_folder) -> tuple[Path, dict]:
    """The image folder built once with 2 worker processes, 5 samples per shard."""
    out = tmp_path_factory.mktemp("folder_shards")
    entry = build_shards(f"imagefolder:{image_folder}", out, samples_per_shard=5, seed=3, workers=2,
                         show_progress=False)
    return out, entry


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory, fashion_mnist_dir) -> tuple[Path, dict]:
    """1200 Fashion-MNIST test images in shards of 500 (500, 500, 200)."""
    out = tmp_path_factory.mktemp("fmnist_shards")
    entry = build_shards(f"fashion-mnist:{fashion_mnist_dir}:test", out, samples_per_shard=500,
                         seed=0, limit=1200, show_progress=False)
    return out, entry
