"""Secure plans: a trained network flattened into a small op graph for two-party inference.

A plan is what the server party runs: batch-norm folded away, removed ReLUs gone, every weight a
float32 tensor, plus what the client needs to know (input shape, classes, normalisation, the op
list without weight values). One file, read without pickle::

    MAGIC (8 bytes) | header length (8 bytes, little-endian) | JSON header | raw tensor bytes

The header holds the op list, the metadata, a tensor index (name, dtype, shape, offset, nbytes
into the data section, little-endian float32) and ``plan_hash``, the sha256 of the canonical
content (`_content_hash`), checked on load.

The ops are `deepreduce.graph.Op` records (their table is in deepreduce/graph.py); the public part
(`PublicPlan`) is what the client receives.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np

import torch

from deepreduce.errors import UserError
from deepreduce.fileio import atomic_write_bytes
from deepreduce.graph import Op

MAGIC = b"DRPLAN\x00\x01"
PLAN_FORMAT_VERSION = 1
PLAN_KIND = "deepreduce-secure-plan"
_LENGTH = struct.Struct("<Q")
_MAX_HEADER = 64 << 20  # a header is a few hundred KB at most; refuse absurd lengths early


class _OpCounts:
    """What a plan's ops cost per image, for the full plan and its public part alike."""
    ops: list[Op]

    @property
    def relu_per_layer(self) -> dict[str, int]:
        """ReLUs per image at every kept site, in network order."""
        return {op.site: op.relu_count for op in self.ops if op.kind == "relu"}

    @property
    def comparison_count(self) -> int:
        """Comparisons per image in max pooling (not ReLUs; 0 for networks without it)."""
        return comparison_count(self.ops)


