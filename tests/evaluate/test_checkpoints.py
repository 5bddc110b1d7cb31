"""Checkpoint loading and interoperability (method.md §8): official layout, our trainer's folders,
torchvision and detectron2 export, and loud failures."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from torchvision.models import resnet18

from core.config import HCSCConfig, ModelConfig
from evaluate.checkpoints import CheckpointError, load_backbone, read_checkpoint
from evaluate.interop import detectron2_key, export_detectron2, export_torchvision, import_official
from model.checkpoint_io import load_official_state_dict
from model.encoders import create_encoder, pooled_features
from model.hcsc import HCSC
from model.heads import build_head
from tests.evaluate.conftest import tiny_hcsc


def _official_resnet18(seed: int = 0) -> tuple[dict, torch.nn.Module]:
    """A resnet18 + MLP head renamed to the official DDP keys, with encoder_k and the queue."""
    torch.manual_seed(seed)
    trunk, feat_dim = create_encoder("resnet18")
    trunk.fc = build_head(feat_dim, 128)
    with torch.no_grad():  # non-trivial BN statistics, so a dropped buffer would show
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    sd = {f"module.encoder_q.{k}": v.clone() for k, v in trunk.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v + 1 for k, v in trunk.state_dict().items()})
    sd.update({"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long),
               "module.queue_index": torch.arange(64)})
    return sd, trunk.eval()


def _same_features(a: torch.nn.Module, b: torch.nn.Module, size: int = 32) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(a.eval(), x), pooled_features(b.eval(), x))


@pytest.mark.slow
def test_official_layout_loads_the_query_trunk_and_drops_the_head(tmp_path):
    sd, reference = _official_resnet18()
    assert {"module.encoder_q.fc.0.weight", "module.encoder_q.fc.2.bias"} <= set(sd)
    path = tmp_path / "official.pth"
    torch.save({"epoch": 199, "arch": "resnet18", "state_dict": sd, "optimizer": {"lr": torch.tensor(0.1)}},
               path)
    trunk, feat_dim = load_backbone(path, "resnet18")
    assert feat_dim == 512 and isinstance(trunk.fc, torch.nn.Identity) and not trunk.training
    assert not any(p.requires_grad for p in trunk.parameters())
    _same_features(trunk, reference)
    # encoder_k (shifted by one) must not have been taken
    assert not torch.equal(trunk.conv1.weight, sd["module.encoder_k.conv1.weight"])
    # no wrapper, no prefix: the recipe's step 1 is optional
    torch.save({k.removeprefix("module."): v for k, v in sd.items()}, tmp_path / "bare.pth")
    _same_features(load_backbone(tmp_path / "bare.pth", "resnet18")[0], reference)


@pytest.mark.slow
def test_import_official_round_trips_through_exports(tmp_path):
    sd, reference = _official_resnet18()
    torch.save({"epoch": 5, "state_dict": sd}, tmp_path / "official.pth")
    summary = import_official(tmp_path / "official.pth", tmp_path / "ours.pth")
    assert summary == {"keys": len(sd), "encoder_k": True, "queue": True, "epoch": 5}
    imported = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert imported["state_dict"].keys() == sd.keys()
    # model.checkpoint_io accepts it for a whole HCSC module
    model = HCSC(ModelConfig(encoder="resnet18", dim=128, queue_size=64), HCSCConfig())
    load_official_state_dict(model, imported)
    torch.testing.assert_close(model.encoder_k.layer1[0].conv1.weight,
                               sd["module.encoder_k.layer1.0.conv1.weight"])
    # torchvision export: a plain resnet18 loads it with only fc missing, and so does our loader
    export_torchvision(tmp_path / "ours.pth", tmp_path / "tv.pth")
    tv_sd = torch.load(tmp_path / "tv.pth", weights_only=True)
    assert not any(k.startswith("fc.") for k in tv_sd)
    net = resnet18()
    missing, unexpected = net.load_state_dict(tv_sd, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    _same_features(net, reference)
    _same_features(load_backbone(tmp_path / "tv.pth", "resnet18")[0], reference)


def test_detectron2_export_key_names(tmp_path):
    sd, reference = _official_resnet18()
    torch.save({"state_dict": sd}, tmp_path / "official.pth")
    export_detectron2(tmp_path / "official.pth", tmp_path / "d2.pkl")
    with open(tmp_path / "d2.pkl", "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    model = obj["model"]
    trunk = reference.state_dict()
    expected = {  # method.md §8 renaming, exact names detectron2's ResNet uses
        "stem.conv1.weight": "conv1.weight",
        "stem.conv1.norm.weight": "bn1.weight",
        "stem.conv1.norm.running_var": "bn1.running_var",
        "res2.0.conv1.weight": "layer1.0.conv1.weight",
        "res2.1.conv2.norm.bias": "layer1.1.bn2.bias",
        "res3.0.shortcut.weight": "layer2.0.downsample.0.weight",
        "res3.0.shortcut.norm.running_mean": "layer2.0.downsample.1.running_mean",
        "res5.1.conv2.norm.weight": "layer4.1.bn2.weight",
    }
    for new, old in expected.items():
        assert new in model, new
        assert model[new].__class__.__name__ == "ndarray"
        torch.testing.assert_close(torch.from_numpy(model[new]), trunk[old])
    assert detectron2_key("layer3.5.bn3.weight") == "res4.5.conv3.norm.weight"  # resnet50 bottleneck
    assert not [k for k in model if "fc" in k or "encoder" in k or "queue" in k or "num_batches" in k]
    n_trunk = len([k for k in trunk if not k.startswith("fc.") and "num_batches_tracked" not in k])
    assert len(model) == n_trunk


@pytest.mark.slow
def test_trainer_checkpoint_folders(tmp_path):
    model = tiny_hcsc()
    run = tmp_path / "run"
    tag = run / "checkpoints" / "epoch0003-batch000000"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "epoch": 3, "format_version": 1,
                "config_yaml": "model:\n  encoder: resnet18_small\n  dim: 16\n"},
               tag / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text(tag.name + "\n")
    for path in (run, tag, tag / "mp_rank_00_model_states.pt"):
        ckpt = read_checkpoint(path)
        assert ckpt.kind == "deepspeed" and ckpt.epoch == 3 and ckpt.encoder_name() == "resnet18_small"
        trunk, _ = load_backbone(path)  # encoder taken from the stored config
        _same_features(trunk, model.encoder_q, size=16)
    # a tag folder holding only the official copy
    other = tmp_path / "tag2"
    other.mkdir()
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               other / "hcsc_official.pth.tar")
    _same_features(load_backbone(other, "resnet18_small")[0], model.encoder_q, size=16)


def test_wrong_encoder_names_missing_and_unexpected_keys(tmp_path):
    sd, _ = _official_resnet18()
    torch.save({"state_dict": sd}, tmp_path / "r18.pth")
    with pytest.raises(CheckpointError) as err:
        load_backbone(tmp_path / "r18.pth", "resnet50")
    text = str(err.value)
    assert "r18.pth" in text and "missing" in text and "unexpected" in text and "--encoder" in text
    assert "layer1.0.conv3.weight" in text or "layer1.0.bn3" in text  # a resnet50-only key is named
    assert "\n" not in text
    with pytest.raises(CheckpointError, match=r"conv1\.weight \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)"):
        load_backbone(tmp_path / "r18.pth", "resnet18_small")


def test_pickles_that_need_code_are_refused(tmp_path):
    sd, _ = _official_resnet18()
    torch.save({"state_dict": sd, "args": argparse.Namespace(arch="resnet18")}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle code") as err:
        load_backbone(tmp_path / "code.pth", "resnet18")
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="refusing to unpickle code"):
        import_official(tmp_path / "code.pth", tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_unusable_inputs_fail_in_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_backbone(tmp_path / "absent.pth")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_backbone(tmp_path / "run")
    torch.save({"weights": {"linear.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no encoder_q"):
        load_backbone(tmp_path / "other.pth")
