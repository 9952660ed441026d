"""Export a trained checkpoint to a secure plan: batch-norm folded, removed ReLUs gone."""

from __future__ import annotations

import math

import torch
from torch import nn

from deepreduce.checkpoint import Checkpoint, load_checkpoint
from deepreduce.relus import relu_count as spec_relu_count
from deepreduce.spec import ModelSpec
from secure.core.plan import SecurePlan, is_plan_file


def load_plan_or_checkpoint(path: str) -> SecurePlan:
    """A plan file as is, or a checkpoint exported on the fly."""
    return SecurePlan.load(path) if is_plan_file(path) else export_plan(path)


def export_plan(checkpoint_path: str) -> SecurePlan:
    return plan_from_checkpoint(load_checkpoint(checkpoint_path))


def plan_from_checkpoint(ckpt: Checkpoint) -> SecurePlan:
    spec, model = ckpt.spec, ckpt.build()
    g = _GraphBuilder((spec.in_channels, spec.input_size, spec.input_size))
    with torch.no_grad():
        (_resnet_graph if spec.arch == "resnet18" else _wrn_graph)(g, model, spec)
    total = sum(op["relu_count"] for op in g.ops if op["op"] == "relu")
    expected = spec_relu_count(spec)
    if total != expected:  # the graph and the analytic count are computed independently
        raise RuntimeError(f"exported plan has {total} ReLUs but the spec counts {expected}")
    return SecurePlan(ops=g.ops, tensors=g.tensors, input_shape=g.ops[0]["shape"], classes=list(ckpt.classes),
                      mean=list(ckpt.mean), std=list(ckpt.std), spec=spec.to_dict(), relu_count=total)


class _GraphBuilder:
    """Appends ops and their (folded) float32 tensors; each method returns the new op's id."""

    def __init__(self, input_shape: tuple[int, int, int]):
        self.ops: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self._add("input", [], "input", list(input_shape))

    def shape(self, x: int) -> list[int]:
        return self.ops[x]["shape"]

    def _add(self, kind: str, inputs: list[int], name: str, shape: list[int], **fields) -> int:
        self.ops.append({"id": len(self.ops), "op": kind, "name": name, "inputs": inputs,
                         "shape": shape, **fields})
        return len(self.ops) - 1

    def _tensor(self, key: str, value: torch.Tensor | None) -> str | None:
        if value is None:
            return None
        name = f"t{len(self.ops)}.{key}"
        self.tensors[name] = value.detach().to(torch.float32).contiguous()
        return name

    def conv(self, x: int, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, name: str) -> int:
        """conv, with the batch-norm that directly follows it folded into weight and bias."""
        assert conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
        weight = conv.weight.double()
        bias = None if conv.bias is None else conv.bias.double()
        if bn is not None:
            scale, shift = _bn_affine(bn)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = shift if bias is None else bias * scale + shift
        c, h, w = self.shape(x)
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        out = [conv.out_channels, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1]
        return self._add("conv", [x], name, out, weight=self._tensor("w", weight), bias=self._tensor("b", bias),
                         stride=[sh, sw], padding=[ph, pw])

    def batchnorm(self, x: int, bn: nn.BatchNorm2d, name: str) -> int:
        """A batch-norm on a value that is also used raw (pre-activation): a per-channel affine op."""
        scale, shift = _bn_affine(bn)
        return self._add("scale_shift", [x], name, self.shape(x),
                         scale=self._tensor("s", scale), shift=self._tensor("t", shift))

    def relu(self, x: int, module: nn.Module, site: str, spec: ModelSpec) -> int:
        """A kept ReLU becomes an op; a removed one (nn.Identity) is no op at all."""
        kept = isinstance(module, nn.ReLU)
        if kept != spec.keeps(site) or not isinstance(module, (nn.ReLU, nn.Identity)):
            raise RuntimeError(f"ReLU site {site} is {type(module).__name__} but the spec "
                               f"{'keeps' if spec.keeps(site) else 'removes'} it")
        if not kept:
            return x
        return self._add("relu", [x], site, self.shape(x), site=site, relu_count=math.prod(self.shape(x)))

    def add(self, a: int, b: int, name: str) -> int:
        assert self.shape(a) == self.shape(b), (self.shape(a), self.shape(b))
        return self._add("add", [a, b], name, self.shape(a))

    def avgpool(self, x: int) -> int:
        return self._add("avgpool", [x], "pool", [self.shape(x)[0]])

    def linear(self, x: int, fc: nn.Linear) -> int:
        return self._add("linear", [x], "fc", [fc.out_features],
                         weight=self._tensor("w", fc.weight), bias=self._tensor("b", fc.bias))


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch-norm as y = x * scale + shift (float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def _resnet_graph(g: _GraphBuilder, model: nn.Module, spec: ModelSpec) -> None:
    x = g.relu(g.conv(0, model.conv1, model.bn1, "stem.conv"), model.relu, "stem", spec)
    for s, stage in enumerate(model.stages, start=1):
        for b, blk in enumerate(stage, start=1):
            p = f"s{s}.b{b}"
            h = g.relu(g.conv(x, blk.conv1, blk.bn1, f"{p}.conv1"), blk.relu1, f"{p}.r1", spec)
            h = g.conv(h, blk.conv2, blk.bn2, f"{p}.conv2")
            short = g.conv(x, blk.shortcut[0], blk.shortcut[1], f"{p}.shortcut") if len(blk.shortcut) else x
            x = g.relu(g.add(h, short, f"{p}.add"), blk.relu2, f"{p}.r2", spec)
    g.linear(g.avgpool(x), model.fc)


def _wrn_graph(g: _GraphBuilder, model: nn.Module, spec: ModelSpec) -> None:
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
