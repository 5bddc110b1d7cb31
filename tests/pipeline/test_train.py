"""Train mode on real Fashion-MNIST shards: batch structure, ranges, determinism, resume."""

from __future__ import annotations

import pytest
import torch

from core.config import DataConfig
from pipeline import build_loader
from pipeline.augment import MEAN, STD, view_specs
from tests.pipeline.conftest import FMNIST_TRAIN, shard_labels

BACKENDS = ["dali", "torch"]


def config(folder, backend: str, **kw) -> DataConfig:
    base = dict(shards=str(folder), backend=backend, image_size=32, eval_resize=36, batch_size=16,
                eval_batch_size=16, workers=2, local_crop_sizes=[24, 16, 12, 8])
    return DataConfig(**{**base, **kw})


def collect(cfg: DataConfig, **kw) -> list:
    args = dict(split="train", mode="train", rank=0, world=1, epoch=0, seed=0)
    with build_loader(cfg, **{**args, **kw}) as loader:
        return list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multi_crop", [False, True])
def test_batch_structure_and_ranges(fmnist_shards, backend, multi_crop):
    cfg = config(fmnist_shards, backend, multi_crop=multi_crop)
    with build_loader(cfg, split="train", mode="train", rank=0, world=1, epoch=0, seed=0) as loader:
        assert len(loader) == FMNIST_TRAIN // 16  # drop last: 203 // 16
        batches = list(loader)
    assert len(batches) == len(loader)
    sizes = [32, 32, 24, 16, 12, 8] if multi_crop else [32, 32]
    labels = shard_labels(fmnist_shards)
    lo = torch.tensor([-m / s for m, s in zip(MEAN, STD, strict=True)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]).view(1, 3, 1, 1)
    for b in batches:
        assert [tuple(v.shape) for v in b.views] == [(16, 3, s, s) for s in sizes]
        assert b.idx.dtype == b.cls.dtype == torch.int64 and b.idx.shape == (16,)
        assert torch.equal(b.cls, labels[b.idx])  # labels travel with their images
        for v in b.views:
            assert v.dtype == torch.float32
            assert (v >= lo - 1e-3).all() and (v <= hi + 1e-3).all()  # normalised uint8 range
    # the two global views of one image are different augmentations
    assert not torch.equal(batches[0].views[0], batches[0].views[1])
    idx = torch.cat([b.idx for b in batches])
    assert len(set(idx.tolist())) == len(idx)  # one pass: no sample twice in an epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_disjoint_with_equal_counts(fmnist_shards, backend):
    cfg = config(fmnist_shards, backend)
    per_rank = [collect(cfg, rank=r, world=3, epoch=2) for r in range(3)]
    assert {len(b) for b in per_rank} == {FMNIST_TRAIN // (3 * 16)}  # identical batch counts
    sets = [set(torch.cat([b.idx for b in batches]).tolist()) for batches in per_rank]
    assert sum(len(s) for s in sets) == len(set().union(*sets))


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_and_epoch_change(fmnist_shards, backend):
    cfg = config(fmnist_shards, backend)
    a, b = collect(cfg, epoch=1, seed=7), collect(cfg, epoch=1, seed=7)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.idx, y.idx)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views, strict=True))
    c = collect(cfg, epoch=2, seed=7)
    assert not torch.equal(torch.cat([x.idx for x in a]), torch.cat([x.idx for x in c]))
    assert not torch.equal(a[0].views[0], c[0].views[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_equals_uninterrupted(fmnist_shards, backend):
    cfg = config(fmnist_shards, backend, multi_crop=True)
    full = collect(cfg, epoch=3, seed=1)
    resumed = collect(cfg, epoch=3, seed=1, start_batch=4)
    assert len(resumed) == len(full) - 4
    for x, y in zip(full[4:], resumed, strict=True):
        assert torch.equal(x.idx, y.idx)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views, strict=True))


def test_multi_crop_scales_follow_spec():
    cfg = DataConfig(multi_crop=True)  # method.md §5.3 numbers at 224
    specs = view_specs(cfg)
    assert [s.size for s in specs] == [224, 224, 192, 160, 128, 96]
    mins = [round(s.scale[0], 3) for s in specs]
    maxs = [round(s.scale[1], 3) for s in specs]
    assert mins == [0.2, 0.2, 0.171, 0.143, 0.114, 0.086]
    assert maxs == [1.0, 1.0, 0.857, 0.714, 0.571, 0.429]


