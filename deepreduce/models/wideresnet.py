"""WideResNet-22-8 (pre-activation, Zagoruyko & Komodakis) with removable ReLUs.

Site names follow the same meaning as in ResNet18 so that `thin` means the same thing:
``r1`` is the ReLU after a block's first convolution, ``r2`` the pre-activation ReLU on the
block's input (functionally the ReLU after the previous residual add). ``s3.head`` is the final
BN-ReLU before pooling. Total at 32x32 input: 1,392,640 ReLUs (1,359,872 without the head
ReLU, the figure some papers quote).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Architecture, relu_or_identity

STEM_WIDTH = 16


def stage_widths(spec) -> list[int]:
    return [max(1, round(16 * 2**i * spec.widen * spec.alpha)) for i in range(3)]


def stem_width(spec) -> int:
    return max(1, round(STEM_WIDTH * spec.alpha))


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, keep_r1: bool, keep_r2: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu2 = relu_or_identity(keep_r2)  # pre-activation on the block input
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu1 = relu_or_identity(keep_r1)  # after the first convolution
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.project = None
        if stride != 1 or in_ch != out_ch:
            self.project = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu2(self.bn1(x))
        out = self.conv2(self.relu1(self.bn2(self.conv1(act))))
        # As in the reference WRN, a projecting shortcut reads the pre-activated input.
        return out + (x if self.project is None else self.project(act))


class WideResNet(nn.Module):
    def __init__(self, spec):
        super().__init__()
        widths = stage_widths(spec)
        in_ch = stem_width(spec)
        self.conv1 = nn.Conv2d(spec.in_channels, in_ch, 3, spec.stem_stride, 1, bias=False)
        stages = []
        for s, (width, nblocks) in enumerate(zip(widths, spec.blocks), start=1):
            blocks = []
            for b in range(1, nblocks + 1):
                stride = 2 if (s > 1 and b == 1) else 1
                blocks.append(PreActBlock(in_ch, width, stride,
                                          spec.keeps(f"s{s}.b{b}.r1"), spec.keeps(f"s{s}.b{b}.r2")))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = relu_or_identity(spec.keeps("s3.head"))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.conv1(x))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def relu_site_shapes(spec) -> dict[str, tuple[int, int, int]]:
    widths = stage_widths(spec)
    size = (spec.input_size - 1) // spec.stem_stride + 1
    in_shape = (stem_width(spec), size, size)
    shapes = {}
    for s, (width, nblocks) in enumerate(zip(widths, spec.blocks), start=1):
        for b in range(1, nblocks + 1):
            if s > 1 and b == 1:
                size = (size - 1) // 2 + 1
            shapes[f"s{s}.b{b}.r2"] = in_shape
            shapes[f"s{s}.b{b}.r1"] = in_shape = (width, size, size)
    shapes["s3.head"] = in_shape
    return shapes


def to_graph(g, model: WideResNet, spec) -> None:
    """The ops of `model` (built from `spec`); pre-activation batch-norms stay scale_shift ops."""
    # Pre-activation: bn1 reads the block input, which the identity shortcut also reads raw, so it
    # stays a scale_shift; folding it into the following conv would be wrong at the zero padding.
    x = g.conv(0, model.conv1, None, "stem.conv")
    for s, stage in enumerate(model.stages, start=1):
        for b, blk in enumerate(stage, start=1):
            p = f"s{s}.b{b}"
            act = g.relu(g.batchnorm(x, blk.bn1, f"{p}.bn1"), blk.relu2, f"{p}.r2", spec)
            h = g.relu(g.conv(act, blk.conv1, blk.bn2, f"{p}.conv1"), blk.relu1, f"{p}.r1", spec)
            h = g.conv(h, blk.conv2, None, f"{p}.conv2")
            short = x if blk.project is None else g.conv(act, blk.project, None, f"{p}.project")
            x = g.add(h, short, f"{p}.add")
    x = g.relu(g.batchnorm(x, model.bn, "head.bn"), model.relu, "s3.head", spec)
    g.linear(g.avgpool(x), model.fc)


ARCHITECTURE = Architecture(name="wrn22_8", stages=3, default_blocks=(3, 3, 3), lead_sites=(),
                            tail_sites=("s3.head",), build=WideResNet, site_shapes=relu_site_shapes,
                            to_graph=to_graph)
