"""A plan evaluated in the clear: the reference every secure run is checked against, and `deepreduce predict`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepreduce.errors import UserError
from deepreduce.graph import Op, walk
from secure.core.plan import SecurePlan


def run_plaintext(plan: SecurePlan, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits for a normalised N x C x H x W batch, with plain torch ops (float64 by default)."""
    check_input(x, plan.input_shape)
    tensors = {name: t.to(dtype) for name, t in plan.tensors.items()}

    def apply(op: Op, inputs):
        kind, w = op.kind, tensors.get(op.weight)
        if kind == "conv":
            return F.conv2d(inputs[0], w, tensors.get(op.bias), stride=op.stride, padding=op.padding)
        if kind == "scale_shift":
            return inputs[0] * tensors[op.scale].view(1, -1, 1, 1) + tensors[op.shift].view(1, -1, 1, 1)
        if kind == "relu":
            return F.relu(inputs[0])
        if kind == "add":
            return inputs[0] + inputs[1]
        if kind == "avgpool":
            return inputs[0].mean(dim=(2, 3))
        if kind == "linear":
            return F.linear(inputs[0], w, tensors[op.bias])
        raise ValueError(f"unknown op {kind!r}")

    with torch.no_grad():
        return walk(plan.ops, x.to(dtype), apply)


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
