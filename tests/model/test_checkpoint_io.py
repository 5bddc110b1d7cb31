"""Official checkpoint layout in and out (method.md §8, 10.13)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet50

from core.config import HCSCConfig, ModelConfig
from model.checkpoint_io import load_official_state_dict, official_state_dict
from model.hcsc import HCSC
from tests.model._helpers import make_model


def _official_layout(model) -> dict[str, torch.Tensor]:
    """A state dict with exactly the DDP key layout of the official checkpoints, built by hand."""
    sd = {}
    for name in ("encoder_q", "encoder_k"):
        for k, v in getattr(model, name).state_dict().items():
            sd[f"module.{name}.{k}"] = v.clone()
    for k in ("queue", "queue_ptr", "queue_index"):
        sd[f"module.{k}"] = getattr(model, k).clone()
    return sd


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resnet50_export_has_the_official_keys_and_shapes():
    model = HCSC(ModelConfig(encoder="resnet50"), HCSCConfig())
    sd = official_state_dict(model)
    assert sd.keys() == _official_layout(model).keys()
    assert sd["module.queue"].shape == (128, 16384) and sd["module.queue_ptr"].shape == (1,)
    assert sd["module.queue_index"].shape == (16384,)
    assert sd["module.encoder_q.fc.0.weight"].shape == (2048, 2048)
    assert sd["module.encoder_q.fc.2.weight"].shape == (128, 2048)
    assert "module.encoder_q.layer4.2.bn3.num_batches_tracked" in sd
    assert "module.encoder_k.layer1.0.downsample.1.running_var" in sd
    # method.md §8 backbone recipe: the official eval scripts' check on our export
    trunk = {k[len("module.encoder_q."):]: v for k, v in sd.items()
             if k.startswith("module.encoder_q.") and not k.startswith("module.encoder_q.fc.")}
    missing, unexpected = resnet50().load_state_dict(trunk, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and unexpected == []


def test_load_official_layout_and_round_trip():
    source, target = make_model(seed=1), make_model(seed=2)
    source.queue_ptr.fill_(24)
    source.queue_index.copy_(torch.randperm(64))
    load_official_state_dict(target, _official_layout(source))
    _assert_same(source, target)
    again = make_model(seed=3)
    load_official_state_dict(again, {"epoch": 5, "state_dict": official_state_dict(source)})
    _assert_same(source, again)


def test_missing_momentum_encoder_and_queue_are_tolerated():
    source, target = make_model(seed=1), make_model(seed=2)
    queue_before = target.queue.clone()
    only_q = {k: v for k, v in _official_layout(source).items() if k.startswith("module.encoder_q.")}
    load_official_state_dict(target, only_q)
    for k, v in target.encoder_q.state_dict().items():
        assert torch.equal(v, source.encoder_q.state_dict()[k])
        assert torch.equal(target.encoder_k.state_dict()[k], v)  # encoder_k := copy of encoder_q
    assert torch.equal(target.queue, queue_before)


def test_mismatches_name_the_keys():
    source, target = make_model(seed=1), make_model(seed=2)
    sd = _official_layout(source)
    del sd["module.encoder_q.layer2.0.conv1.weight"]
    sd["module.encoder_q.fc.3.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        load_official_state_dict(target, sd)
    assert "encoder_q.layer2.0.conv1.weight" in str(err.value) and "encoder_q.fc.3.weight" in str(err.value)
    sd = _official_layout(source)
    sd["module.queue"] = torch.zeros(16, 32)
    with pytest.raises(ValueError, match="module.queue"):
        load_official_state_dict(target, sd)
