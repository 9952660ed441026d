"""Checkpoint files: one self-contained file per trained model, loadable with weights_only=True.

Layout of ``final.pt`` (plain dicts, lists, numbers, strings and tensors only)::

    {"format_version": 1, "kind": "deepreduce-checkpoint",
     "spec": ModelSpec.to_dict(), "state_dict": {...},
     "normalization": {"mean": [..], "std": [..]},   # per input channel, on [0, 1] pixels
     "classes": ["airplane", ...], "metrics": {...}}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UserError
from .fileio import atomic_torch_save
from .models import build_model
from .spec import ModelSpec

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KIND = "deepreduce-checkpoint"


@dataclass
class Checkpoint:
    spec: ModelSpec
    state_dict: dict
    mean: list[float]
    std: list[float]
    classes: list[str]
    metrics: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The model in eval mode with the checkpoint's weights."""
        model = build_model(self.spec)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or [0,1] float NCHW pixels -> normalised model input."""
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"format_version": CHECKPOINT_FORMAT_VERSION, "kind": CHECKPOINT_KIND,
                "spec": self.spec.to_dict(),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
                "normalization": {"mean": list(map(float, self.mean)), "std": list(map(float, self.std))},
                "classes": list(self.classes), "metrics": dict(self.metrics)}

    def save(self, path: str) -> None:
        atomic_torch_save(self.to_dict(), path)


def load_checkpoint(path: str) -> Checkpoint:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: pass the final.pt written by `deepreduce train`")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, or disallowed pickle content
        raise UserError(f"{path} is not a readable deepreduce checkpoint ({type(exc).__name__}): "
                        "pass the final.pt written by `deepreduce train`") from None
    if not isinstance(raw, dict) or raw.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{path} is not a deepreduce checkpoint: pass the final.pt written by `deepreduce train`")
    if raw.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {raw.get('format_version')}, "
                        f"this version reads {CHECKPOINT_FORMAT_VERSION}")
    norm = raw["normalization"]
    return Checkpoint(spec=ModelSpec.from_dict(raw["spec"]), state_dict=raw["state_dict"],
                      mean=norm["mean"], std=norm["std"], classes=raw["classes"],
                      metrics=raw.get("metrics", {}))


# -- random-weight models for tests and latency benchmarks (latency does not depend on the weight values)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


def random_checkpoint(spec: ModelSpec, seed: int = 0, classes: list[str] | None = None,
                      mean: list[float] | None = None, std: list[float] | None = None) -> Checkpoint:
    """A checkpoint with random weights and random batch-norm statistics and affine parameters
    (default ones would make batch-norm folding bugs invisible)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen))
    if classes is None:
        classes = CIFAR10_CLASSES if spec.num_classes == 10 else [f"class{i}" for i in range(spec.num_classes)]
    channels = spec.in_channels
    return Checkpoint(spec=spec, state_dict=model.state_dict(),
                      mean=mean or (CIFAR10_MEAN if channels == 3 else [0.5])[:channels],
                      std=std or (CIFAR10_STD if channels == 3 else [0.25])[:channels],
                      classes=list(classes))
