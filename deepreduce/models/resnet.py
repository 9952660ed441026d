"""CIFAR-style ResNet18 (3x3 stem, no max-pool) whose ReLUs can be removed site by site: its spec
facts, builder, ReLU site shapes and graph export (`ARCHITECTURE`, see `deepreduce.models.base`)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Architecture, relu_or_identity

STAGE_WIDTHS = (64, 128, 256, 512)


def stage_widths(spec) -> list[int]:
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
    def __init__(self, spec):
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


def relu_site_shapes(spec) -> dict[str, tuple[int, int, int]]:
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


def to_graph(g, model: ResNet, spec) -> None:
    """The ops of `model` (built from `spec`), batch-norms folded into their convolutions."""
    x = g.relu(g.conv(0, model.conv1, model.bn1, "stem.conv"), model.relu, "stem", spec)
    for s, stage in enumerate(model.stages, start=1):
        for b, blk in enumerate(stage, start=1):
            p = f"s{s}.b{b}"
            h = g.relu(g.conv(x, blk.conv1, blk.bn1, f"{p}.conv1"), blk.relu1, f"{p}.r1", spec)
            h = g.conv(h, blk.conv2, blk.bn2, f"{p}.conv2")
            short = g.conv(x, blk.shortcut[0], blk.shortcut[1], f"{p}.shortcut") if len(blk.shortcut) else x
            x = g.relu(g.add(h, short, f"{p}.add"), blk.relu2, f"{p}.r2", spec)
    g.linear(g.avgpool(x), model.fc)


ARCHITECTURE = Architecture(name="resnet18", stages=4, default_blocks=(2, 2, 2, 2), lead_sites=("stem",),
                            tail_sites=(), build=ResNet, site_shapes=relu_site_shapes, to_graph=to_graph)
