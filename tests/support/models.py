"""Networks made elsewhere, as a user would bring them to `deepreduce export --module` (issue #22):
torchvision-style ResNet-18 and ResNet-50 (bottleneck), a VGG-style network with max pooling, a
MobileNet-style network with depthwise (and one dilated) convolution, a network with concatenation, and
ResNet-18 with SNL-style per-channel and per-pixel ReLU masks in both forms (``relu(x) * m + x * (1 - m)``
and `deepreduce.MaskedReLU`). Small widths so that they run fast on a CPU; `randomize_bn` gives every
batch-norm random statistics so that folding bugs show."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepreduce.masks import MaskedReLU


def randomize_bn(model: nn.Module, seed: int = 0, shape=(3, 32, 32)) -> nn.Module:
    """Random affine parameters and running statistics in every batch-norm, the model in eval mode.

    Statistics drawn from nothing (as deepreduce.checkpoint.random_checkpoint does for its shallow
    ResNets) would let a deep random network forget its input, and logits that do not depend on the image
    test nothing. So the statistics are measured first, in train mode on random images of `shape`, and
    then perturbed (mean moved by up to a fifth of the deviation, variance scaled by 0.5 to 1.5): still
    far from the identity, so that folding bugs show."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    with torch.no_grad():
        for m in norms:
            n = m.num_features
            if m.affine:
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen))
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass below
        model.train()
        model(torch.randn(32, *shape, generator=gen))
        for m in norms:
            n = m.num_features
            m.momentum = 0.1
            m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn(n, generator=gen))
            m.running_var.mul_(0.5 + torch.rand(n, generator=gen))
    return model.eval()