@dataclass
class PublicPlan(_OpCounts):
    """Everything the client party may learn: the architecture without weight values. Its JSON form
    (`to_dict`) is what the server sends; `from_dict` checks a received one."""
    plan_hash: str
    input_shape: tuple[int, int, int]
    classes: list[str]
    mean: list[float]
    std: list[float]
    spec: dict
    relu_count: int
    ops: list[Op]
    tensor_shapes: dict[str, list[int]]
    # The 0/1 keep masks of masked relu ops, by tensor name: which positions are ReLUs is architecture,
    # and the client must know it to take part. Not compared by ==: tensors do not compare to a bool,
    # and the plan hash (compared) covers them.
    masks: dict[str, torch.Tensor] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        d = {"format_version": PLAN_FORMAT_VERSION, "kind": PLAN_KIND + "-public", "plan_hash": self.plan_hash,
             "input_shape": list(self.input_shape), "classes": list(self.classes),
             "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std],
             "spec": self.spec, "relu_count": int(self.relu_count), "relu_per_layer": self.relu_per_layer,
             "ops": [op.to_dict() for op in self.ops],
             "tensor_shapes": {name: list(shape) for name, shape in self.tensor_shapes.items()}}
        if self.masks:  # only then: a plan without masks is described exactly as before
            d["relu_masks"] = {name: pack_mask(m) for name, m in self.masks.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PublicPlan":
        """Raises ValueError naming what is wrong with a received description."""
        try:
            if d.get("format_version") != PLAN_FORMAT_VERSION or d.get("kind") != PLAN_KIND + "-public":
                raise ValueError(f"plan format {d.get('format_version')!r}, this version reads {PLAN_FORMAT_VERSION}")
            public = cls(plan_hash=str(d["plan_hash"]), input_shape=tuple(int(x) for x in d["input_shape"]),
                         classes=[str(c) for c in d["classes"]], mean=[float(m) for m in d["mean"]],
                         std=[float(s) for s in d["std"]], spec=dict(d["spec"]), relu_count=int(d["relu_count"]),
                         ops=[Op.from_dict(op) for op in d["ops"]],
                         tensor_shapes={str(k): [int(x) for x in v] for k, v in d["tensor_shapes"].items()},
                         masks={str(k): unpack_mask(v) for k, v in d.get("relu_masks", {}).items()})
            channels = public.input_shape[0] if len(public.input_shape) == 3 else -1
            if channels < 1 or len(public.mean) != channels or len(public.std) != channels:
                raise ValueError("input shape and normalisation do not match")
            for name, mask in public.masks.items():
                if list(mask.shape) != public.tensor_shapes.get(name):
                    raise ValueError(f"ReLU mask {name!r} does not fit its tensor shape")
            _validate_ops(public.ops, {**public.tensor_shapes, **public.masks})  # masks: values checked too
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed public plan ({type(exc).__name__}: {exc})") from None
        return public


@dataclass
class SecurePlan(_OpCounts):
    ops: list[Op]
    tensors: dict[str, torch.Tensor]  # float32, contiguous
    input_shape: tuple[int, int, int]
    classes: list[str]
    mean: list[float]
    std: list[float]
    spec: dict
    relu_count: int
    plan_hash: str = ""

    def __post_init__(self):
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if not self.plan_hash:
            self.plan_hash = _content_hash(self._meta(), self.ops, self.tensors)

    def _meta(self) -> dict:
        return {"input_shape": list(self.input_shape), "classes": list(self.classes),
                "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std],
                "spec": self.spec, "relu_count": int(self.relu_count)}

    def public_info(self) -> PublicPlan:
        """Everything the client party may learn: the architecture without weight values."""
        return PublicPlan(plan_hash=self.plan_hash, input_shape=self.input_shape, classes=list(self.classes),
                          mean=list(self.mean), std=list(self.std), spec=self.spec, relu_count=self.relu_count,
                          ops=self.ops, tensor_shapes={name: list(t.shape) for name, t in self.tensors.items()},
                          masks={op.mask: self.tensors[op.mask] for op in self.ops if op.kind == "relu" and op.mask})

    # -- file format ------------------------------------------------------------------------
    def save(self, path: str) -> None:
        index, offset = [], 0
        for name, t in self.tensors.items():
            nbytes = t.numel() * 4
            index.append({"name": name, "dtype": "float32", "shape": list(t.shape),
                          "offset": offset, "nbytes": nbytes})
            offset += nbytes
        header = {"format_version": PLAN_FORMAT_VERSION, "kind": PLAN_KIND, "plan_hash": self.plan_hash,
                  "meta": self._meta(), "ops": [op.to_dict() for op in self.ops], "tensors": index}
        blob = json.dumps(header, sort_keys=True).encode()
        atomic_write_bytes(path, [MAGIC, _LENGTH.pack(len(blob)), blob]
                      + [_tensor_bytes(t) for t in self.tensors.values()])

    @classmethod
    def load(cls, path: str) -> "SecurePlan":
        if not os.path.isfile(path):
            raise UserError(f"plan {path} does not exist: write one with `deepreduce export CKPT --out {path}`")
        with open(path, "rb") as f:
            raw = f.read()
        header, data = _split_file(raw, path)
        try:
            tensors = _read_tensors(header["tensors"], data)
            meta = header["meta"]
            plan = cls(ops=[Op.from_dict(op) for op in header["ops"]], tensors=tensors, input_shape=tuple(meta["input_shape"]),
                       classes=list(meta["classes"]), mean=list(meta["mean"]), std=list(meta["std"]),
                       spec=meta["spec"], relu_count=int(meta["relu_count"]))
            _validate_ops(plan.ops, plan.tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{path} is a truncated or corrupt secure plan ({type(exc).__name__}: {exc}): "
                            "export it again with `deepreduce export`") from None
        if plan.plan_hash != header.get("plan_hash"):
            raise UserError(f"{path} is a corrupt secure plan (content hash mismatch): "
                            "export it again with `deepreduce export`")
        return plan


def pack_mask(mask: torch.Tensor) -> dict:
    """A 0/1 mask as its shape and its bits, 8 a byte in C order, base64: a few hundred bytes for a
    ResNet layer's per-pixel mask where JSON floats would take tens of KB."""
    bits = np.packbits(mask.detach().reshape(-1).numpy() != 0)
    return {"shape": list(mask.shape), "bits": base64.b64encode(bits.tobytes()).decode()}


def unpack_mask(d: dict) -> torch.Tensor:
    """`pack_mask`'s inverse (float32 0/1); ValueError when the bits do not fill the shape."""
    shape = [int(s) for s in d["shape"]]
    raw = np.frombuffer(base64.b64decode(d["bits"], validate=True), dtype=np.uint8)
    n = math.prod(shape)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"a ReLU mask of shape {shape} with {len(raw)} bytes")
    return torch.from_numpy(np.unpackbits(raw)[:n].astype(np.float32)).reshape(shape)


def comparison_count(ops: list[Op]) -> int:
    return sum(op.comparison_count for op in ops if op.kind == "maxpool")


