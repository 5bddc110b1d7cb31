"""The consumers of the format read it: DALI's webdataset reader (CPU) and the webdataset library."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from shards.format import digits_to_int, split_info
from tests.shards.test_build import read_split


def dali_read(out, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[tuple[int, ...]]]:
    """(idx, cls, decoded image shapes) of one epoch through fn.readers.webdataset with our indexes."""
    torch = pytest.importorskip("torch")
    from nvidia.dali import fn, pipeline_def

    entry = split_info(out, split)
    paths = [str(out / s.name) for s in entry.shards]
    index_paths = [str(out / s.index) for s in entry.shards]

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)  # CPU-only: device_id=None
    def pipe():
        image, cls, idx = fn.readers.webdataset(paths=paths, index_paths=index_paths,
                                                ext=["jpg;png", "cls", "idx"],
                                                missing_component_behavior="error", name="reader")
        return fn.decoders.image(image, device="cpu"), cls, idx

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    idxs, clss, shapes = [], [], []
    while len(idxs) < n:  # the reader wraps into the next epoch to fill the last batch: cut at n
        images, cls, idx = p.run()
        idxs += digits_to_int(torch.from_numpy(idx.as_array())).tolist()
        clss += digits_to_int(torch.from_numpy(cls.as_array())).tolist()
        shapes += [images.at(i).shape for i in range(len(images))]
    return np.array(idxs[:n]), np.array(clss[:n]), shapes[:n]


def test_dali_reads_every_idx_once_with_our_index_files(folder_shards):
    out, entry = folder_shards
    idx, cls, shapes = dali_read(out)
    assert sorted(idx.tolist()) == list(range(entry.num_samples))
    truth = {i: int(s["cls"]) for i, s in read_split(out).items()}
    assert [truth[i] for i in idx.tolist()] == cls.tolist()
    assert all(len(s) == 3 and s[2] == 3 for s in shapes)  # every image (copied or converted) is RGB


def test_dali_reads_fashion_mnist_shards(fmnist_shards):
    out, entry = fmnist_shards
    idx, cls, shapes = dali_read(out)
    assert sorted(idx.tolist()) == list(range(1200))
    assert set(shapes) == {(28, 28, 3)} and set(cls.tolist()) == set(range(10))


def test_webdataset_reads_every_idx_once(folder_shards):
    out, entry = folder_shards
    urls = [str(out / s.name) for s in entry.shards]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg;png", "cls", "idx")
    seen = []
    for key, image, cls, idx in ds:
        assert image.ndim == 3 and image.shape[2] == 3
        assert isinstance(cls, int) and 0 <= cls < entry.num_classes
        assert key == f"{int(idx):012d}"
        seen.append(int(idx))
    assert sorted(seen) == list(range(entry.num_samples))
