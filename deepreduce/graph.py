"""The op graph: a trained network flattened into the few ops that private inference executes.

Batch-norm is folded away, removed ReLUs are gone, every weight is a float32 tensor named by the op
that uses it. Each architecture writes its graph with a `GraphBuilder` (`deepreduce.models`), and
`deepreduce.trace` writes the graph of any PyTorch module; the secure layer packs ops and tensors into
a plan file. Ops (``id`` = position; ``inputs`` = ids of
earlier ops; ``shape`` = per-image output shape)::

    input        the normalised image, N x C x H x W
    conv         conv2d(x, weight, stride, padding) [+ bias]   (batch-norm folded into it); optional
                 ``dilation`` [dh, dw] and ``groups`` (depthwise: groups == channels), present only when
                 not 1
    scale_shift  x * scale[c] + shift[c]   (a batch-norm that no convolution can absorb; c is the
                 channel of a C x H x W value or the feature of a flat one)
    relu         a kept ReLU site, with its ``site`` name and ``relu_count`` per image; optional
                 ``mask``: a 0/1 tensor (C x 1 x 1 or the full per-image shape) where 1 keeps the ReLU and
                 0 passes x through unchanged; ``relu_count`` counts the kept positions only
    add          residual sum of two inputs
    avgpool      global average pool, N x C x H x W -> N x C
    linear       x @ weight.T + bias

Ops of networks traced from any PyTorch module (`deepreduce.trace`) may also be::

    avgpool2d    avg_pool2d(x, kernel, stride, padding), zero padding counted in the divisor
    maxpool      max_pool2d(x, kernel, stride, padding), padding never wins; ``comparison_count``
                 per image = output elements x (kernel elements - 1)
    reshape      the same values in C order under another per-image ``shape`` (flatten, view)
    concat       the inputs side by side along the channel axis (per-image axis 0)
    scale        x * factor + offset with constant floats ``factor`` and ``offset``

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
    "avgpool2d": ("kernel", "stride", "padding"),
    "maxpool": ("kernel", "stride", "padding", "comparison_count"),
    "reshape": (),
    "concat": (),
    "scale": ("factor", "offset"),
}
# Fields a kind may carry besides those: in its JSON only when set (not None), so that the ops of
# networks without them, and the content hash of every plan written before they existed, are unchanged.
OPTIONAL_FIELDS = {
    "conv": ("dilation", "groups"),
    "relu": ("mask",),
}
OP_KINDS = tuple(KIND_FIELDS)
TENSOR_FIELDS = ("weight", "bias", "scale", "shift", "mask")
_INT_LIST_FIELDS = ("stride", "padding", "dilation", "kernel")
_INT_FIELDS = ("relu_count", "comparison_count", "groups")
_FLOAT_FIELDS = ("factor", "offset")


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
    relu_count: int = 0  # ReLUs per image (relu ops): kept positions only
    dilation: list[int] | None = None  # conv, when not [1, 1]
    groups: int | None = None  # conv, when not 1
    mask: str | None = None  # relu: tensor name of the 0/1 keep mask, when some positions are linear
    kernel: list[int] | None = None  # avgpool2d, maxpool
    comparison_count: int = 0  # maxpool: comparisons per image
    factor: float | None = None  # scale
    offset: float | None = None  # scale

    def to_dict(self) -> dict:
        optional = {key: getattr(self, key) for key in OPTIONAL_FIELDS.get(self.kind, ())
                    if getattr(self, key) is not None}
        return {"id": self.id, "op": self.kind, "name": self.name, "inputs": list(self.inputs),
                "shape": list(self.shape), **{key: getattr(self, key) for key in KIND_FIELDS[self.kind]},
                **optional}

    @classmethod
    def from_dict(cls, d: dict) -> "Op":
        """Raises KeyError, TypeError or ValueError on a malformed op."""
        kind = d["op"]
        if kind not in KIND_FIELDS:
            raise ValueError(f"unknown op kind {kind!r}")
        fields = {key: d[key] for key in KIND_FIELDS[kind]}
        fields.update({key: d[key] for key in OPTIONAL_FIELDS.get(kind, ()) if d.get(key) is not None})
        for key in fields:
            if key in _INT_LIST_FIELDS:
                fields[key] = [int(v) for v in fields[key]]
            elif key in _INT_FIELDS:
                fields[key] = int(fields[key])
            elif key in _FLOAT_FIELDS:
                fields[key] = float(fields[key])
            elif key in TENSOR_FIELDS + ("site",) and fields[key] is not None:
                fields[key] = str(fields[key])
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

    # -- ops from raw tensors (the tracer of any PyTorch module, deepreduce.trace) -------------------
    def conv_from(self, x: int, name: str, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                  dilation=(1, 1), groups: int = 1) -> int:
        """conv2d with zero padding; `dilation` and `groups` appear in the op only when not 1."""
        c, h, w = self.shape(x)
        out_c, _, kh, kw = weight.shape
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        assert c == weight.shape[1] * groups and out_c % groups == 0, (c, tuple(weight.shape), groups)
        out = [out_c, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1]
        extra = {}
        if (dh, dw) != (1, 1):
            extra["dilation"] = [dh, dw]
        if groups != 1:
            extra["groups"] = int(groups)
        return self._add("conv", [x], name, out, weight=self._tensor("w", weight), bias=self._tensor("b", bias),
                         stride=[sh, sw], padding=[ph, pw], **extra)

    def linear_from(self, x: int, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
        assert self.shape(x) == [weight.shape[1]], (self.shape(x), tuple(weight.shape))
        return self._add("linear", [x], name, [weight.shape[0]],
                         weight=self._tensor("w", weight), bias=self._tensor("b", bias))

    def scale_shift_from(self, x: int, name: str, scale: torch.Tensor, shift: torch.Tensor) -> int:
        """x * scale[c] + shift[c] over the channels of a C x H x W value or the features of a flat one."""
        assert scale.shape == shift.shape == (self.shape(x)[0],), (self.shape(x), tuple(scale.shape))
        return self._add("scale_shift", [x], name, self.shape(x),
                         scale=self._tensor("s", scale), shift=self._tensor("t", shift))

    def masked_relu(self, x: int, site: str, mask: torch.Tensor | None = None) -> int:
        """A ReLU kept where `mask` (broadcastable to the value's per-image shape) is 1, the identity where
        it is 0: all ones is a plain relu op, all zeros no op at all."""
        shape = self.shape(x)
        if mask is None:
            return self._add("relu", [x], site, shape, site=site, relu_count=math.prod(shape))
        mask = normalize_mask(mask, shape)
        kept = int(mask.expand(shape).sum().item())
        if kept == 0:
            return x
        if kept == math.prod(shape):
            return self._add("relu", [x], site, shape, site=site, relu_count=kept)
        return self._add("relu", [x], site, shape, site=site, relu_count=kept, mask=self._tensor("m", mask))

    def pool(self, kind: str, x: int, name: str, kernel, stride, padding) -> int:
        """avgpool2d or maxpool (no ceil mode, no dilation)."""
        assert kind in ("avgpool2d", "maxpool")
        c, h, w = self.shape(x)
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        out = [c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1]
        extra = {"comparison_count": math.prod(out) * (kh * kw - 1)} if kind == "maxpool" else {}
        return self._add(kind, [x], name, out, kernel=[kh, kw], stride=[sh, sw], padding=[ph, pw], **extra)

    def global_avgpool(self, x: int, name: str) -> int:
        return self._add("avgpool", [x], name, [self.shape(x)[0]])

    def reshape(self, x: int, shape, name: str) -> int:
        assert math.prod(shape) == math.prod(self.shape(x)), (self.shape(x), shape)
        return self._add("reshape", [x], name, [int(d) for d in shape])

    def concat(self, xs: list[int], name: str) -> int:
        rest = self.shape(xs[0])[1:]
        assert len(xs) >= 2 and all(self.shape(x)[1:] == rest for x in xs), [self.shape(x) for x in xs]
        return self._add("concat", list(xs), name, [sum(self.shape(x)[0] for x in xs), *rest])

    def scale(self, x: int, name: str, factor: float, offset: float) -> int:
        return self._add("scale", [x], name, self.shape(x), factor=float(factor), offset=float(offset))


def normalize_mask(mask: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A 0/1 ReLU mask broadcastable to the per-image `shape`, as C x 1 x 1 when it is per channel of a
    C x H x W value, else the full per-image shape (float32). Raises ValueError otherwise."""
    mask = mask.detach().to(torch.float64).cpu()
    while mask.dim() > len(shape) and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() > len(shape):
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit a value of shape {tuple(shape)}")
    mask = mask.reshape((1,) * (len(shape) - mask.dim()) + tuple(mask.shape))
    if any(m not in (1, s) for m, s in zip(mask.shape, shape)):
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit a value of shape {tuple(shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("a ReLU mask must hold only 0 (identity) and 1 (keep the ReLU)")
    per_channel = len(shape) == 3 and list(mask.shape[1:]) == [1, 1] and mask.shape[0] == shape[0]
    return (mask if per_channel else mask.expand(shape)).to(torch.float32).contiguous()


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch-norm as y = x * scale + shift (float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale
