"""The op graph: a trained network flattened into the few ops that private inference executes.

Batch-norm is folded away, removed ReLUs are gone, every weight is a float32 tensor named by the op
that uses it. Each architecture writes its graph with a `GraphBuilder` (`deepreduce.models`); the
secure layer packs ops and tensors into a plan file. Ops (``id`` = position; ``inputs`` = ids of
earlier ops; ``shape`` = per-image output shape)::

    input        the normalised image, N x C x H x W
    conv         conv2d(x, weight, stride, padding) [+ bias]   (batch-norm folded into it)
    scale_shift  x * scale[c] + shift[c]   (a batch-norm that no convolution can absorb)
    relu         a kept ReLU site, with its ``site`` name and ``relu_count`` per image
    add          residual sum of two inputs
    avgpool      global average pool, N x C x H x W -> N x C
    linear       x @ weight.T + bias

The last op's output is the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# The fields each kind carries besides id, kind, name, inputs and shape: exactly what its JSON holds.
KIND_FIELDS = {
    "input": (),
    "conv": ("weight", "bias", "stride", "padding"),
    "scale_shift": ("scale", "shift"),
    "relu": ("site", "relu_count"),
    "add": (),
    "avgpool": (),
    "linear": ("weight", "bias"),
}
OP_KINDS = tuple(KIND_FIELDS)
TENSOR_FIELDS = ("weight", "bias", "scale", "shift")


@dataclass
class Op:
    id: int
    kind: str  # one of OP_KINDS; "op" in the JSON
    name: str
    inputs: list[int]
    shape: list[int]
    weight: str | None = None  # tensor names
    bias: str | None = None
    scale: str | None = None
    shift: str | None = None
    stride: list[int] | None = None
    padding: list[int] | None = None
    site: str | None = None
    relu_count: int = 0  # ReLUs per image (relu ops)

    def to_dict(self) -> dict:
        return {"id": self.id, "op": self.kind, "name": self.name, "inputs": list(self.inputs),
                "shape": list(self.shape), **{key: getattr(self, key) for key in KIND_FIELDS[self.kind]}}

    @classmethod
    def from_dict(cls, d: dict) -> "Op":
        """Raises KeyError, TypeError or ValueError on a malformed op."""
        kind = d["op"]
        if kind not in KIND_FIELDS:
            raise ValueError(f"unknown op kind {kind!r}")
        fields = {key: d[key] for key in KIND_FIELDS[kind]}
        for key in ("stride", "padding"):
            if key in fields:
                fields[key] = [int(v) for v in fields[key]]
        if "relu_count" in fields:
            fields["relu_count"] = int(fields["relu_count"])
        return cls(id=int(d["id"]), kind=kind, name=str(d["name"]), inputs=[int(i) for i in d["inputs"]],
                   shape=[int(s) for s in d["shape"]], **fields)

    def tensor_names(self) -> list[str]:
        return [getattr(self, key) for key in TENSOR_FIELDS if getattr(self, key) is not None]


def consumers(ops: list[Op]) -> dict[int, list[int]]:
    """op id -> ids of the ops that read its output."""
    out = {op.id: [] for op in ops}
    for op in ops:
        for j in op.inputs:
            out[j].append(op.id)
    return out


def walk(ops: list[Op], x, apply):
    """Evaluate the graph: apply(op, input_values) -> value; frees values after their last use."""
    last_use = {j: op.id for op in ops for j in op.inputs}
    values = {0: x}
    for op in ops[1:]:
        values[op.id] = apply(op, [values[j] for j in op.inputs])
        for j in op.inputs:
            if last_use[j] == op.id:
                del values[j]
    return values[ops[-1].id]


class GraphBuilder:
    """Appends ops and their (folded) float32 tensors; each method returns the new op's id."""

    def __init__(self, input_shape: tuple[int, int, int]):
        self.ops: list[Op] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self._add("input", [], "input", list(input_shape))

    def shape(self, x: int) -> list[int]:
        return self.ops[x].shape

    def _add(self, kind: str, inputs: list[int], name: str, shape: list[int], **fields) -> int:
        self.ops.append(Op(len(self.ops), kind, name, inputs, shape, **fields))
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

    def relu(self, x: int, module: nn.Module, site: str, spec) -> int:
        """A kept ReLU becomes an op; a removed one (nn.Identity) is no op at all. `spec`: the ModelSpec."""
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
