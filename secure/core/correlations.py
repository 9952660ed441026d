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

With the FSS ReLU (`Layout.protocol == "fss"`, docs/PROTOCOL.md), per run of the ReLU over n elements
instead: an input mask r = r0 + r1 (r0 = prg_s, r1 = prg_c); with D the bits the ReLU drops (`drop`)
and w = fss_bits, Rr = (r >> D) mod 2^w, m = bit w-1 of Rr, rho = Rr mod 2^(w-1); one DCF on w - 1 bits
with alpha = rho and payload (1 - 2m, (1 - 2m) Rr, m); additive shares of m, Rr and m Rr (the
server's from prg_s, the client's from the dealer). Both parties get their key from the dealer: the
server in its message, the client in a message of its own (`client_message_spec`).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch

from deepreduce.graph import Op, consumers
from secure.core import fss
from secure.core.party import RELU_PROTOCOLS
from secure.core.ring import WEIGHT_BITS, Prg, from_plane, linear_params, packed_size, ring_linear

LINEAR_OPS = ("conv", "scale_shift", "linear")
LOCAL_OPS = ("add", "avgpool", "avgpool2d", "concat", "reshape", "scale")  # each party on its own share
FSS_BITS = 20  # the FSS ReLU's window w: |x| < 2^(w - 1 - ACT_BITS) = 128 (docs/PROTOCOL.md)
FSS_PAYLOAD = 3  # words of the DCF payload: 1 - 2m, (1 - 2m) Rr, m
GATE_PAYLOAD = 2  # a truncation gate's: m, 1 - m
FOLD_NAMES = ("M", "rM", "b", "rb")
# A test hook: a file to which every party appends a line per query's correlations, "made <label>" by the
# dealer and "used <label>" by the party that consumes them (`record_correlation`), so that a test can
# show that no correlation is ever used twice, across failures, kills and reconnects.
CORRELATION_LOG_ENV = "DEEPREDUCE_CORRELATION_LOG"  # gmw ReLU of a wide input: shares of m >> drop, r (m >> drop), msb(m), r msb(m)


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
    protocol: str = "gmw"  # the ReLU protocol: gmw or fss
    fss_bits: int = FSS_BITS
    exact_truncation: bool = False  # fss only: truncation gates where local truncation could do harm

    def __post_init__(self):
        if self.protocol not in ("gmw", "fss"):
            raise ValueError(f"unknown ReLU protocol {self.protocol!r}: gmw or fss")
        if not 2 <= self.fss_bits <= 31:
            raise ValueError(f"fss_bits must be in 2..31, got {self.fss_bits}")
        if self.exact_truncation and self.protocol != "fss":
            raise ValueError("exact truncation needs the fss ReLU protocol")
        # values kept at ACT_BITS + WEIGHT_BITS fractional bits: their ReLU truncates them exactly
        self.wide = wide_values(self.ops)
        # linear layers whose truncation is a gate (an FSS opening), the others are truncated locally
        self.gates = truncation_gates(self.ops, self.wide) if self.exact_truncation else set()
        # {relu op: the gates that open in its exchange}: no round of their own
        self.riders = gate_riders(self.ops, self.gates)

    @classmethod
    def for_protocol(cls, ops: list[Op], weight_shapes: dict, relu: ReluParams, relu_protocol: str,
                     fss_bits: int = FSS_BITS) -> "Layout":
        """The layout of a session run with `relu_protocol` (gmw, fss or fss-exact)."""
        if relu_protocol not in RELU_PROTOCOLS:
            raise ValueError(f"unknown ReLU protocol {relu_protocol!r}: one of {', '.join(RELU_PROTOCOLS)}")
        return cls(ops=ops, weight_shapes=weight_shapes, relu=relu, protocol=relu_protocol.split("-")[0],
                   fss_bits=fss_bits, exact_truncation=relu_protocol == "fss-exact")

    def gate_sites(self, op: Op, batch: int) -> list[tuple[str, int]]:
        """(key, elements) of the truncation gate of a linear op, if it has one."""
        return [(f"{op.id}.g", batch * math.prod(op.shape))] if op.id in self.gates else []

    def drop(self, op: Op) -> int:
        """Bits the FSS ReLU of `op` drops from its input: WEIGHT_BITS for an untruncated (wide) input,
        which it thereby truncates exactly; 0 for an input at ACT_BITS (max pools, masked relus)."""
        return WEIGHT_BITS if op.kind == "relu" and op.inputs[0] in self.wide else 0

    def fss_key_bytes(self, n: int, payload: int = FSS_PAYLOAD) -> int:
        return fss.key_size(n, self.fss_bits - 1, payload)

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
        bits are packed planes (`secure.core.ring.to_planes`), shape [planes, bytes], or raw bytes
        (an FSS key, shape [bytes])."""
        spec = []
        for op in self.ops:
            if op.kind in LINEAR_OPS:
                spec.append((f"{op.id}.C0", "ring", [batch, *op.shape]))
            for key, n in self.relu_sites(op, batch):
                spec += ([(f"{key}.k0", "bits", [self.fss_key_bytes(n)])] if self.protocol == "fss"
                         else self._relu_spec(key, n, self.drop(op) > 0))
            for key, n in self.gate_sites(op, batch):
                spec.append((f"{key}.k0", "bits", [self.fss_key_bytes(n, GATE_PAYLOAD)]))
        return spec

    def client_message_spec(self, batch: int) -> list[tuple[str, str, list[int]]]:
        """The dealer's per-query message to the client: empty for gmw (the client's seed is all it
        needs); for fss its shares of m, Rr, m Rr and its key, per ReLU run."""
        spec = []
        if self.protocol == "fss":
            for op in self.ops:
                for key, n in self.relu_sites(op, batch):
                    spec += [(f"{key}.m1", "ring", [n]), (f"{key}.R1", "ring", [n]), (f"{key}.mR1", "ring", [n]),
                             (f"{key}.k1", "bits", [self.fss_key_bytes(n)])]
                for key, n in self.gate_sites(op, batch):
                    spec += [(f"{key}.m1", "ring", [n]), (f"{key}.R1", "ring", [n]),
                             (f"{key}.k1", "bits", [self.fss_key_bytes(n, GATE_PAYLOAD)])]
        return spec

    def _relu_spec(self, key: str, n: int, folded: bool) -> list[tuple[str, str, list[int]]]:
        nb = packed_size(n)
        spec = [(f"{key}.z0", "bits", [self.relu.relu_bits, nb])]
        for j, p in enumerate(self.relu.levels):
            spec.append((f"{key}.l{j}.w1", "bits", [p, nb]))
            if j < len(self.relu.levels) - 1:
                spec.append((f"{key}.l{j}.w2", "bits", [p, nb]))
        spec += [(f"{key}.rA0", "ring", [n]), (f"{key}.rm0", "ring", [n])]
        return spec + [(f"{key}.{name}0", "ring", [n]) for name in FOLD_NAMES] if folded else spec


def tournament(k: int) -> list[int]:
    """Comparisons per window at each level of a max over k elements taken pairwise: the odd one out
    waits for the next level. ceil(log2 k) levels, k - 1 comparisons in all (the plan's count)."""
    levels = []
    while k > 1:
        levels.append(k // 2)
        k -= k // 2
    return levels


def correlation_label(seed: bytes, query: int) -> str:
    """The name of query `query`'s correlations from a party's seed: PRG labels are q<query>-tagged
    (`party_randomness`) and a seed belongs to one session, so (seed, query) names them for good. The seed
    itself stays secret: the label carries a hash of it."""
    return f"{hashlib.sha256(b'correlation-label' + seed).hexdigest()[:24]}:{query}"


def record_correlation(event: str, seed: bytes, query: int) -> None:
    """Append `event label` to $DEEPREDUCE_CORRELATION_LOG (unset: nothing). One short write with O_APPEND:
    lines from concurrent processes do not interleave."""
    path = os.environ.get(CORRELATION_LOG_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{event} {correlation_label(seed, query)}\n".encode())
        finally:
            os.close(fd)


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
        for key, n in layout.relu_sites(op, batch) + layout.gate_sites(op, batch):
            if layout.protocol == "fss":
                _fss_randomness(out, prg, party, f"{tag}.{key}", key, n)
            else:
                _relu_randomness(out, prg, party, layout.relu, f"{tag}.{key}", key, n)
                if party == 1 and layout.drop(op):  # the client's shares for the folded truncation
                    for name in FOLD_NAMES:
                        out[f"{key}.{name}1"] = prg.ring(f"{tag}.{key}.{name}1", [n])
    return out


def _fss_randomness(out: dict, prg: Prg, party: int, label: str, key: str, n: int) -> None:
    out[f"{key}.r"] = prg.ring(f"{label}.fss.r", [n])  # this party's share of the input mask
    if party == 0:  # the server's shares of m, Rr, m Rr (the client's come from the dealer)
        for name in ("m0", "R0", "mR0"):
            out[f"{key}.{name}"] = prg.ring(f"{label}.fss.{name}", [n])


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


def dealer_messages(layout: Layout, masks: dict[int, torch.Tensor], s: dict, c: dict,
                    batch: int) -> tuple["PackedMessage", "PackedMessage | None"]:
    """The dealer's messages for the server and for the client (None for gmw), from both parties'
    randomness `s` and `c`, each written in place into its wire buffer."""
    client_spec = layout.client_message_spec(batch)
    to_server = PackedMessage(layout.server_message_spec(batch))
    to_client = PackedMessage(client_spec) if client_spec else None
    for op in layout.ops:
        i = op.id
        if op.kind in LINEAR_OPS:
            to_server[f"{i}.C0"] = ring_linear(op.kind, masks[i], c[f"{i}.B"], linear_params(op)) - c[f"{i}.C1"]
        for key, n in layout.relu_sites(op, batch):
            if layout.protocol == "fss":
                _fss_keys(to_server, to_client, s, c, key, layout.drop(op), layout.fss_bits)
            else:
                _relu_complement(to_server, len(layout.relu.levels), s, c, key, n, layout.drop(op))
        for key, _ in layout.gate_sites(op, batch):
            _fss_keys(to_server, to_client, s, c, key, WEIGHT_BITS, layout.fss_bits, gate=True)
    to_server.check_complete()
    if to_client is not None:
        to_client.check_complete()
    return to_server, to_client


def _fss_keys(to_server: dict, to_client: dict, s: dict, c: dict, i: str, drop: int, bits: int,
              gate: bool = False) -> None:
    """One FSS ReLU run (or truncation gate): the DCF keys and the client's shares (module docstring)."""
    r = s[f"{i}.r"] + c[f"{i}.r"]
    window = (r >> drop) & ((1 << bits) - 1)  # Rr: the low bits of r >> drop (the shift's sign bits are cut)
    m = window >> (bits - 1)
    sign = 1 - 2 * m
    beta = torch.stack([m, 1 - m] if gate else [sign, sign * window, m], dim=1)
    k0, k1 = fss.keygen((window & ((1 << (bits - 1)) - 1)).numpy(), bits - 1, beta=beta.numpy())  # int64 as two's complement
    to_server[f"{i}.k0"], to_client[f"{i}.k1"] = k0, k1  # written straight into the messages (`PackedMessage`)
    to_client[f"{i}.m1"] = m - s[f"{i}.m0"]
    to_client[f"{i}.R1"] = window - s[f"{i}.R0"]
    if not gate:
        to_client[f"{i}.mR1"] = m * window - s[f"{i}.mR0"]


def truncation_gates(ops: list[Op], wide: set[int]) -> set[int]:
    """The linear ops whose truncation must be a gate for no wrap of a local truncation to do harm.

    A local truncation (`ring.truncate_share`) errs, rarely, by a multiple of 2^(64 - WEIGHT_BITS) = 2^48
    ("dirty"); linear layers and adds keep it a multiple of 2^48; the FSS ReLU (its window lies below
    bit 48), a gate and the 48-bit reveal drop it. A second local truncation of a dirty value would turn
    it into a multiple of 2^32, which they read: so a linear output that is to be truncated while its
    input may be dirty gets a gate instead (one FSS opening, exact), which leaves it clean."""
    dirty: dict[int, bool] = {}
    gates: set[int] = set()
    for op in ops:
        before = any(dirty[i] for i in op.inputs)
        if op.kind in LINEAR_OPS and op.id != ops[-1].id and op.id not in wide:
            if before:
                gates.add(op.id)
            dirty[op.id] = not before  # a gate's output is clean, a local truncation's may be dirty
        elif op.kind == "relu" and op.mask is None:
            dirty[op.id] = False
        else:  # wide or last linear layers, adds, pools, pass-through positions of masked relus, max pools
            dirty[op.id] = before
    return gates


def gate_riders(ops: list[Op], gates: set[int]) -> dict[int, list[int]]:
    """{relu op id: the gated linear ops whose gate opens in that ReLU's exchange}. A gated linear op can
    run as soon as its input exists: it rides the first relu op between its input and itself (a residual
    block's shortcut conv and its conv1's ReLU), its X1 - B, if the client's input share is not known
    early, sent just before that ReLU's exchange (after the previous layer's, in the same flight), its
    gate's opening in that exchange. Its readers' X1 - B then go in the flight of that ReLU's next layer
    instead of one of their own: a riding gate costs no round."""
    riders: dict[int, list[int]] = {}
    for g in sorted(gates):
        op = ops[g]
        relu = next((o.id for o in ops[max(op.inputs) + 1: g] if o.kind == "relu"), None)
        if relu is not None:
            riders.setdefault(relu, []).append(g)
    return riders


def harmful_truncations(ops: list[Op], protocol: str, wide: set[int], gates: set[int]) -> dict[int, int]:
    """{op id: elements per image} of the local truncations whose rare wrap can garble the logits: with
    gmw every one (nothing reads a window); with fss those whose error (a multiple of 2^48) can reach a
    second local truncation before a ReLU, a gate or the reveal drops it (`truncation_gates` places
    gates so that only the scales and average pools that divide, `ring.mul_public`, can be such a
    second truncation). The failure bound of docs/PROTOCOL.md sums these elements."""
    truncated = {op.id for op in ops[:-1] if op.kind in LINEAR_OPS and op.id not in wide and op.id not in gates}
    truncated |= {op.id for op in ops if op.kind == "scale" and float(op.factor) != int(op.factor)}
    truncated |= {op.id for op in ops if op.kind in ("avgpool", "avgpool2d")} - folded_pools(ops)  # these divide
    if protocol != "fss":
        return {i: math.prod(ops[i].shape) for i in truncated if ops[i].kind in LINEAR_OPS + ("scale",)}
    sources: dict[int, set[int]] = {}
    harmful: set[int] = set()
    for op in ops:
        before = set().union(*(sources[i] for i in op.inputs)) if op.inputs else set()
        if op.id in truncated:
            harmful |= before
            sources[op.id] = {op.id}
        elif op.id in gates or (op.kind == "relu" and op.mask is None):
            sources[op.id] = set()
        else:
            sources[op.id] = before
    return {i: math.prod(ops[i].shape) for i in harmful}


def offline_known(ops: list[Op], gates: set[int] = frozenset()) -> dict[int, bool]:
    """Whether the client's share of each value is independent of the input (known before it): such a
    linear layer's X1 - B goes to the server offline."""
    known = {}
    for op in ops:
        kind = op.kind
        if kind in LINEAR_OPS:
            known[op.id] = op.id not in gates  # E * B + C1: no input needed; a truncation gate changes it
        elif kind in LOCAL_OPS:
            known[op.id] = all(known[i] for i in op.inputs)
        else:  # the input itself, ReLU and max-pool outputs
            known[op.id] = False
    return known


def folded_pools(ops: list[Op]) -> set[int]:
    """The average pools whose division the readers' weights take: those read by linear layers only
    (w * (sum / k) = (w / k) * sum). Any other reader needs the average itself, so the pool divides."""
    readers = consumers(ops)
    return {op.id for op in ops if op.kind in ("avgpool", "avgpool2d") and readers[op.id]
            and all(ops[r].kind in LINEAR_OPS for r in readers[op.id])}


def wide_values(ops: list[Op]) -> set[int]:
    """The linear and add ops whose output stays untruncated (ACT_BITS + WEIGHT_BITS fractional bits):
    those read only by unmasked relus (which truncate exactly, folded into their opening) and by adds
    that are themselves wide. The last op (the logits) is not counted: it is never truncated.
    Everything else is truncated locally."""
    readers = consumers(ops)
    wide: set[int] = set()
    for op in reversed(ops[:-1]):
        if op.kind in LINEAR_OPS or op.kind == "add":
            rs = [ops[r] for r in readers[op.id]]
            if rs and all((r.kind == "relu" and r.mask is None) or (r.kind == "add" and r.id in wide) for r in rs):
                wide.add(op.id)
    return wide


def _relu_complement(msg: dict, levels: int, s: dict, c: dict, i: str, n: int, drop: int = 0) -> None:
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
    if drop:  # the folded truncation: M = m >> drop (logical) and b = the top bit of m, each times r too
        M, b = (m >> drop) & ((1 << (64 - drop)) - 1), (m >> 63) & 1
        for name, value in zip(FOLD_NAMES, (M, r * M, b, r * b)):
            msg[f"{i}.{name}0"] = value - c[f"{i}.{name}1"]


# -- serialisation of the server message: one int64 buffer and one packed-bit buffer --------------

class PackedMessage:
    """One party's per-query message from the dealer, written in place: one buffer, the int64 rings of
    `spec` then its bits, which is what the party receives. `msg[key] = value` copies a tensor (or
    writes an FSS key) into its slot, so that the dealer holds each correlation once, in the buffer it
    sends; every slot must be written once before the buffer goes out (`check_complete`)."""

    def __init__(self, spec):
        n_ring, n_bits = message_sizes(spec)
        self.buffer = torch.empty(8 * n_ring + n_bits, dtype=torch.uint8)
        self.rings, self.bits = self.buffer[:8 * n_ring].view(torch.int64), self.buffer[8 * n_ring:]
        self._slots = unpack_message(spec, self.rings, self.bits)
        self._unwritten = set(self._slots)

    def __setitem__(self, key: str, value) -> None:
        slot = self._slots[key]
        if isinstance(value, fss.DcfKey):
            fss.write_key(value, slot.numpy())
        else:
            slot.copy_(value.reshape(slot.shape))
        self._unwritten.discard(key)

    def check_complete(self) -> None:
        if self._unwritten:  # an unwritten slot would send whatever the allocator left there
            raise AssertionError(f"dealer message slots never written: {', '.join(sorted(self._unwritten)[:4])}")


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
