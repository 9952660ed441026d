"""CIFAR-style ResNet18 (3x3 stem, no max-pool) whose ReLUs can be removed site by site.

A removed ReLU is `nn.Identity`, i.e. no operation at all; a kept one is `nn.ReLU`, so the ReLU
modules present in the network are exactly the ReLUs that a secure runtime must evaluate.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import ModelSpec

STAGE_WIDTHS = (64, 128, 256, 512)


def relu_or_identity(keep: bool) -> nn.Module:
    return nn.ReLU() if keep else nn.Identity()


def stage_widths(spec: ModelSpec) -> list[int]:
    return [max(1, round(w * spec.alpha)) for w in STAGE_WIDTHS]


class BasicBlock(nn.Module):
    """conv-bn-relu1-conv-bn, + shortcut, relu2 (r1 and r2 are the block's two ReLU sites)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, keep_r1: bool, keep_r2: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = relu_or_identity(keep_r1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.relu2 = relu_or_identity(keep_r2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        widths = stage_widths(spec)
        self.conv1 = nn.Conv2d(spec.in_channels, widths[0], 3, spec.stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = relu_or_identity(spec.keeps("stem"))
        stages, in_ch = [], widths[0]
        for s, (width, nblocks) in enumerate(zip(widths, spec.blocks), start=1):
            blocks = []
            for b in range(1, nblocks + 1):
                stride = 2 if (s > 1 and b == 1) else 1
                blocks.append(BasicBlock(in_ch, width, stride,
                                         spec.keeps(f"s{s}.b{b}.r1"), spec.keeps(f"s{s}.b{b}.r2")))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def relu_site_shapes(spec: ModelSpec) -> dict[str, tuple[int, int, int]]:
    """(channels, height, width) of the activation at every ReLU site, kept or not."""
    widths = stage_widths(spec)
    size = (spec.input_size - 1) // spec.stem_stride + 1
    shapes = {"stem": (widths[0], size, size)}
    for s, (width, nblocks) in enumerate(zip(widths, spec.blocks), start=1):
        if s > 1:
            size = (size - 1) // 2 + 1
        for b in range(1, nblocks + 1):
            shapes[f"s{s}.b{b}.r1"] = shapes[f"s{s}.b{b}.r2"] = (width, size, size)
    return shapes
