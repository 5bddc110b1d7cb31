"""Encoder registry: torchvision ResNet trunks whose `fc` is `nn.Identity()`.

`create_encoder(name)` returns `(trunk, feat_dim)`; `trunk(x)` gives pooled features (B, feat_dim)
and the state-dict keys are torchvision's (`conv1.weight`, `layer1.0.bn1.*`, ...), so the official
HCSC checkpoints (method.md §8) map onto them key for key once `fc` is set to the projection head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, ResNet, conv1x1

from core.config import ENCODERS

EncoderFactory = Callable[..., tuple[ResNet, int]]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator: register `factory(**kw) -> (trunk, feat_dim)` under `name`."""

    def wrap(factory: EncoderFactory) -> EncoderFactory:
        if name not in ENCODERS:  # the config schema validates `model.encoder` against that list
            raise ValueError(f"encoder {name!r}: add it to core.config.ENCODERS too")
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
    # method.md §1: torchvision resnet50, random init (no pretrained weights).
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


def _narrow_small_resnet18(width: int) -> tuple[ResNet, int]:
    """Small-stem ResNet-18 with `width` channels after the stem (64 in the standard net), doubling
    per stage. torchvision's ResNet hard-codes 64/128/256/512 for basic blocks, so the stages are
    rebuilt here from its `BasicBlock`; attribute names (and state-dict keys) stay torchvision's.
    For CPU demos: width 32 costs about a quarter of the FLOPs of `resnet18_small`.
    """
    net, _ = _resnet18_small()
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    inplanes = width
    for stage in range(4):
        planes, stride = width * 2**stage, 1 if stage == 0 else 2
        down = None
        if stride != 1 or inplanes != planes:
            down = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        blocks = [BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)]
        setattr(net, f"layer{stage + 1}", nn.Sequential(*blocks))
        inplanes = planes
    for m in net.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net, inplanes


@register_encoder("resnet18_small_w32")
def _resnet18_small_w32() -> tuple[ResNet, int]:
    return _narrow_small_resnet18(32)


@register_encoder("resnet18_small_w16")
def _resnet18_small_w16() -> tuple[ResNet, int]:
    return _narrow_small_resnet18(16)


def pooled_features(net: ResNet, images: torch.Tensor) -> torch.Tensor:
    """The trunk's average-pooled features, skipping `net.fc` whatever it holds (head or Identity).

    Shape: images (B, 3, H, W) -> (B, feat_dim).
    """
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)
