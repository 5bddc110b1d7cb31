"""Every registered encoder: shape, gradients, finiteness, torchvision key layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from model.encoders import create_encoder, list_encoders, pooled_features, register_encoder
from model.heads import build_head

INPUT_PX = {"resnet50": 64, "resnet18": 64, "resnet18_small": 32}  # small inputs keep it fast
FEAT_DIM = {"resnet50": 2048, "resnet18": 512, "resnet18_small": 512}


def test_registry_lists_the_paper_and_small_encoders():
    assert {"resnet50", "resnet18", "resnet18_small"} <= set(list_encoders())
    with pytest.raises(ValueError, match="model.encoder"):
        create_encoder("resnet7")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("resnet18")(lambda: None)
    with pytest.raises(ValueError, match="core.config.ENCODERS"):
        register_encoder("resnet7")(lambda: None)


def test_the_config_schema_knows_exactly_the_registered_encoders():
    from core.config import ENCODERS, ConfigError, load_config

    assert sorted(ENCODERS) == list_encoders()
    with pytest.raises(ConfigError, match="model.encoder: unknown encoder 'resnet7'"):
        load_config(None, ["model.encoder=resnet7"])


@pytest.mark.parametrize("name", list_encoders())
def test_encoder_contract(name):
    torch.manual_seed(0)
    trunk, feat_dim = create_encoder(name)
    assert isinstance(trunk.fc, nn.Identity)
    assert feat_dim == FEAT_DIM.get(name, feat_dim)
    px = INPUT_PX.get(name, 32)
    x = torch.randn(2, 3, px, px)
    out = trunk(x)
    assert out.shape == (2, feat_dim) and torch.isfinite(out).all()
    torch.testing.assert_close(pooled_features(trunk, x), out)
    out.square().mean().backward()
    for pname, p in trunk.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert "conv1.weight" in trunk.state_dict() and "layer1.0.bn1.running_mean" in trunk.state_dict()


def test_small_stem_is_torchvision_resnet18_with_a_3x3_stride1_stem_and_no_maxpool():
    trunk, _ = create_encoder("resnet18_small")
    assert trunk.conv1.kernel_size == (3, 3) and trunk.conv1.stride == (1, 1)
    assert isinstance(trunk.maxpool, nn.Identity)
    ref = {k: v.shape for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    ref["conv1.weight"] = torch.Size([64, 3, 3, 3])
    assert {k: v.shape for k, v in trunk.state_dict().items()} == ref
    feats = trunk.layer1(trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(torch.randn(1, 3, 32, 32))))))
    assert feats.shape[-1] == 32  # full resolution into layer1 (the 7x7/2 stem + pool would give 8)


def test_head_layout_and_shapes():
    head = build_head(2048, 128, mlp=True)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"0.weight": (2048, 2048), "0.bias": (2048,), "2.weight": (128, 2048), "2.bias": (128,)}
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    x = torch.randn(3, 2048)
    torch.testing.assert_close(head(x), head[2](torch.relu(head[0](x))))
    single = build_head(512, 16, mlp=False)
    assert isinstance(single, nn.Linear) and single(torch.randn(2, 512)).shape == (2, 16)
    with pytest.raises(ValueError):
        build_head(0, 16)
