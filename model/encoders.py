"""Encoder registry: torchvision ResNet trunks whose `fc` is `nn.Identity()`.

`create_encoder(name)` returns `(trunk, feat_dim)`; `trunk(x)` gives pooled features (B, feat_dim)
and the state-dict keys are torchvision's (`conv1.weight`, `layer1.0.bn1.*`, ...), so the official
HCSC checkpoints (spec 8) map onto them key for key once `fc` is set to the projection head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import ResNet

EncoderFactory = Callable[..., tuple[ResNet, int]]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator: register `factory(**kw) -> (trunk, feat_dim)` under `name`."""

    def wrap(factory: EncoderFactory) -> EncoderFactory:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered; pick another name")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_encoders() -> list[str]:
    """Names accepted by `create_encoder` (and `model.encoder` in the config), sorted."""
    return sorted(_REGISTRY)


def create_encoder(name: str, **kwargs) -> tuple[ResNet, int]:
    """Build a trunk by registry name.

    Args:
        name: a name from `list_encoders()`.
        **kwargs: passed to the torchvision constructor (e.g. ``zero_init_residual=True``).

    Returns:
        ``(trunk, feat_dim)``: a torchvision ResNet with ``fc = nn.Identity()`` and the width of its
        pooled output.
    """
    if name not in _REGISTRY:
        raise ValueError(f"model.encoder: unknown encoder {name!r}; choose one of {list_encoders()}")
    return _REGISTRY[name](**kwargs)


def _headless(net: ResNet) -> tuple[ResNet, int]:
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


@register_encoder("resnet50")
def _resnet50(**kwargs) -> tuple[ResNet, int]:
    # spec 1: torchvision resnet50, random init (no pretrained weights).
    return _headless(resnet50(weights=None, **kwargs))


@register_encoder("resnet18")
def _resnet18(**kwargs) -> tuple[ResNet, int]:
    return _headless(resnet18(weights=None, **kwargs))


@register_encoder("resnet18_small")
def _resnet18_small(**kwargs) -> tuple[ResNet, int]:
    """ResNet-18 for 32 px inputs: 3x3 stride-1 stem conv and no max-pool (the CIFAR variant).

    The 7x7/2 stem and the max-pool would shrink a 32 px image to 8 px before layer1.
    """
    net = resnet18(weights=None, **kwargs)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    net.maxpool = nn.Identity()
    return _headless(net)


def pooled_features(net: ResNet, images: torch.Tensor) -> torch.Tensor:
    """The trunk's average-pooled features, skipping `net.fc` whatever it holds (head or Identity).

    Shape: images (B, 3, H, W) -> (B, feat_dim).
    """
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)
