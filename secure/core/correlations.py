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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deepreduce.graph import Op
from secure.core.ring import Prg, from_plane, packed_size, ring_linear

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

    def relu_ops(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "relu"]

    def relu_elements(self, op: dict, batch: int) -> int:
        return batch * math.prod(op.shape)

    def server_message_spec(self, batch: int) -> list[tuple[str, str, list[int]]]:
        """(key, "ring" | "bits", shape) of the dealer's per-query message to the server, in order;
        bits are packed planes (`secure.core.ring.to_planes`), shape [planes, bytes]."""
        spec = []
        for op in self.ops:
            i = op.id
            if op.kind in LINEAR_OPS:
                spec.append((f"{i}.C0", "ring", [batch, *op.shape]))
            elif op.kind == "relu":
                n = self.relu_elements(op, batch)
                nb = packed_size(n)
                spec.append((f"{i}.z0", "bits", [self.relu.relu_bits, nb]))
                for j, p in enumerate(self.relu.levels):
                    spec.append((f"{i}.l{j}.w1", "bits", [p, nb]))
                    if j < len(self.relu.levels) - 1:
                        spec.append((f"{i}.l{j}.w2", "bits", [p, nb]))
                spec += [(f"{i}.rA0", "ring", [n]), (f"{i}.rm0", "ring", [n])]
        return spec


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
        elif op.kind == "relu":
            n, bits = layout.relu_elements(op, batch), layout.relu.relu_bits
            out[f"{i}.mask"] = prg.bits(f"{tag}.{i}.mask", bits, n)  # alpha (party 0) or beta (party 1)
            if party == 1:
                out[f"{i}.z1"] = prg.bits(f"{tag}.{i}.z1", bits, n)
            for j, p in enumerate(layout.relu.levels):
                for name in ("u", "v1", "v2") + (("w1", "w2") if party == 1 else ()):
                    out[f"{i}.l{j}.{name}"] = prg.bits(f"{tag}.{i}.l{j}.{name}", p, n)
            out[f"{i}.r"] = prg.bits(f"{tag}.{i}.r", 1, n)
            out[f"{i}.m"] = prg.ring(f"{tag}.{i}.m", [n])
            if party == 1:
                out[f"{i}.rA1"] = prg.ring(f"{tag}.{i}.rA1", [n])
                out[f"{i}.rm1"] = prg.ring(f"{tag}.{i}.rm1", [n])
    return out


def server_message(layout: Layout, masks: dict[int, torch.Tensor], s: dict, c: dict, batch: int) -> dict:
    """The dealer's complement for the server, from both parties' randomness `s` and `c`."""
    msg = {}
    for op in layout.ops:
        i = op.id
        if op.kind in LINEAR_OPS:
            params = {"stride": op.stride, "padding": op.padding}
            msg[f"{i}.C0"] = ring_linear(op.kind, masks[i], c[f"{i}.B"], params) - c[f"{i}.C1"]
        elif op.kind == "relu":
            msg[f"{i}.z0"] = (s[f"{i}.mask"] & c[f"{i}.mask"]) ^ c[f"{i}.z1"]
            for j in range(len(layout.relu.levels)):
                u = s[f"{i}.l{j}.u"] ^ c[f"{i}.l{j}.u"]
                for k in ("1", "2"):
                    if k == "2" and j == len(layout.relu.levels) - 1:
                        continue  # the last level only needs the carry, not the propagate bit
                    v = s[f"{i}.l{j}.v{k}"] ^ c[f"{i}.l{j}.v{k}"]
                    msg[f"{i}.l{j}.w{k}"] = (u & v) ^ c[f"{i}.l{j}.w{k}"]
            r = from_plane((s[f"{i}.r"] ^ c[f"{i}.r"])[0], layout.relu_elements(op, batch))
            m = s[f"{i}.m"] + c[f"{i}.m"]
            msg[f"{i}.rA0"] = r - c[f"{i}.rA1"]
            msg[f"{i}.rm0"] = r * m - c[f"{i}.rm1"]
    return msg


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