def is_plan_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _content_hash(meta: dict, ops: list[Op], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format_version": PLAN_FORMAT_VERSION, "meta": meta, "ops": [op.to_dict() for op in ops],
                         "tensors": [[n, list(t.shape)] for n, t in tensors.items()]},
                        sort_keys=True).encode())
    for t in tensors.values():
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def _split_file(raw: bytes, path: str) -> tuple[dict, bytes]:
    fix = "export it again with `deepreduce export`"
    if raw[:len(MAGIC)] != MAGIC:
        raise UserError(f"{path} is not a secure plan (wrong magic bytes): write one with `deepreduce export`")
    start = len(MAGIC) + _LENGTH.size
    if len(raw) < start:
        raise UserError(f"{path} is a truncated secure plan: {fix}")
    (length,) = _LENGTH.unpack_from(raw, len(MAGIC))
    if length > _MAX_HEADER or start + length > len(raw):
        raise UserError(f"{path} is a truncated or corrupt secure plan (bad header length): {fix}")
    try:
        header = json.loads(raw[start:start + length].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is a corrupt secure plan (unreadable header): {fix}") from None
    if not isinstance(header, dict) or header.get("kind") != PLAN_KIND:
        raise UserError(f"{path} is a corrupt secure plan (not a plan header): {fix}")
    if header.get("format_version") != PLAN_FORMAT_VERSION:
        raise UserError(f"{path} has plan format {header.get('format_version')}, this version reads "
                        f"{PLAN_FORMAT_VERSION}: {fix}")
    return header, raw[start + length:]


def _read_tensors(index: list[dict], data: bytes) -> dict[str, torch.Tensor]:
    expected = sum(int(e["nbytes"]) for e in index)
    if len(data) != expected:  # truncated, or bytes appended
        raise ValueError(f"{len(data)} data bytes but the tensor index lists {expected}")
    tensors = {}
    for entry in index:
        shape, offset, nbytes = [int(d) for d in entry["shape"]], int(entry["offset"]), int(entry["nbytes"])
        if entry["dtype"] != "float32" or nbytes != 4 * math.prod(shape) or offset < 0 \
                or offset + nbytes > len(data):
            raise ValueError(f"bad tensor index entry {entry['name']!r}")
        flat = torch.frombuffer(bytearray(data[offset:offset + nbytes]), dtype=torch.float32)
        tensors[str(entry["name"])] = flat.reshape(shape)
    return tensors


def _validate_ops(ops: list[Op], tensors: dict) -> None:
    """Structural checks so that a hand-edited header fails here, not inside the protocol. `tensors`:
    name -> tensor or shape."""
    if not ops or ops[0].kind != "input":
        raise ValueError("the op list must start with the input")
    for i, op in enumerate(ops):
        if op.id != i or (i > 0 and op.kind == "input"):
            raise ValueError(f"op {i} is malformed")
        if any(not 0 <= j < i for j in op.inputs):
            raise ValueError(f"op {i} reads an op that does not precede it")
        arity = _ARITY.get(op.kind, 1)
        if (len(op.inputs) < 2) if arity is None else len(op.inputs) != arity:
            raise ValueError(f"op {i} ({op.kind}) has {len(op.inputs)} inputs")
        for name in op.tensor_names():
            if name not in tensors:
                raise ValueError(f"op {i} names a missing tensor {name!r}")
        _validate_fields(op, [ops[j].shape for j in op.inputs], tensors)


_ARITY = {"input": 0, "add": 2, "concat": None}  # None: two or more; every other kind reads one op


def _validate_fields(op: Op, in_shapes: list[list[int]], tensors: dict) -> None:
    """The fields of the kinds that exported modules brought (deepreduce.trace): pairs of positive
    sizes, shapes that agree with the inputs, a 0/1 ReLU mask whose kept count is the op's relu_count."""
    bad = f"op {op.id} ({op.kind})"
    pairs = {key: getattr(op, key) for key in ("kernel", "stride", "padding", "dilation")
             if getattr(op, key) is not None}
    for key, value in pairs.items():
        if len(value) != 2 or min(value) < (0 if key == "padding" else 1):
            raise ValueError(f"{bad} has a bad {key} {value}")
    if op.groups is not None and op.groups < 1:
        raise ValueError(f"{bad} has groups {op.groups}")
    if op.kind == "reshape" and math.prod(op.shape) != math.prod(in_shapes[0]):
        raise ValueError(f"{bad} changes the number of values")
    if op.kind == "concat" and (any(s[1:] != op.shape[1:] for s in in_shapes)
                                or sum(s[0] for s in in_shapes) != op.shape[0]):
        raise ValueError(f"{bad} does not fit its inputs")
    if op.kind == "scale" and not (math.isfinite(op.factor) and math.isfinite(op.offset)):
        raise ValueError(f"{bad} has a non-finite constant")
    if op.kind == "maxpool" and op.comparison_count != math.prod(op.shape) * (math.prod(op.kernel) - 1):
        raise ValueError(f"{bad} counts {op.comparison_count} comparisons")
    if op.kind == "relu" and op.mask is None and op.relu_count != math.prod(op.shape):
        raise ValueError(f"{bad} counts {op.relu_count} ReLUs for {math.prod(op.shape)} values")
    if op.kind == "relu" and op.mask is not None:
        mask = tensors[op.mask]
        shape = list(mask.shape) if isinstance(mask, torch.Tensor) else list(mask)
        if len(shape) != len(op.shape) or any(m not in (1, s) for m, s in zip(shape, op.shape)):
            raise ValueError(f"{bad} has a mask of shape {shape}")
        if isinstance(mask, torch.Tensor):
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"{bad} has a mask that is not 0/1")
            if int(mask.expand(op.shape).sum().item()) != op.relu_count:
                raise ValueError(f"{bad} counts {op.relu_count} ReLUs, its mask keeps another number")