def test_dali_shuffle_buffer_smaller_than_the_share_repeats_nothing(fmnist_shards, monkeypatch):
    from pipeline import dali_graph

    monkeypatch.setattr(dali_graph, "SHUFFLE_BUFFER", 16)  # the real buffer (1024) << a rank's share
    batches = collect(config(fmnist_shards, "dali", batch_size=8))
    idx = torch.cat([b.idx for b in batches]).tolist()
    assert len(idx) == 8 * (FMNIST_TRAIN // 8) == len(set(idx))
    assert idx != sorted(idx)  # shuffled


@pytest.mark.gpu
def test_dali_gpu_views_match_cpu(fmnist_shards, jpeg_shards):
    """Mixed (nvJPEG) decode and GPU ops: views land on the GPU and agree with the CPU pipeline. Both
    loaders must be DALI's: the comparison means nothing if either were the torch one, so it is
    asserted (and without DALI, build_loader stops)."""
    from pipeline.dali_loader import DaliLoader

    cfg = config(jpeg_shards, "dali", image_size=64, eval_resize=72, eval_batch_size=8)
    out = {}
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        args = dict(split="train", mode="eval", rank=0, world=1, epoch=0, seed=0, device=device)
        with build_loader(cfg, **args) as loader:
            assert isinstance(loader, DaliLoader)
            batches = list(loader)
        assert all(b.views[0].device == device and b.idx.device == device for b in batches)
        out[device.type] = torch.cat([b.views[0].cpu() for b in batches])
    assert (out["cuda"] - out["cpu"]).abs().mean() < 0.02  # decoders differ by IDCT rounding
    cfg = config(fmnist_shards, "dali", multi_crop=True)
    with build_loader(cfg, split="train", mode="train", rank=0, world=1, epoch=0, seed=0,
                      device=torch.device("cuda", 0)) as loader:
        assert isinstance(loader, DaliLoader)
        batches = list(loader)
    assert len(batches) == FMNIST_TRAIN // 16 and all(v.is_cuda for v in batches[0].views)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_stay_valid_after_later_batches(fmnist_shards, backend):
    """Views may share memory with the pipeline (DALI zero-copy); a kept batch must not change."""
    cfg = config(fmnist_shards, backend)
    with build_loader(cfg, split="train", mode="train", rank=0, world=1, epoch=0, seed=0) as loader:
        held = [(b, [v.clone() for v in b.views], b.idx.clone()) for b in loader]
    for batch, views, idx in held:
        assert torch.equal(batch.idx, idx)
        assert all(torch.equal(v, c) for v, c in zip(batch.views, views, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_mode_is_crop_and_flip_only(fmnist_shards, coordinate_shards, backend):
    """mode="linear" (linear probe, method.md §7.1): one RandomResizedCrop + flip view, no colour ops."""
    cfg = config(fmnist_shards, backend)
    batches = collect(cfg, mode="linear", world=2, rank=1)
    assert len(batches) == FMNIST_TRAIN // (2 * 16)
    labels = shard_labels(fmnist_shards)
    assert all(len(b.views) == 1 and b.views[0].shape == (16, 3, 32, 32) for b in batches)
    assert all(torch.equal(b.cls, labels[b.idx]) for b in batches)
    # on the coordinate image (red = column, green = row, blue = 0) pixels keep their values:
    # blue stays 0 (any colour op mixes channels) and red runs monotonically along each row
    cfg = config(coordinate_shards, backend, image_size=64, eval_resize=64, batch_size=4)
    views = torch.cat([b.views[0] for b in collect(cfg, mode="linear")])
    rgb = (views * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    assert rgb[:, 2].abs().max() < 4  # JPEG noise only
    steps = rgb[:, 0, :, 1:] - rgb[:, 0, :, :-1]
    assert all(((s > -2).all() or (s < 2).all()) for s in steps)  # flipped or not, never jittered
    colour = torch.cat([b.views[0] for b in collect(cfg)])  # train mode: colour ops do show
    colour_rgb = (colour * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    assert colour_rgb[:, 2].abs().amax(dim=(1, 2)).max() > 20
