"""What every architecture module provides (`ARCHITECTURE`), and the removable-ReLU building block.

An architecture module (`resnet.py`, `wideresnet.py`) holds all it knows in one place: the facts a
`ModelSpec` checks (stages, default depth, ReLU sites outside the blocks), the builder, the shape at
every ReLU site and the export to graph ops (`deepreduce.graph.GraphBuilder`). Adding an architecture
is one new module plus its line in `deepreduce.models.ARCHITECTURES`.

Architecture modules do not import `deepreduce.spec`: the spec looks architectures up here, so that
import would close a cycle; `spec` arguments are `deepreduce.spec.ModelSpec` instances.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    name: str
    stages: int
    default_blocks: tuple[int, ...]
    lead_sites: tuple[str, ...]  # ReLU sites before the first stage, in network order (stage 0)
    tail_sites: tuple[str, ...]  # ReLU sites after the blocks (they belong to the last stage)
    build: Callable  # spec -> nn.Module
    site_shapes: Callable  # spec -> {site: (channels, height, width)} for every site, kept or not
    to_graph: Callable  # (GraphBuilder, model, spec) -> None: appends the model's ops


def relu_or_identity(keep: bool) -> nn.Module:
    """A kept ReLU is nn.ReLU, a removed one nn.Identity (no operation at all), so the ReLU modules
    present in a network are exactly the ReLUs a secure runtime must evaluate."""
    return nn.ReLU() if keep else nn.Identity()
