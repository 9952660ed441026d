"""A plan evaluated in the clear: the reference every secure run is checked against, and `deepreduce predict`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepreduce.errors import UserError
from deepreduce.graph import Op, walk
from secure.core.plan import SecurePlan


def run_plaintext(plan: SecurePlan, x: torch.Tensor, dtype: torch.dtype = torch.float64,
                  observe=None) -> torch.Tensor:
    """Logits for a normalised N x C x H x W batch, with plain torch ops (float64 by default).
    `observe(op, value)`, when given, sees every op's output (e.g. to measure the value range)."""
    check_input(x, plan.input_shape)
    tensors = {name: t.to(dtype) for name, t in plan.tensors.items()}

    def apply(op: Op, inputs):
        y = evaluate_op(op, inputs, tensors)
        if observe is not None:
            observe(op, y)
        return y

    with torch.no_grad():
        return walk(plan.ops, x.to(dtype), apply)


def evaluate_op(op: Op, inputs: list[torch.Tensor], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One op on N-image values (the table of kinds is in deepreduce/graph.py)."""
    kind, w, x = op.kind, tensors.get(op.weight), inputs[0]
    if kind == "conv":
        return F.conv2d(x, w, tensors.get(op.bias), stride=op.stride, padding=op.padding,
                        dilation=op.dilation or 1, groups=op.groups or 1)
    if kind == "scale_shift":  # per channel of N x C x H x W, per feature of N x F
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * tensors[op.scale].view(view) + tensors[op.shift].view(view)
    if kind == "relu":
        if op.mask is None:
            return F.relu(x)
        return torch.where(tensors[op.mask].unsqueeze(0) != 0, F.relu(x), x)
    if kind == "add":
        return x + inputs[1]
    if kind == "avgpool":
        return x.mean(dim=(2, 3))
    if kind == "linear":
        return F.linear(x, w, tensors.get(op.bias))
    if kind == "avgpool2d":
        return F.avg_pool2d(x, op.kernel, op.stride, op.padding)
    if kind == "maxpool":
        return F.max_pool2d(x, op.kernel, op.stride, op.padding)
    if kind == "reshape":
        return x.reshape(x.shape[0], *op.shape)
    if kind == "concat":
        return torch.cat(inputs, dim=1)
    if kind == "scale":
        return x * op.factor + op.offset
    raise ValueError(f"unknown op {kind!r}")


def check_input(x: torch.Tensor, input_shape) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise UserError(f"input batch has shape {tuple(x.shape)}, "
                        f"the plan expects N x {' x '.join(map(str, input_shape))}")


def prediction_records(logits: torch.Tensor, classes: list[str], names: list[str]) -> list[dict]:
    """One {"image", "class_index", "class_name", "probability"} record per image (softmax of the argmax)."""
    probs = torch.softmax(logits.double(), dim=1)
    best, index = probs.max(dim=1)
    return [{"image": name, "class_index": int(i), "class_name": classes[int(i)], "probability": float(p)}
            for name, i, p in zip(names, index, best)]


def predict_files(plan: SecurePlan, paths: list[str], resize: bool = False) -> list[dict]:
    """Plaintext prediction on image files (what `deepreduce predict` prints)."""
    from deepreduce.data import load_image_files, normalize
    c, h, w = plan.input_shape
    if h != w:
        raise UserError(f"plan input {h}x{w} is not square")
    pixels = load_image_files(paths, c, h, resize=resize)
    logits = run_plaintext(plan, normalize(pixels, plan.mean, plan.std))
    return prediction_records(logits, plan.classes, paths)
