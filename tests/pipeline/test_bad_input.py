"""Bad input: corrupt images are skipped and reported; broken shard folders fail at start."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from pipeline import build_loader
from shards.format import INFO_NAME, ShardFormatError
from tests.pipeline.conftest import CORRUPT_IDX
from tests.pipeline.test_train import BACKENDS, config


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_images_are_skipped_and_reported(corrupt_shards, backend, caplog):
    cfg = config(corrupt_shards, backend, eval_batch_size=8)
    with caplog.at_level(logging.WARNING), \
            build_loader(cfg, split="train", mode="eval", rank=0, world=1, epoch=0, seed=0) as loader:
        batches = list(loader)
        skipped = loader.skipped_samples
    assert len(batches) == len(loader) == 8  # ceil(60 / 8): the job goes on
    assert sorted(torch.cat([b.idx for b in batches]).tolist()) == sorted(set(range(60)) - set(CORRUPT_IDX))
    assert sorted(int(s.key) for s in skipped) == list(CORRUPT_IDX) and loader.skipped == 2
    assert all(s.shard.endswith(".tar") for s in skipped)
    for s in skipped:  # reported with shard and key
        assert any(s.shard in r.message and s.key in r.message for r in caplog.records)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_images_in_train_mode(corrupt_shards, backend):
    cfg = config(corrupt_shards, backend, batch_size=6)
    with build_loader(cfg, split="train", mode="train", rank=0, world=1, epoch=0, seed=0) as loader:
        batches = list(loader)
        seen = set(torch.cat([b.idx for b in batches]).tolist())
        assert len(batches) == 10 and not seen & set(CORRUPT_IDX)
        # batches keep their size (the queue all-gather needs it): a corrupt sample's slot repeats
        # another sample of its batch, and every other sample is still there
        assert all(len(b) == 6 for b in batches) and loader.skipped == 2
        assert len(seen) == 60 - loader.skipped


def broken_copy(src, tmp_path, mutate):
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    mutate(dst)
    return dst


def _edit_info(folder, edit):
    info = json.loads((folder / INFO_NAME).read_text())
    edit(info["splits"]["train"])
    (folder / INFO_NAME).write_text(json.dumps(info))


def _truncate(folder):
    tar = folder / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])


BROKEN = {
    "missing shard": (lambda d: (d / "train-000001.tar").unlink(), "train-000001.tar"),
    "truncated shard": (_truncate, "train-000001.tar"),
    "missing index": (lambda d: (d / "train-000000.idx").unlink(), "train-000000.idx"),
    "index count": (lambda d: _edit_info(d, lambda s: s["shards"][0].update(num_samples=29)),
                    "train-000000.idx"),
    "num_samples": (lambda d: _edit_info(d, lambda s: s.update(num_samples=61)), INFO_NAME),
    "no manifest": (lambda d: (d / INFO_NAME).unlink(), INFO_NAME),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_folder_fails_at_start_naming_the_file(corrupt_shards, tmp_path, case):
    mutate, name = BROKEN[case]
    folder = broken_copy(corrupt_shards, tmp_path, mutate)
    cfg = config(folder, "dali")
    with pytest.raises(ShardFormatError) as err:
        build_loader(cfg, split="train", mode="train", rank=0, world=1, epoch=0, seed=0)
    message = str(err.value)
    assert name in message and "\n" not in message
