"""ReLU accounting: the analytic count from a spec, and the count measured on a real forward pass.

The two are computed independently (shapes from geometry vs. hooks on the nn.ReLU modules of a
built model) so that each checks the other.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .models import architecture, build_model, relu_site_shapes
from .spec import ModelSpec


def relu_sites(spec: ModelSpec) -> "OrderedDict[str, int]":
    """ReLU elements per *kept* site, in network order (per image)."""
    shapes = relu_site_shapes(spec)
    out = OrderedDict()
    for site in spec.site_names():
        if spec.keeps(site):
            c, h, w = shapes[site]
            out[site] = c * h * w
    return out


def relu_count(spec: ModelSpec) -> int:
    """Total ReLUs one image costs under `spec` (analytic)."""
    return sum(relu_sites(spec).values())


def relu_count_by_stage(spec: ModelSpec) -> "OrderedDict[str, int]":
    """ReLUs per stage: ``stem`` (ResNet18 only), then ``S1``..``Sn``."""
    table = OrderedDict()
    if architecture(spec.arch).lead_sites:
        table["stem"] = 0
    for stage in range(1, spec.num_stages + 1):
        table[f"S{stage}"] = 0
    for site, n in relu_sites(spec).items():
        stage = ModelSpec.site_stage(site)
        table["stem" if stage == 0 else f"S{stage}"] += n
    return table


def measure_relu_count(model: nn.Module, spec: ModelSpec) -> int:
    """Count ReLU elements seen by forward hooks on one real forward pass (per image)."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[0].numel()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen)


def measured_relu_count(spec: ModelSpec) -> int:
    return measure_relu_count(build_model(spec), spec)