# -- torchvision-style ResNets ---------------------------------------------------------------------

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def plain_relu(channels, height, width, site):
    return nn.ReLU(inplace=True)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, size, act, site):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        out = size // stride
        if act is plain_relu:
            self.relu = nn.ReLU(inplace=True)  # torchvision reuses one ReLU module for both sites
            self.relu1 = self.relu2 = self.relu
        else:
            self.relu1 = act(planes, out, out, f"{site}.relu1")
            self.relu2 = act(planes, out, out, f"{site}.relu2")
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(conv1x1(cin, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu2(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, size, act, site):
        super().__init__()
        width, out_c = planes, planes * 4
        self.conv1, self.bn1 = conv1x1(cin, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv1x1(width, out_c), nn.BatchNorm2d(out_c)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out_c:
            self.downsample = nn.Sequential(conv1x1(cin, out_c, stride), nn.BatchNorm2d(out_c))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet at width `width` (64 in torchvision): 7x7/2 stem, 3x3/2 max
    pooling, four stages, adaptive average pooling, flatten, fc. `act(C, H, W, site)` makes the ReLUs of
    the stem and the basic blocks (ReLU masks); `size` is the input's height and width."""

    def __init__(self, block, layers, width=16, num_classes=10, size=32, act=plain_relu):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        size = size // 2
        self.relu = act(width, size, size, "stem")
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        size = size // 2
        cin, stages = width, []
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            mods = []
            for b in range(blocks):
                mods.append(block(cin, planes, stride if b == 0 else 1, size, act, f"layer{i + 1}.{b}"))
                cin, size = planes * block.expansion, size // (stride if b == 0 else 1)
            stages.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(width=16, act=plain_relu, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(ResNet(BasicBlock, [2, 2, 2, 2], width, act=act), seed)


def resnet50(width=8, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(ResNet(Bottleneck, [3, 4, 6, 3], width), seed)


# -- SNL-style masks ---------------------------------------------------------------------------------

class SNLReLU(nn.Module):
    """What SNL-style code writes: relu(x) * m + x * (1 - m) with a trained, binarised m."""

    def __init__(self, mask: torch.Tensor, as_parameter: bool):
        super().__init__()
        if as_parameter:
            self.mask = nn.Parameter(mask.clone(), requires_grad=False)
        else:
            self.register_buffer("mask", mask.clone())

    def forward(self, x):
        return F.relu(x) * self.mask + x * (1 - self.mask)


def snl_mask(channels, height, width, site) -> torch.Tensor:
    """The hand-countable masks of the masked ResNet-18 tests: the stem fully linear (all zeros); layer1
    and layer3 per channel, the first quarter of the channels kept, shape (C, 1, 1); layer2 and layer4 per
    pixel, the top half of the rows kept (all rows of a 1-row map), shape (1, C, H, W)."""
    if site == "stem":
        return torch.zeros(channels, 1, 1)
    if site.startswith(("layer1", "layer3")):
        mask = torch.zeros(channels, 1, 1)
        mask[: channels // 4] = 1
        return mask
    mask = torch.zeros(1, channels, height, width)
    mask[:, :, : max(1, height // 2)] = 1
    return mask


def snl_act(channels, height, width, site):
    mask = snl_mask(channels, height, width, site)
    return SNLReLU(mask, as_parameter=mask.dim() == 4)


def masked_act(channels, height, width, site):
    mask = snl_mask(channels, height, width, site)
    return MaskedReLU(mask.view(channels) if mask.dim() == 3 else mask[0])


# -- VGG, MobileNet, concatenation ----------------------------------------------------------------------

class VGG(nn.Module):
    """CIFAR VGG: conv3x3-BN-ReLU stages with 2x2 max pooling, then Linear-BN1d-ReLU-Dropout-Linear."""

    def __init__(self, width=16, num_classes=10):
        super().__init__()
        cfg = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width, "M",
               8 * width, 8 * width, "M"]
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin, cin), nn.BatchNorm1d(cin), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(cin, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


def vgg(width=16, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(VGG(width), seed)


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout, stride, dilation=1):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=dilation, dilation=dilation, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.bn1(self.dw(x)), inplace=True)
        return self.bn2(self.pw(x)).clamp(min=0)


class MobileNet(nn.Module):
    """MobileNet-v1 style: a 3x3 stem, depthwise-separable blocks (one dilated), x.mean((2, 3)), dropout."""

    CONFIG = [(2, 1, 1), (4, 2, 1), (4, 1, 2), (8, 2, 1), (8, 1, 1)]  # (width multiple, stride, dilation)

    def __init__(self, width=8, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for mult, stride, dilation in self.CONFIG:
            blocks.append(DepthwiseSeparable(cin, mult * width, stride, dilation))
            cin = mult * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x)).mean((2, 3))
        return self.fc(F.dropout(x, 0.2, self.training))


def mobilenet(width=8, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(MobileNet(width), seed)


class ConcatNet(nn.Module):
    """Concatenation along channels: a DenseNet-style block (each layer's output appended), a transition
    (pre-activation batch-norm that no convolution precedes, 1x1 conv, 2x2 average pooling), an
    Inception-style module (1x1, 3x3 'same', 3x3 average pooling, 3x3 max pooling branches), scalar
    constants, adaptive pooling, view, fc."""

    def __init__(self, width=16, growth=8, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.dense = nn.ModuleList()
        c = width
        for _ in range(3):
            self.dense.append(nn.Sequential(nn.Conv2d(c, growth, 3, padding=1, bias=False), nn.BatchNorm2d(growth),
                                            nn.ReLU()))
            c += growth
        self.trans_bn, self.trans_conv = nn.BatchNorm2d(c), nn.Conv2d(c, width, 1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.b1 = nn.Conv2d(width, 8, 1)
        self.b3 = nn.Conv2d(width, 8, 3, padding="same")
        self.bpool = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(width, 8, 1))
        self.bmax = nn.MaxPool2d(3, stride=1, padding=1)
        self.fc = nn.Linear(8 * 3 + width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.dense:
            x = torch.cat([x, layer(x)], 1)
        x = self.pool(self.trans_conv(F.relu(self.trans_bn(x))))
        x = torch.cat((self.b1(x), self.b3(x), self.bpool(x), self.bmax(x)), dim=1)
        x = F.relu(x * 0.5 + 0.25) - 0.1
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def concatnet(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(ConcatNet(), seed)


# -- what export refuses ------------------------------------------------------------------------------

class Attention(nn.Module):
    """A softmax attention block over the pixels."""

    def __init__(self, c):
        super().__init__()
        self.q, self.k = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k = self.q(x).flatten(2), self.k(x).flatten(2)
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)
        return x + torch.bmm(x.flatten(2), attn).view(n, c, h, w)


class Gate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def resnet18_with(block_name: str, module: nn.Module) -> nn.Module:
    """ResNet-18 (width 8) with `module` appended after layer3's second block: layer3.1.<block_name>."""
    model = resnet18(width=8)
    model.layer3[1] = _Then(model.layer3[1], block_name, module)
    return model


class _Then(nn.Module):
    def __init__(self, first, name, then):
        super().__init__()
        self.first = first
        self.add_module(name, then)
        self.name = name

    def forward(self, x):
        return getattr(self, self.name)(self.first(x))


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.rnn = nn.LSTM(64, 10, batch_first=True)  # a sequence of 8 channels, 8 x 8 values each

    def forward(self, x):
        out, _ = self.rnn(self.conv(x).flatten(2))
        return out[:, -1]
