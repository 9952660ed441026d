"""The architecture registry: one module per architecture, each with its `ARCHITECTURE` record (spec
facts, builder, ReLU site shapes, graph export; see `deepreduce.models.base`)."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from . import resnet, wideresnet
from .base import Architecture

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (resnet.ARCHITECTURE, wideresnet.ARCHITECTURE)}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise UserError(f"unknown arch {name!r}: choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_model(spec) -> nn.Module:
    """The network of `spec` (a deepreduce.spec.ModelSpec)."""
    return architecture(spec.arch).build(spec)


def relu_site_shapes(spec) -> dict[str, tuple[int, int, int]]:
    return architecture(spec.arch).site_shapes(spec)


def export_graph(model: nn.Module, spec):
    """(ops, tensors) of `model` built from `spec`: the graph a secure plan is made of."""
    import torch

    from ..graph import GraphBuilder
    g = GraphBuilder((spec.in_channels, spec.input_size, spec.input_size))
    with torch.no_grad():
        architecture(spec.arch).to_graph(g, model, spec)
    return g.ops, g.tensors
