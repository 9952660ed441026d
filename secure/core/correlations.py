"""The dealer's correlated randomness for the fast engine, and the layout both parties read it with.

Every random value comes from one of two seeds the dealer hands out at session start: `prg_s`
(shared with the server) and `prg_c` (shared with the client). A party derives its own part from
its seed, so the only dealer traffic is what needs the other seed: the server's complement of each
correlation (`server_message`). The client receives nothing from the dealer but its seed.

Per session, for every linear op l (conv, scale_shift, linear): a weight mask A_l = prg_s("A.l"),
uniform in Z_2^64 and never used with another weight (the server opens E_l = W_l - A_l once per
session to the client; docs/PROTOCOL.md gives the argument).

Per query q (a batch of N images):
  linear l: B = prg_c (input-shaped, the client's input mask), C1 = prg_c, C0 = A_l * B - C1.
  relu r (n = N * relu_count elements, L = `relu_bits`):
    first AND of the sign adder: alpha = prg_s, beta = prg_c (L bit planes), z1 = prg_c, z0 = (alpha & beta) ^ z1
    per carry level j with p pairs: u, v1, v2 XOR-shared (prg_s / prg_c), w_k shared as (u & v_k) ^ w_k1
    output: a random bit r (XOR-shared), a random ring mask m ([m0] prg_s, [m1] prg_c),
            arithmetic shares of r (rA0 = r - rA1) and of r * m (rm0 = r * m - rm1)
  A masked relu draws these for its kept positions only (N * relu_count elements); a maxpool draws
  them once per tournament level t (key "<op>.t<t>"): max(a, b) = a + ReLU(b - a) over the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deepreduce.graph import Op
from secure.core.ring import Prg, from_plane, linear_params, packed_size, ring_linear

LINEAR_OPS = ("conv", "scale_shift", "linear")


@dataclass(frozen=True)
class ReluParams:
    """The sign test looks at bits [drop_bits, drop_bits + relu_bits] of x * 2^ACT_BITS: a value below
    2^(drop_bits - ACT_BITS) may come out as 0 (error < 2^-12 by default, the fixed-point resolution)
    and |x| must stay below 2^(drop_bits + relu_bits - ACT_BITS) (2^20 by default)."""
    relu_bits: int = 32
    drop_bits: int = 0

    def __post_init__(self):
        if self.relu_bits not in (8, 16, 32) or not 0 <= self.drop_bits <= 64 - self.relu_bits - 1:
            raise ValueError(f"relu_bits must be 8, 16 or 32 and drop_bits in 0..{63 - self.relu_bits}")

    @property
    def levels(self) -> list[int]:
        """Pairs combined at each carry level: L/2, L/4, ..., 1."""
        return [self.relu_bits >> (j + 1) for j in range(int(math.log2(self.relu_bits)))]


@dataclass
class Layout:
    """Shapes of everything the protocol exchanges, from the public plan alone."""
    ops: list[Op]
    weight_shapes: dict[str, list[int]]
    relu: ReluParams

    @classmethod
    def from_public(cls, public: dict, relu: ReluParams) -> "Layout":
        return cls(ops=public.ops, weight_shapes=public.tensor_shapes, relu=relu)

    def input_shape(self, op: dict) -> list[int]:
        return self.ops[op.inputs[0]].shape

    def linear_ops(self) -> list[Op]:
        return [op for op in self.ops if op.kind in LINEAR_OPS]

    def relu_elements(self, op: dict, batch: int) -> int:
        """The positions a relu op compares: all of them, or the kept ones of a masked relu."""
        return batch * (op.relu_count if op.mask is not None else math.prod(op.shape))

    def relu_sites(self, op: Op, batch: int) -> list[tuple[str, int]]:
        """(key, elements) of every run of the ReLU protocol in `op`: one for a relu (key: its id, as
        every plan before max pooling had), one per tournament level of a maxpool."""
        if op.kind == "relu":
            return [(str(op.id), self.relu_elements(op, batch))]
        if op.kind == "maxpool":
            outputs = batch * math.prod(op.shape)
            return [(f"{op.id}.t{t}", outputs * pairs) for t, pairs in enumerate(tournament(math.prod(op.kernel)))]
        return []

    def server_message_spec(self, batch: int) -> list[tuple[str, str, list[int]]]:
        """(key, "ring" | "bits", shape) of the dealer's per-query message to the server, in order;
        bits are packed planes (`secure.core.ring.to_planes`), shape [planes, bytes]."""
        spec = []
        for op in self.ops:
            if op.kind in LINEAR_OPS:
                spec.append((f"{op.id}.C0", "ring", [batch, *op.shape]))
            for key, n in self.relu_sites(op, batch):
                spec += self._relu_spec(key, n)
        return spec

    def _relu_spec(self, key: str, n: int) -> list[tuple[str, str, list[int]]]:
        nb = packed_size(n)
        spec = [(f"{key}.z0", "bits", [self.relu.relu_bits, nb])]
        for j, p in enumerate(self.relu.levels):
            spec.append((f"{key}.l{j}.w1", "bits", [p, nb]))
            if j < len(self.relu.levels) - 1:
                spec.append((f"{key}.l{j}.w2", "bits", [p, nb]))
        return spec + [(f"{key}.rA0", "ring", [n]), (f"{key}.rm0", "ring", [n])]


def tournament(k: int) -> list[int]:
    """Comparisons per window at each level of a max over k elements taken pairwise: the odd one out
    waits for the next level. ceil(log2 k) levels, k - 1 comparisons in all (the plan's count)."""
    levels = []
    while k > 1:
        levels.append(k // 2)
        k -= k // 2
    return levels


def weight_name(op: dict) -> str:
    return op.weight if op.kind != "scale_shift" else op.scale


def bias_name(op: dict) -> str | None:
    return op.bias if op.kind != "scale_shift" else op.shift


def weight_masks(prg_s: Prg, layout: Layout) -> dict[int, torch.Tensor]:
    return {op.id: prg_s.ring(f"A.{op.id}", layout.weight_shapes[weight_name(op)])
            for op in layout.linear_ops()}


def party_randomness(prg: Prg, party: int, layout: Layout, query: int, batch: int) -> dict[str, torch.Tensor]:
    """What one party derives from its own seed for one query (party 0: prg_s, party 1: prg_c)."""
    out, tag = {}, f"q{query}"
    for op in layout.ops:
        i = op.id
        if op.kind in LINEAR_OPS and party == 1:
            out[f"{i}.B"] = prg.ring(f"{tag}.{i}.B", [batch, *layout.input_shape(op)])
            out[f"{i}.C1"] = prg.ring(f"{tag}.{i}.C1", [batch, *op.shape])
        for key, n in layout.relu_sites(op, batch):
            _relu_randomness(out, prg, party, layout.relu, f"{tag}.{key}", key, n)
    return out


def _relu_randomness(out: dict, prg: Prg, party: int, relu: ReluParams, label: str, key: str, n: int) -> None:
    """One run of the ReLU protocol over n elements: `label` makes the PRG labels, `key` the dict keys."""
    bits = relu.relu_bits
    out[f"{key}.mask"] = prg.bits(f"{label}.mask", bits, n)  # alpha (party 0) or beta (party 1)
    if party == 1:
        out[f"{key}.z1"] = prg.bits(f"{label}.z1", bits, n)
    for j, p in enumerate(relu.levels):
        for name in ("u", "v1", "v2") + (("w1", "w2") if party == 1 else ()):
            out[f"{key}.l{j}.{name}"] = prg.bits(f"{label}.l{j}.{name}", p, n)
    out[f"{key}.r"] = prg.bits(f"{label}.r", 1, n)
    out[f"{key}.m"] = prg.ring(f"{label}.m", [n])
    if party == 1:
        out[f"{key}.rA1"] = prg.ring(f"{label}.rA1", [n])
        out[f"{key}.rm1"] = prg.ring(f"{label}.rm1", [n])


def server_message(layout: Layout, masks: dict[int, torch.Tensor], s: dict, c: dict, batch: int) -> dict:
    """The dealer's complement for the server, from both parties' randomness `s` and `c`."""
    msg = {}
    for op in layout.ops:
        i = op.id
        if op.kind in LINEAR_OPS:
            msg[f"{i}.C0"] = ring_linear(op.kind, masks[i], c[f"{i}.B"], linear_params(op)) - c[f"{i}.C1"]
        for key, n in layout.relu_sites(op, batch):
            _relu_complement(msg, len(layout.relu.levels), s, c, key, n)
    return msg


def _relu_complement(msg: dict, levels: int, s: dict, c: dict, i: str, n: int) -> None:
    msg[f"{i}.z0"] = (s[f"{i}.mask"] & c[f"{i}.mask"]) ^ c[f"{i}.z1"]
    for j in range(levels):
        u = s[f"{i}.l{j}.u"] ^ c[f"{i}.l{j}.u"]
        for k in ("1", "2"):
            if k == "2" and j == levels - 1:
                continue  # the last level only needs the carry, not the propagate bit
            v = s[f"{i}.l{j}.v{k}"] ^ c[f"{i}.l{j}.v{k}"]
            msg[f"{i}.l{j}.w{k}"] = (u & v) ^ c[f"{i}.l{j}.w{k}"]
    r = from_plane((s[f"{i}.r"] ^ c[f"{i}.r"])[0], n)
    m = s[f"{i}.m"] + c[f"{i}.m"]
    msg[f"{i}.rA0"] = r - c[f"{i}.rA1"]
    msg[f"{i}.rm0"] = r * m - c[f"{i}.rm1"]


# -- serialisation of the server message: one int64 buffer and one packed-bit buffer --------------

def pack_message(spec, msg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    rings = [msg[k].reshape(-1) for k, kind, _ in spec if kind == "ring"]
    bits = [msg[k].reshape(-1) for k, kind, _ in spec if kind == "bits"]
    return (torch.cat(rings) if rings else torch.zeros(0, dtype=torch.long),
            torch.cat(bits) if bits else torch.zeros(0, dtype=torch.uint8))


def message_sizes(spec) -> tuple[int, int]:
    return (sum(math.prod(s) for _, kind, s in spec if kind == "ring"),
            sum(math.prod(s) for _, kind, s in spec if kind == "bits"))


def unpack_message(spec, rings: torch.Tensor, bits: torch.Tensor) -> dict:
    msg, offsets = {}, {"ring": 0, "bits": 0}
    for key, kind, shape in spec:
        n, start = math.prod(shape), offsets[kind]
        msg[key] = (rings if kind == "ring" else bits)[start: start + n].view(*shape)
        offsets[kind] += n
    return msg
