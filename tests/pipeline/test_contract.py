"""docs/method.md §5.3 as a contract both backends meet (`tests/pipeline/contract.py` states the
clauses and tolerances), and graphs that break the recipe are caught by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import DataConfig
from pipeline import augment as aug
from pipeline import dali_graph, dali_pil
from pipeline.plan import epoch_plan, load_shards
from tests.pipeline import contract

# Two global views at 64 px and two local ones (48, 32 px, their own scale ranges): the recipe's
# structure at a size the CPU checks quickly.
SPECS = aug.view_specs(DataConfig(image_size=64, local_crop_sizes=[48, 32], multi_crop=True))
BATCHES = 13  # x 20 images x 4 views = 1040 views: enough for the frequency bounds to mean something
MIN_VIEWS = 1000


def _failing(found: list[str]) -> set[int]:
    """Indices of the views named by `pixels` violations."""
    return {int(line.split("view ", 1)[1].split(" ", 1)[0]) for line in found if line.startswith("pixels:")}


@pytest.mark.slow
def test_dali_graph_meets_the_contract(jpeg_shards):
    views = contract.record_dali(jpeg_shards, SPECS, BATCHES)
    assert len(views) >= MIN_VIEWS
    assert contract.violations(views) == []


@pytest.mark.slow
def test_reference_backend_meets_the_contract(foolbox_jpegs):
    images = [np.asarray(Image.open(p).convert("RGB")) for p in foolbox_jpegs]
    views = contract.record_reference(images, SPECS, per_spec=MIN_VIEWS // len(SPECS))
    assert len(views) >= MIN_VIEWS
    assert contract.violations(views) == []


def _no_blur(img, sigma, device="cpu"):
    return img


def _no_hue(img, factor, device="cpu"):
    return img


@pytest.mark.slow
def test_contract_catches_a_graph_without_blur(jpeg_shards, monkeypatch):
    monkeypatch.setattr(dali_pil, "gaussian_blur", _no_blur)
    views = contract.record_dali(jpeg_shards, SPECS, 3)
    found = contract.violations(views)
    assert contract.clauses(found) == {"pixels"}  # the draws still look right: only pixels tell
    failing = _failing(found)
    assert failing and all(views[i].blur for i in failing)  # it points at the blurred views
    # every view blurred enough to see (sigma 0.1 barely moves a pixel) is caught
    assert {i for i, v in enumerate(views) if v.blur and v.sigma > 0.5} <= failing


@pytest.mark.slow
def test_contract_catches_a_graph_without_hue(jpeg_shards, monkeypatch):
    monkeypatch.setattr(dali_pil, "hue", _no_hue)
    views = contract.record_dali(jpeg_shards, SPECS, 3)
    found = contract.violations(views)
    assert contract.clauses(found) == {"pixels"}
    failing = _failing(found)
    assert failing and all(views[i].jitter for i in failing)
    # torchvision's HSV round trip changes pixels even for a hue shift under one 8-bit step
    assert {i for i, v in enumerate(views) if v.jitter} <= failing


@pytest.mark.slow
def test_fast_augment_deviates_only_where_documented(jpeg_shards):
    """`data.fast_augment`: the same draws, a fixed jitter order and approximate pixels."""
    views = contract.record_dali(jpeg_shards, SPECS, BATCHES, fast=True)
    assert contract.clauses(contract.violations(views)) == {"order", "pixels"}


def test_probe_outputs_do_not_change_the_views(jpeg_shards):
    """The contract checks the views the loader gets: probe outputs come after every random draw."""
    shards, total = load_shards(jpeg_shards, "train")
    plan = epoch_plan(shards, total, train=True, rank=0, world=1, epoch=0, seed=4, batch_size=8)
    runs = []
    for probe in (False, True):
        pipe = dali_graph.train_pipeline(plan, SPECS, True, None, "cpu", 4, probe=probe, batch_size=8,
                                         num_threads=2, device_id=None, seed=4, exec_dynamic=True)
        pipe.build()
        runs.append([[np.array(o.as_tensor()) for o in pipe.run()[:len(SPECS)]] for _ in range(3)])
    for plain, probed in zip(*runs, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(plain, probed, strict=True))


@pytest.mark.gpu
@pytest.mark.slow
def test_dali_gpu_graph_meets_the_contract(jpeg_shards):
    """The GPU graph (mixed decode, GPU operators, the GPU forms of `pipeline.dali_pil`) against
    torchvision on the images nvJPEG decoded."""
    views = contract.record_dali(jpeg_shards, SPECS, BATCHES, device="gpu")
    assert torch.cuda.is_available() and len(views) >= MIN_VIEWS
    assert contract.violations(views) == []
