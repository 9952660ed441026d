"""Architecture registry: each architecture gives a builder and the shape at every ReLU site."""

from __future__ import annotations

from torch import nn

from ..spec import ModelSpec
from . import resnet, wideresnet

_ARCHS = {
    "resnet18": (resnet.ResNet, resnet.relu_site_shapes),
    "wrn22_8": (wideresnet.WideResNet, wideresnet.relu_site_shapes),
}


def build_model(spec: ModelSpec) -> nn.Module:
    return _ARCHS[spec.arch][0](spec)


def relu_site_shapes(spec: ModelSpec) -> dict[str, tuple[int, int, int]]:
    return _ARCHS[spec.arch][1](spec)
