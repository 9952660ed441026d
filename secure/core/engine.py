"""The fast two-party engine: dealer-assisted linear layers with a reused weight mask, a bit-packed
ReLU, and an offline/online split.

Ranks as in `secure.core.runtime`: server 0 (weights), client 1 (images), dealer 2. Values are additive
shares in Z_2^64 (`secure.core.ring`), activations with ACT_BITS fractional bits, weights WEIGHT_BITS.

Session (offline, before any input is used):
  1. server and client check they run the same plan, batches and parameters;
  2. the dealer draws two seeds: prg_s for the server, prg_c for the client (`secure.core.correlations`);
  3. the server opens E_l = W_l - A_l for every linear layer to the client: once per session;
  4. per query, the dealer sends the server its complement of the correlations; the client derives
     its part from prg_c, computes its output share of every linear layer (E_l * B + C1, no input
     needed) and sends the server X1 - B for each linear layer whose input share it already knows.

Online, per query:
  linear   the client sends X1 - B (unless sent offline); the server computes W * (X - B) + C0 + bias
           with one exact float64 limb convolution pass; the client does nothing. 0 or 1 round.
  relu     sign of x from bits [drop, drop + L] of the shares: a carry tree over bit-packed shares
           (1 + log2 L rounds), then one round that turns the sign bit into x * sign (7 rounds for L = 32).
           A masked relu runs this on its kept positions only; the others pass through untouched.
  maxpool  max(a, b) = a + ReLU(b - a), a tournament over each window: ceil(log2 k) ReLU runs of
           7 rounds for a k-element window, k - 1 comparisons per output.
  add, concat, reshape, scale, avgpool, avgpool2d   local (see `Party._local`; an average's division
           is folded into the next linear layers' weights where only linear layers read it).
  output   the server sends its share of the logits to the client (1 round).

``insecure_tfp``: no dealer; the server draws both seeds and could decrypt everything (benchmarks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from deepreduce.errors import ProjectError
from deepreduce.graph import Op, consumers
from secure.core import fss
from secure.core.channel import Channel, like
from secure.core.costmodel import fss_window_problem
from secure.core.correlations import (FSS_BITS, LINEAR_OPS, LOCAL_OPS, Layout, ReluParams, bias_name,
                                      dealer_messages, folded_pools, message_sizes, offline_known, party_randomness,
                                      record_correlation, tournament, unpack_message, weight_masks, weight_name)
from secure.core.party import RELU_PROTOCOLS, DealerLimits, Rendezvous, Role, SecureSessionError
from secure.core.plan import PublicPlan
from secure.core.profiling import LayerProfile, Profile
from secure.core.ring import (ACT_BITS, WEIGHT_BITS, Prg, encode, from_plane, linear_params, mul_public, plan_limbs,
                   pool_windows, prefer_channels_last, ring_linear, ring_linear_small, sum_pool2d, to_planes,
                   truncate_share)

SERVER, CLIENT, DEALER = Role.SERVER, Role.CLIENT, Role.DEALER
ENGINE_VERSION = 1
REVEAL_BITS = 64 - WEIGHT_BITS  # the logits are read modulo 2^REVEAL_BITS (`Party._reveal`)


class EngineError(ProjectError, RuntimeError):
    """The parties disagree or the plan cannot run on this engine."""


def _server_threads() -> int:
    default = min(2, os.cpu_count() or 1)
    return max(1, int(os.environ.get("DEEPREDUCE_SERVER_THREADS", default)))


@dataclass
class EngineConfig:
    relu: ReluParams = field(default_factory=ReluParams)
    relu_protocol: str = "gmw"  # one of secure.core.party.RELU_PROTOCOLS ("auto" is resolved before)
    fss_bits: int = FSS_BITS  # the FSS ReLU's window (secure.core.correlations)
    # Intra-op threads of the server's online convolutions (DEEPREDUCE_SERVER_THREADS, default 2): the
    # client and dealer wait meanwhile; on a machine busy with other work each parallel call can cost
    # ~15 ms more, so set 1 there.
    server_threads: int = field(default_factory=_server_threads)


# -- dealer ---------------------------------------------------------------------------------------

def serve_dealer(ch: Channel, limits: DealerLimits | None = None) -> dict:
    """Receive the public session description from the server, check it against `limits`, hand out
    seeds, send every query's correlations to the server, wait for the server's goodbye."""
    limits = limits or DealerLimits()
    (length,) = ch.recv(SERVER, [(torch.int64, 1)])
    limits.check_description(int(length))
    (raw,) = ch.recv(SERVER, [(torch.uint8, int(length))])
    desc = json.loads(bytes(raw.tolist()).decode())
    ops = [Op.from_dict(op) for op in desc["ops"]]
    layout = Layout.for_protocol(ops, desc["tensor_shapes"], ReluParams(desc["relu_bits"], desc["drop_bits"]),
                                 desc.get("relu_protocol", "gmw"), int(desc.get("fss_bits", FSS_BITS)))
    batches = [int(b) for b in desc["batch_sizes"]]
    stream = desc.get("stream")
    streamed = layout.protocol == "fss"
    per_query = [_message_bytes(layout, b) for b in batches]
    if stream:
        limits.check_stream(batches[0], int(stream["pool"]), per_query[0])
    else:
        limits.check_session(batches, max(per_query) if streamed else sum(per_query))
    seed_s, seed_c = os.urandom(32), os.urandom(32)
    ch.send(SERVER, [_seed_tensor(seed_s)])
    ch.send(CLIENT, [_seed_tensor(seed_c)])
    prg_s, prg_c = Prg(seed_s), Prg(seed_c)
    masks = weight_masks(prg_s, layout)
    if stream:
        return _serve_refills(ch, layout, masks, prg_s, prg_c, batches[0], float(stream["idle_s"]))
    wait = session_timeout(ch.timeout_s, len(batches))
    made_s = 0.0
    if streamed:
        # FSS keys are large (hundreds of bytes per ReLU): one query's at a time, made while the parties
        # work on the previous one; a flush waits until both parties have taken a query's keys.
        for q, batch in enumerate(batches):
            start = time.perf_counter()
            message = _dealer_query(layout, masks, prg_s, prg_c, q, batch)
            made_s += time.perf_counter() - start
            _send_query(ch, message, wait)
            del message
    else:
        # Everything first, so that the dealer never computes while the parties are online; the server
        # takes query q's message just before query q.
        start = time.perf_counter()
        messages = [_dealer_query(layout, masks, prg_s, prg_c, q, b) for q, b in enumerate(batches)]
        made_s = time.perf_counter() - start
        for message in messages:
            _send_query(ch, message, wait)
    ch.recv(SERVER, [(torch.uint8, 1)], timeout_s=wait)  # the server is done with us
    return {"bytes_sent": ch.traffic.sent, "bytes_received": ch.traffic.received, "relu_protocol": layout.protocol,
            "correlations_s": made_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _serve_refills(ch: Channel, layout: Layout, masks, prg_s: Prg, prg_c: Prg, batch: int, idle_s: float) -> dict:
    """A warm session (`secure.core.stream`): the server asks for n more queries' correlations whenever
    its pool has room (an int64 n; 0 ends the session) and the dealer makes and sends them in order, one
    query's at a time. Returns the traffic and the refill rate: queries made per second of the dealer's
    own compute."""
    made_s, q = 0.0, 0
    wait = ch.timeout_s + idle_s  # a request may follow the session's longest idle time
    while True:
        (n,) = ch.recv(SERVER, [(torch.int64, 1)], timeout_s=wait)
        n = int(n)
        if n <= 0:
            break
        if n > 1 << 20:
            raise EngineError(f"the server asked for {n} refills at once")
        for _ in range(n):
            start = time.perf_counter()
            message = _dealer_query(layout, masks, prg_s, prg_c, q, batch)
            made_s += time.perf_counter() - start
            _send_query(ch, message, wait)
            del message
            q += 1
    return {"bytes_sent": ch.traffic.sent, "bytes_received": ch.traffic.received, "relu_protocol": layout.protocol,
            "correlations_s": made_s, "queries": q, "refill_queries_per_s": q / made_s if made_s > 0 else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _send_query(ch: Channel, message, wait: float) -> None:
    to_server, to_client = message  # PackedMessage: each sent as the buffer it was written into
    ch.send(SERVER, [to_server.buffer], timeout_s=wait, handoff=True)
    if to_client is not None:
        ch.send(CLIENT, [to_client.buffer], timeout_s=wait, handoff=True)
        ch.flush(CLIENT, wait)
    ch.flush(SERVER, wait)


def _message_bytes(layout: Layout, batch: int) -> int:
    """The size of one query's correlations for both parties, from the layout alone (nothing allocated)."""
    rings, bits = message_sizes(layout.server_message_spec(batch))
    c_rings, c_bits = message_sizes(layout.client_message_spec(batch))
    return 8 * (rings + c_rings) + bits + c_bits


def session_timeout(timeout_s: float, queries: int) -> float:
    """The bound on waits for a peer that may be busy with a whole session's offline work."""
    return timeout_s * (queries + 1)




def _dealer_query(layout, masks, prg_s, prg_c, q, batch):
    """Query q's messages: (server's, client's or None), each packed as (rings, bytes)."""
    record_correlation("made", prg_s.seed, q)
    record_correlation("made", prg_c.seed, q)
    s = party_randomness(prg_s, SERVER, layout, q, batch)
    c = party_randomness(prg_c, CLIENT, layout, q, batch)
    return dealer_messages(layout, masks, s, c, batch)


def _seed_tensor(seed: bytes) -> torch.Tensor:
    return torch.tensor(list(seed), dtype=torch.uint8)


def _seed(t: torch.Tensor) -> bytes:
    return bytes(t.tolist())


# -- the two computing parties --------------------------------------------------------------------

@dataclass
class QueryResult:
    logits: torch.Tensor | None
    layers: list[LayerProfile]
    online_s: float
    offline_s: float


class Party:
    """One computing party of one session. Server: `plan` set; client: `images` per query."""

    def __init__(self, role: int, ch: Channel, public: PublicPlan, batch_sizes: list[int], config: EngineConfig,
                 insecure_tfp: bool, plan=None, stream_pool: int = 0, stream_idle_s: float = 0.0):
        """`stream_pool` > 0: a warm session (`secure.core.stream`) of open-ended queries of
        batch_sizes[0] images each, with that many queries prepared ahead."""
        _check_runs(public.ops)
        self.j, self.ch, self.public, self.batch_sizes = role, ch, public, batch_sizes
        self.stream_pool, self.stream_idle_s = stream_pool, stream_idle_s
        self.cfg, self.tfp, self.plan = config, insecure_tfp, plan
        self.layout = Layout.for_protocol(public.ops, public.tensor_shapes, config.relu, config.relu_protocol,
                                          config.fss_bits)
        self.fss = self.layout.protocol == "fss"
        if self.fss:
            problem = fss_window_problem(public, config.fss_bits)
            if problem:
                raise EngineError(problem)
        self.wide = self.layout.wide  # values the FSS ReLU truncates: kept untruncated until then
        self.ops = public.ops
        self.consumers = consumers(self.ops)
        self.gates = self.layout.gates
        self.riders = self.layout.riders  # gates opened in a ReLU's exchange (`correlations.gate_riders`)
        self._riding: list[tuple[int, torch.Tensor]] = []  # the current ReLU's riders: (op id, linear output)
        self.offline_known = offline_known(self.ops, self.gates)
        self.folded = folded_pools(self.ops)
        self.keep = _kept_positions(public)
        self.windows = {op.id: pool_windows(*self.ops[op.inputs[0]].shape[1:], op.kernel, op.stride, op.padding)
                        for op in self.ops if op.kind == "maxpool"}
        self.last = self.ops[-1].id
        self.wait = session_timeout(ch.timeout_s, len(batch_sizes))  # offline waits on busy peers
        if self.ops[-1].kind not in LINEAR_OPS:
            raise EngineError("the fast engine needs a plan that ends with a linear layer")

    # -- session set-up ----------------------------------------------------------------------
    def setup(self) -> None:
        self._agree()
        if self.j == SERVER:
            self._server_setup()
        else:
            self._client_setup()

    def _agree(self) -> None:
        c, h, w = self.public.input_shape
        mine = torch.tensor([int(self.public.plan_hash[:15], 16), len(self.batch_sizes), c, h, w,
                             self.cfg.relu.relu_bits, self.cfg.relu.drop_bits, ENGINE_VERSION, int(self.tfp),
                             RELU_PROTOCOLS.index(self.cfg.relu_protocol), self.cfg.fss_bits, self.stream_pool])
        (theirs,) = self.ch.exchange(1 - self.j, [mine], like([mine]))
        if not torch.equal(mine, theirs):
            raise EngineError(f"server and client disagree on the session (plan hash, query count, input shape, "
                              f"ReLU parameters, engine version, dealer mode, ReLU protocol and window, warm pool): "
                              f"{mine.tolist()} vs {theirs.tolist()}")
        sizes = torch.tensor(self.batch_sizes)
        (theirs,) = self.ch.exchange(1 - self.j, [sizes], like([sizes]))
        if not torch.equal(sizes, theirs):
            raise EngineError(f"server and client disagree on batch sizes: {sizes.tolist()} vs {theirs.tolist()}")

    def _server_setup(self) -> None:
        if self.tfp:
            seed_s, seed_c = os.urandom(32), os.urandom(32)
            self.ch.send(CLIENT, [_seed_tensor(seed_c)])
            self.prg_c_insecure = Prg(seed_c)
        else:
            desc = json.dumps({"ops": [op.to_dict() for op in self.ops], "tensor_shapes": self.public.tensor_shapes,
                               "batch_sizes": self.batch_sizes, "relu_bits": self.cfg.relu.relu_bits,
                               "drop_bits": self.cfg.relu.drop_bits, "relu_protocol": self.cfg.relu_protocol,
                               "fss_bits": self.cfg.fss_bits,
                               **({"stream": {"pool": self.stream_pool, "idle_s": self.stream_idle_s}}
                                  if self.stream_pool else {})}).encode()
            self.ch.send(DEALER, [torch.tensor([len(desc)])])
            self.ch.send(DEALER, [torch.frombuffer(bytearray(desc), dtype=torch.uint8)])
            (seed,) = self.ch.recv(DEALER, [(torch.uint8, 32)])
            seed_s = _seed(seed)
        self.prg_s = Prg(seed_s)
        self.masks = weight_masks(self.prg_s, self.layout)
        self.weights, self.biases, self.limbs = self._encode_weights()
        masked = [self.weights[i] - self.masks[i] for i in sorted(self.weights)]
        self.ch.send(CLIENT, masked)  # E = W - A, once per session
        self.weights_f64 = {i: w.to(torch.float64, memory_format=self.limbs[i].memory_format)
                            for i, w in self.weights.items()}  # exact: |w| << 2^53; converted once, not per query

    def _encode_weights(self):
        tensors, weights, biases, limbs = self.plan.tensors, {}, {}, {}
        for op in self.layout.linear_ops():
            i, w = op.id, tensors[weight_name(op)].double()
            source = self.ops[op.inputs[0]]
            if source.id in self.folded:  # fold the average's division into this layer
                w = w / _pool_divisor(self.ops, source)
            weights[i] = encode(w, WEIGHT_BITS)
            b = bias_name(op)
            if b is not None:
                biases[i] = encode(tensors[b].double(), ACT_BITS + WEIGHT_BITS)
            limbs[i] = plan_limbs(weights[i], op.kind, conv_groups=op.groups or 1)
            if op.kind == "conv" and prefer_channels_last(source.shape):
                limbs[i] = dataclasses.replace(limbs[i], channels_last=True)
        return weights, biases, limbs

    def _client_setup(self) -> None:
        (seed,) = self.ch.recv(SERVER if self.tfp else DEALER, [(torch.uint8, 32)])
        self.prg_c = Prg(_seed(seed))
        linear = sorted(op.id for op in self.layout.linear_ops())
        shapes = [self.public.tensor_shapes[weight_name(self.ops[i])] for i in linear]
        received = self.ch.recv(SERVER, [(torch.int64, math.prod(s)) for s in shapes])
        self.masked_weights = {i: t.view(*s) for i, t, s in zip(linear, received, shapes)}

    def _dealer_message(self, q: int, dealer_ch: Channel | None = None) -> dict:
        """Query q's correlations from the dealer (made by the server in TFP mode, which then sends the
        client its part); {} for a client that gets nothing (gmw). `dealer_ch`: the channel to the dealer
        when it is not `self.ch` (a warm session's preparation thread, `secure.core.stream`)."""
        batch = self.batch(q)
        spec = (self.layout.server_message_spec if self.j == SERVER else self.layout.client_message_spec)(batch)
        if not spec:
            return {}
        if self.tfp and self.j == SERVER:
            to_server, to_client = _dealer_query(self.layout, self.masks, self.prg_s, self.prg_c_insecure, q, batch)
            rings, bits = to_server.rings, to_server.bits
            if to_client is not None:
                self.ch.send(CLIENT, [to_client.buffer], timeout_s=self.wait, handoff=True)
        else:
            n_ring, n_bits = message_sizes(spec)
            rings, bits = (dealer_ch or self.ch).recv(SERVER if self.tfp else DEALER,
                                                      [(torch.int64, n_ring), (torch.uint8, n_bits)],
                                                      timeout_s=self.wait)
        msg = unpack_message(spec, rings, bits)
        for key in [k for k in msg if k.endswith((".k0", ".k1"))]:  # FSS keys: parsed once, not copied
            msg[key] = fss.from_bytes(msg[key].numpy())
        return msg

    def goodbye(self) -> None:
        if self.j == SERVER and not self.tfp:
            self.ch.send(DEALER, [torch.zeros(1, dtype=torch.uint8)])

    # -- one query ------------------------------------------------------------------------------
    def batch(self, q: int) -> int:
        """Query q's image count (a warm session's queries all have its one batch size)."""
        return self.batch_sizes[0] if self.stream_pool else self.batch_sizes[q]

    def query(self, q: int, images: torch.Tensor | None) -> QueryResult:
        start = time.perf_counter()
        self.ch.phase = "offline"
        mat = self.material(q)
        self._send_early(mat)
        offline_s = time.perf_counter() - start
        self.ch.exchange(1 - self.j, [torch.zeros(1, dtype=torch.uint8)], [(torch.uint8, 1)],  # start together
                         timeout_s=self.wait)
        self.ch.phase = "online"
        return self.online(q, mat, images, offline_s)

    def online(self, q: int, mat: dict, images: torch.Tensor | None, offline_s: float = 0.0) -> QueryResult:
        """Query q's online phase on its prepared material (`material` plus the client's early message)."""
        record_correlation("used", (self.prg_s if self.j == SERVER else self.prg_c).seed, q)
        start = time.perf_counter()
        layers, values = [], {}
        batch = self.batch(q)
        for op in self.ops:
            before = _snapshot(self.ch)
            t0 = time.perf_counter()
            if op.id not in values:  # a gated linear op that rode an earlier ReLU is done already
                self._riding = [(g, self._linear_output(self.ops[g], values[self.ops[g].inputs[0]], mat))
                                for g in self.riders.get(op.id, ())]
                values[op.id] = self._op(op, [values[i] for i in op.inputs], mat, batch, images)
                values.update(self._riding)  # each rider's truncated output, from the ReLU's exchange
                self._riding = []
            sent, received, rounds = _delta(self.ch, before)
            if op.kind != "input":  # a max pool's comparisons are their own kind, not ReLUs
                layers.append(LayerProfile(op.name, op.kind, time.perf_counter() - t0, sent, received, rounds,
                                           op.relu_count * batch, op.comparison_count * batch))
            for i in op.inputs:
                if max(self.consumers[i]) == op.id:
                    values.pop(i, None)
        before, t0 = _snapshot(self.ch), time.perf_counter()
        logits = self._reveal(values[self.last])
        layers.append(LayerProfile("output", "reveal", time.perf_counter() - t0, *_delta(self.ch, before), 0))
        self.ch.phase = "offline"
        return QueryResult(logits, layers, time.perf_counter() - start, offline_s)

    def material(self, q: int, dealer_ch: Channel | None = None, pause=None) -> dict:
        """Everything of query q that comes before its input, except the client's early message to the
        server (`_send_early`): this party's randomness, its dealer correlations and, on the client, its
        output share of every linear layer and the early message itself. Touches only the dealer link
        (through `dealer_ch` if given): a warm session runs it in a thread beside the online phase.
        `pause()`, if given, is called between layers (a warm session's refill policy waits there)."""
        batch = self.batch(q)
        if self.j == SERVER:
            return {"own": party_randomness(self.prg_s, SERVER, self.layout, q, batch),
                    "dealer": self._dealer_message(q, dealer_ch), "batch": batch}
        own = party_randomness(self.prg_c, CLIENT, self.layout, q, batch)
        mat = {"own": own, "outputs": {}, "early": {}, "dealer": self._dealer_message(q, dealer_ch), "batch": batch}
        known = {}
        for op in self.ops:  # the client's shares that do not depend on the input
            i = op.id
            if op.kind in LINEAR_OPS:
                if pause is not None:
                    pause()
                y = ring_linear(op.kind, self.masked_weights[i], own[f"{i}.B"], linear_params(op)) + own[f"{i}.C1"]
                known[i] = y if i == self.last or i in self.wide or i in self.gates else \
                    truncate_share(y, WEIGHT_BITS, CLIENT)
                mat["outputs"][i] = known[i]
                if self.offline_known[op.inputs[0]]:
                    mat["early"][i] = known[op.inputs[0]] - own[f"{i}.B"]
            elif op.kind in LOCAL_OPS and self.offline_known[i]:
                known[i] = self._local(op, [known[j] for j in op.inputs])
        return mat

    def early_ids(self) -> list[int]:
        """The linear layers whose input share the client knows before the query (its early message)."""
        return [op.id for op in self.layout.linear_ops() if self.offline_known[op.inputs[0]]]

    def _send_early(self, mat: dict) -> None:
        """The client's X1 - B of every linear layer in `early_ids` (one message); the server takes it."""
        if self.j == CLIENT:
            self.ch.send(SERVER, [mat["early"][i] for i in sorted(mat["early"])], timeout_s=self.wait)
            return
        ids = self.early_ids()
        shapes = [[mat["batch"], *self.layout.input_shape(self.ops[i])] for i in ids]
        got = self.ch.recv(CLIENT, [(torch.int64, math.prod(s)) for s in shapes], timeout_s=self.wait)
        mat["early"] = {i: t.view(*s) for i, t, s in zip(ids, got, shapes)}

    def _op(self, op, inputs, mat, batch, images):
        kind = op.kind
        if kind == "input":
            if self.j == CLIENT:
                return encode(images, ACT_BITS)
            return torch.zeros(batch, *op.shape, dtype=torch.long)
        if kind in LINEAR_OPS:
            return self._linear(op, inputs[0], mat)
        if kind == "relu":
            return self._masked_relu(op, inputs[0], mat)
        if kind == "maxpool":
            return self._maxpool(op, inputs[0], mat)
        if kind in LOCAL_OPS:
            return self._local(op, inputs)
        raise EngineError(f"the fast engine cannot run op {kind!r}")

    def _local(self, op, xs):
        """The ops each party applies to its own share, with no traffic. Values keep ACT_BITS
        fractional bits: `scale` multiplies by its factor (`mul_public`: exact for an integer, else
        fixed point and a local truncation) and only the server adds the offset; a pool sums its
        windows and divides by the window size (`mul_public` again) unless every reader is a linear
        layer, which then takes the division into its weights (`folded_pools`: the activations are
        not rounded, as for the classic global average pool)."""
        kind, x = op.kind, xs[0]
        if kind == "add":  # a wide add lifts a narrow input to its scale (exact: a shift of small values)
            if op.id in self.wide:
                x, y = [v if j in self.wide else v << WEIGHT_BITS for v, j in zip(xs, op.inputs)]
                return x + y
            return x + xs[1]
        if kind == "concat":
            return torch.cat(xs, dim=1)
        if kind == "reshape":
            return x.reshape(len(x), *op.shape)
        if kind == "scale":
            y = mul_public(x, op.factor, self.j)
            return y + encode(torch.tensor(op.offset), ACT_BITS) if self.j == SERVER else y
        y = x.sum(dim=(2, 3)) if kind == "avgpool" else sum_pool2d(x, op.kernel, op.stride, op.padding)
        return y if op.id in self.folded else mul_public(y, 1 / _pool_divisor(self.ops, op), self.j)

    def _linear(self, op, x, mat):
        y = self._linear_output(op, x, mat)
        if op.id in self.gates:
            return self._gate(f"{op.id}.g", y, mat)
        if self.j == CLIENT:
            return y
        return y if op.id == self.last or op.id in self.wide else truncate_share(y, WEIGHT_BITS, SERVER)

    def _linear_output(self, op, x, mat):
        """This party's share of a linear op's output before its truncation (the client's was computed
        before the query; only a gate or the server's local truncation follows)."""
        i = op.id
        if self.j == CLIENT:
            if i not in mat["early"]:
                self.ch.send(SERVER, [x - mat["own"][f"{i}.B"]])
            return mat["outputs"][i]
        if i in mat["early"]:
            masked = x + mat["early"][i]
        else:
            (got,) = self.ch.recv(CLIENT, [(torch.int64, x.numel())])
            masked = x + got.view_as(x)
        params = linear_params(op)
        torch.set_num_threads(self.cfg.server_threads)  # only here: the ReLU's small ops run best on one
        try:
            y = ring_linear_small(op.kind, self.weights_f64[i], masked, params, self.limbs[i])
        finally:
            torch.set_num_threads(1)
        y = y + mat["dealer"][f"{i}.C0"]
        if i in self.biases:
            b = self.biases[i]
            y = y + (b.view(1, -1, *([1] * (y.dim() - 2))))
        return y

    def _masked_relu(self, op, x, mat):
        """A relu op: the ReLU protocol on every position, or on the kept ones of a masked relu while
        the others keep their shares (no comparison, no traffic)."""
        keep = self.keep.get(op.id)
        if keep is None:
            return self._relu(str(op.id), x, mat, drop=self.layout.drop(op))
        flat = x.reshape(len(x), -1)
        out = flat.clone()
        out[:, keep] = self._relu(str(op.id), flat[:, keep], mat)
        return out.view_as(x)

    def _maxpool(self, op, x, mat):
        """The max of each window as a tournament, max(a, b) = a + ReLU(b - a): each level compares
        every window's pairs in one run of the ReLU protocol; an odd element waits a level. The
        windows (`pool_windows`) repeat a real element where torch pads with -inf."""
        n, c = x.shape[:2]
        t = x.reshape(n, c, -1)[:, :, self.windows[op.id]]  # N x C x outputs x kernel elements
        for level, pairs in enumerate(tournament(t.shape[-1])):
            a, b = t[..., 0: 2 * pairs: 2], t[..., 1: 2 * pairs: 2]
            t = torch.cat([a + self._relu(f"{op.id}.t{level}", b - a, mat), t[..., 2 * pairs:]], dim=-1)
        return t.reshape(n, *op.shape)

    def _relu(self, i, x, mat, drop: int = 0):
        """x * [x >= 0] for every element of x, by the session's ReLU protocol. `i`: the key of this
        run's correlations (`Layout.relu_sites`); `drop`: bits of x the FSS ReLU truncates exactly
        (its input is wide); the gmw ReLU gets narrow inputs only."""
        if self.fss:
            return self._relu_fss(i, x, mat, drop)
        return self._relu_gmw(i, x, mat, drop)

    def _relu_fss(self, i, x, mat, drop: int):
        """One round: open the window of x + r, evaluate the DCF key, combine locally (`fss_open`,
        `fss_combine`; PROTOCOL.md, "FSS ReLU"). The gates riding this ReLU (`self._riding`) open in
        the same exchange; their truncated outputs replace their linear outputs there."""
        riding, self._riding = self._riding, []
        opened = self._fss_open([(i, x, drop)] + [(f"{g}.g", y, WEIGHT_BITS) for g, y in riding], mat)
        self._riding = [(g, self._truncated(f"{g}.g", y, got, mat)) for (g, y), got in zip(riding, opened[1:])]
        X, t, shares = opened[0]
        return fss_combine(self.j, X, t, *(shares[f"{i}.{name}{self.j}"] for name in ("m", "R", "mR")),
                           self.cfg.fss_bits).view(x.shape)

    def _gate(self, i, y, mat):
        """Exact truncation of a linear output by WEIGHT_BITS: the FSS ReLU's opening without the ReLU
        (`fss_truncate`; PROTOCOL.md, "Faithful truncation")."""
        (got,) = self._fss_open([(i, y, WEIGHT_BITS)], mat)
        return self._truncated(i, y, got, mat)

    def _truncated(self, i, y, opened, mat):
        X, t, shares = opened
        return fss_truncate(self.j, X, t, shares[f"{i}.m{self.j}"], shares[f"{i}.R{self.j}"],
                            self.cfg.fss_bits).view(y.shape)

    def _fss_open(self, runs, mat):
        """The one round of FSS openings: for each (key, x, drop) both halves of the window of x + r, all
        in one exchange; per run the public X, this party's DCF outputs at X mod 2^(w-1), and where its
        shares of the dealer's values are."""
        j, w = self.j, self.cfg.fss_bits
        own, dealer = mat["own"], mat["dealer"]
        mine = [fss_open(x.reshape(-1), own[f"{i}.r"], drop, w, j) for i, x, drop in runs]
        theirs = self.ch.exchange(1 - j, mine, like(mine))
        out = []
        for (i, _, _), a, b in zip(runs, mine, theirs):
            X = (a.long() + b.long()) & ((1 << w) - 1)
            u = (X & ((1 << (w - 1)) - 1)).numpy().view(np.uint64)
            t = torch.from_numpy(fss.eval(j, dealer[f"{i}.k{j}"], u).view(np.int64))
            out.append((X, t, own if j == SERVER else dealer))  # the server's shares come from its seed
        return out

    def _relu_gmw(self, i, x, mat, drop: int):
        """The sign from a carry tree over packed bit planes, then one multiplexer round; a wide input's
        truncation by `drop` bits is folded into the multiplexer (`gmw_folded_output`)."""
        j, p = self.j, self.cfg.relu
        own, peer = mat["own"], 1 - self.j
        dealer = mat["dealer"]  # the server's dealer-made parts (the client's gmw parts all come from its seed)
        shape, flat = x.shape, x.reshape(-1)
        planes = to_planes(flat >> (p.drop_bits + drop), p.relu_bits + 1)
        a, msb = planes[: p.relu_bits], planes[p.relu_bits]
        opened = flat - own[f"{i}.m"]
        bits_out = a ^ own[f"{i}.mask"]
        theirs_bits, theirs_open = self.ch.exchange(peer, [bits_out, opened], like([bits_out, opened]))
        masked = opened + theirs_open  # x - m, known to both
        other = theirs_bits.view_as(a)
        if j == SERVER:  # a0 & (a1 ^ beta) ^ z0
            g = (a & other) ^ dealer[f"{i}.z0"]
        else:  # (a0 ^ alpha) & beta ^ z1
            g = (other & own[f"{i}.mask"]) ^ own[f"{i}.z1"]
        prop = a
        for level in range(len(p.levels)):
            g, prop = self._carry_level(i, level, g, prop, own, dealer)
        d = msb ^ g[0] ^ (0xFF if j == SERVER else 0)  # ReLU'(x) = NOT sign
        mine = d ^ own[f"{i}.r"][0]
        (theirs,) = self.ch.exchange(peer, [mine], like([mine]))
        e = from_plane(mine ^ theirs, flat.numel())  # d ^ r, public
        if drop:
            src, side = (dealer, "0") if j == SERVER else (own, "1")
            fold = [src[f"{i}.{name}{side}"] for name in ("rA", "M", "rM", "b", "rb")]
            return gmw_folded_output(j, e, masked, *fold, drop).view(shape)
        ra = dealer[f"{i}.rA0"] if j == SERVER else own[f"{i}.rA1"]
        rm = dealer[f"{i}.rm0"] if j == SERVER else own[f"{i}.rm1"]
        y = (1 - 2 * e) * (masked * ra + rm) + e * own[f"{i}.m"]
        if j == SERVER:
            y = y + e * masked
        return y.view(shape)

    def _carry_level(self, i, level, g, prop, own, dealer):
        """(G, P) plane pairs (lo, hi) -> G_hi ^ P_hi & G_lo, P_hi & P_lo with XOR-shared Beaver ANDs
        that share the mask of their common operand P_hi."""
        last = level == len(self.cfg.relu.levels) - 1
        key = f"{i}.l{level}"
        u, v1, v2 = own[f"{key}.u"], own[f"{key}.v1"], own[f"{key}.v2"]
        g_lo, g_hi, p_lo, p_hi = g[0::2], g[1::2], prop[0::2], prop[1::2]
        mine = torch.stack([p_hi ^ u, g_lo ^ v1] + ([] if last else [p_lo ^ v2]))
        (theirs,) = self.ch.exchange(1 - self.j, [mine], like([mine]))
        e, f1, *f2 = mine ^ theirs.view_as(mine)
        w = dealer if self.j == SERVER else own

        def AND(f, v, wk):
            z = (e & v) ^ (f & u) ^ w[f"{key}.{wk}"]
            return z ^ (e & f) if self.j == SERVER else z

        return g_hi ^ AND(f1, v1, "w1"), (None if last else AND(f2[0], v2, "w2"))

    def _reveal(self, y):
        if self.j == SERVER:
            self.ch.send(CLIENT, [y])
            return None
        (theirs,) = self.ch.recv(SERVER, [(torch.int64, y.numel())])
        s = y + theirs.view_as(y)
        if self.fss:  # the logits as signed 48-bit values (|logit| < 2^(47 - ACT_BITS - WEIGHT_BITS) = 2^19):
            # a local truncation's rare wrap error is a multiple of 2^(64 - WEIGHT_BITS) and vanishes here
            s = (s << (64 - REVEAL_BITS)) >> (64 - REVEAL_BITS)
        return s.double() / (1 << (ACT_BITS + WEIGHT_BITS))


def gmw_folded_output(j: int, e: torch.Tensor, F: torch.Tensor, r: torch.Tensor, M: torch.Tensor, rM: torch.Tensor,
                      b: torch.Tensor, rb: torch.Tensor, drop: int) -> torch.Tensor:
    """Party j's share of d (x >> drop) for the gmw ReLU of a wide input, exact to one unit: with the
    public F = x - m and e = d ^ r, x = F + m - 2^64 w (F, m unsigned), and for d = 1 (0 <= x < 2^62)
    the wrap is w = p or b (p, b: the top bits of F and m), so
        d (x >> drop) = d (F >> drop) + d M - 2^(64 - drop) (p ? d : d b)      (M = m >> drop)
    with [d] = e + (1 - 2e)[r], [d M] = e [M] + (1 - 2e)[r M], [d b] = e [b] + (1 - 2e)[r b] from the
    dealer's shares (r, M, r M, b, r b). The carry out of the low `drop` bits is unknown; adding 1
    instead makes the result x / 2^drop without bias, error in (-1, 1], as local truncation's is."""
    flip = 1 - 2 * e
    d = flip * r + (e if j == SERVER else 0)
    high = ((F >> drop) & ((1 << (64 - drop)) - 1)) + 1
    wrap = torch.where(F < 0, d, e * b + flip * rb)
    return high * d + e * M + flip * rM - (wrap << (64 - drop))


# -- the FSS ReLU's local steps ----------------------------------------------------------------------

def fss_open(x: torch.Tensor, r: torch.Tensor, drop: int, w: int, j: int = 0) -> torch.Tensor:
    """Party j's half of the opening: bits [drop, drop + w) of its share of x + r (int32). The sum of
    both halves mod 2^w is X = (x + r) >> drop mod 2^w, up to the carry out of the low bits; party 0
    adds half a unit first, so that Y = X - Rr is x / 2^drop without bias (error below 1.5 units), as
    local truncation's floor-plus-ceiling is."""
    half = (1 << (drop - 1)) if drop and j == SERVER else 0
    return (((x + r + half) >> drop) & ((1 << w) - 1)).to(torch.int32)


def fss_combine(j: int, X: torch.Tensor, t: torch.Tensor, m: torch.Tensor, R: torch.Tensor, mR: torch.Tensor,
                w: int) -> torch.Tensor:
    """Party j's share of ReLU(Y) for Y = X - Rr mod 2^w read as a signed w-bit value (= x >> drop, up to
    one unit in the last place). With c the top bit of the public X, t = [X mod 2^(w-1) < Rr mod 2^(w-1)]
    the DCF's comparison, m the top bit of Rr and d = [Y >= 0] = 1 ^ c ^ m ^ t:
        ReLU(Y) = d (X - Rr + 2^w [X < Rr]) = X [d] - [d Rr] + 2^w [d t_w]
        c = 0: [d] = (1 - [m]) - [b1 t], [d Rr] = [Rr] - [m Rr] - [b2 t], [d t_w] = [b3 t]
        c = 1: [d] = [m] + [b1 t],       [d Rr] = [m Rr] + [b2 t],       [d t_w] = 0
    where t = (b1 t, b2 t, b3 t) are this party's DCF outputs for the payload (1 - 2m, (1 - 2m) Rr, m)
    and m, R, mR its shares of m, Rr and m Rr. Exact in Z_2^64: no truncation, no second round."""
    one = 1 if j == SERVER else 0
    low = X * (one - m - t[:, 0]) - R + mR + t[:, 1] + (t[:, 2] << w)  # c = 0
    high = X * (m + t[:, 0]) - mR - t[:, 1]  # c = 1
    return torch.where((X >> (w - 1)).bool(), high, low)


def fss_truncate(j: int, X: torch.Tensor, t: torch.Tensor, m: torch.Tensor, R: torch.Tensor, w: int) -> torch.Tensor:
    """Party j's share of Y = X - Rr mod 2^w as a signed w-bit value lifted to Z_2^64 (= x >> drop, to one
    unit): Y = X - Rr + 2^w (t_w + d - 1) with t_w = [X < Rr] and d = [Y >= 0], which is
        c = 0: X - [Rr] + 2^w [m t]
        c = 1: X - [Rr] + 2^w ([m] - 1 + [(1 - m) t])
    for the DCF payload (m, 1 - m) (`fss_combine` has the names)."""
    one = 1 if j == SERVER else 0
    base = one * X - R
    return torch.where((X >> (w - 1)).bool(), base + ((m - one + t[:, 1]) << w), base + (t[:, 0] << w))


# Every kind this engine runs (LOCAL_OPS: what each party computes on its own share, `Party._local`).
FAST_KINDS = ("input", "relu", "maxpool") + LINEAR_OPS + LOCAL_OPS


def _check_runs(ops: list[Op]) -> None:
    """Refuse, at session start, a plan with ops this engine does not run yet (exported modules)."""
    problem = next(((op, op.kind) for op in ops if op.kind not in FAST_KINDS), None)
    if problem is not None:
        raise EngineError(f"the fast engine cannot run op {problem[0].name!r} ({problem[1]}) of this plan yet")


def _pool_divisor(ops: list[Op], op: Op) -> int:
    """The elements an average pool divides by: the whole map, or the window (padding included)."""
    return math.prod(ops[op.inputs[0]].shape[1:]) if op.kind == "avgpool" else math.prod(op.kernel)


def _kept_positions(public: PublicPlan) -> dict[int, torch.Tensor]:
    """Per masked relu op, the flat per-image positions that keep their ReLU (public architecture)."""
    keep = {}
    for op in public.ops:
        if op.kind == "relu" and op.mask is not None:
            if op.mask not in public.masks:
                raise EngineError(f"the public plan lacks the ReLU mask of op {op.name!r}: a server too old to send it")
            keep[op.id] = public.masks[op.mask].expand(op.shape).reshape(-1).nonzero().view(-1)
    return keep


def _snapshot(ch: Channel):
    t = ch.traffic
    return t.sent, t.received, t.rounds


def _delta(ch: Channel, before):
    t = ch.traffic
    return t.sent - before[0], t.received - before[1], t.rounds - before[2]


# -- a whole session ------------------------------------------------------------------------------

def run_party(role: int, ch: Channel, public: PublicPlan, batch_sizes: list[int], config: EngineConfig, insecure_tfp: bool,
              plan=None, images: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor] | None, Profile]:
    """Set up the session, run every query; returns the client's logits per query and a profile that
    sums the queries (online and offline split)."""
    start = time.perf_counter()
    party = Party(role, ch, public, batch_sizes, config, insecure_tfp, plan)
    party.setup()
    setup_s = time.perf_counter() - start
    results = [party.query(q, None if images is None else images[q]) for q in range(len(batch_sizes))]
    party.goodbye()
    profile = _combine(results, ch, setup_s, sum(batch_sizes), insecure_tfp)
    logits = None if role == SERVER else [r.logits for r in results]
    return logits, profile


def _combine(results: list[QueryResult], ch: Channel, setup_s: float, images: int, insecure_tfp: bool) -> Profile:
    layers = []
    for k, layer in enumerate(results[0].layers):  # same op order in every query: sum per layer
        same = [r.layers[k] for r in results]
        layers.append(LayerProfile(layer.name, layer.op, sum(x.seconds for x in same),
                                   sum(x.bytes_sent for x in same), sum(x.bytes_received for x in same),
                                   sum(x.rounds for x in same), sum(x.relu_count for x in same),
                                   sum(x.comparison_count for x in same)))
    profile = Profile.from_layers(layers, setup_s, images, insecure_tfp, engine="fast")
    offline = [ch.phases.get(name) for name in ("setup", "offline") if ch.phases.get(name)]
    return dataclasses.replace(profile, offline_s=setup_s + sum(r.offline_s for r in results),
                               offline_bytes=sum(t.sent + t.received for t in offline),
                               queries=len(results))


# -- the engine behind the party entry points (`secure.core.runtime`) ----------------------------

class FastEngine:
    """This project's dealer-assisted protocol; several queries (batches) per session."""
    name = "fast"

    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig()

    def run_server(self, plan, rdv: Rendezvous, batch_sizes: list[int], insecure_tfp: bool) -> Profile:
        _, profile = _run("server", rdv, plan.public_info(), batch_sizes, insecure_tfp, plan=plan, config=self.config)
        return profile

    def run_client(self, public: PublicPlan, batches: list[torch.Tensor], rdv: Rendezvous, insecure_tfp: bool):
        logits, profile = _run("client", rdv, public, [len(b) for b in batches], insecure_tfp,
                               images=[b.float() for b in batches], config=self.config)
        return torch.cat(logits), profile

    def run_dealer(self, rdv: Rendezvous, limits: DealerLimits) -> dict:
        return _run("dealer", rdv, None, None, False, limits=limits)


def _run(role: str, rdv: Rendezvous, public: PublicPlan | None, batch_sizes: list[int] | None, insecure_tfp: bool,
         plan=None, images: list[torch.Tensor] | None = None, limits: DealerLimits | None = None,
         config: EngineConfig | None = None):
    with session_channel(role, rdv, world=2 if insecure_tfp else 3) as channel:
        rank = Role[role.upper()]
        if rank == DEALER:
            return serve_dealer(channel, limits)
        logits, profile = run_party(rank, channel, public, batch_sizes, config or EngineConfig(), insecure_tfp, plan,
                                    images)
        profile.session_bytes_sent = sum(t.sent for t in channel.phases.values())
        profile.session_bytes_received = sum(t.received for t in channel.phases.values())
        if hasattr(channel, "wire_counts"):
            profile.wire_bytes_sent, profile.wire_bytes_received = channel.wire_counts()
        return logits, profile


@contextlib.contextmanager
def session_channel(role: str, rdv: Rendezvous, world: int):
    """This party's channel to its peers for one session (gloo for a Rendezvous, TLS links for a
    `secure.transport.meeting.Meeting`), closed at the end; a failure is a SecureSessionError naming the role."""
    torch.set_num_threads(1)  # the server raises its own count for the online convolutions
    try:
        channel = rdv.channel(Role[role.upper()], world=world)
    except Exception as exc:  # DistNetworkError, HandshakeError, ...: the peers did not all show up
        raise SecureSessionError(f"{role}: {rdv.where} failed within {rdv.timeout_s:g} s "
                                 f"({type(exc).__name__}: {exc})") from exc
    try:
        yield channel
    except SecureSessionError:
        raise
    except (RuntimeError, ValueError) as exc:  # gloo timeouts and resets are RuntimeErrors
        raise SecureSessionError(f"{role}: secure session failed ({type(exc).__name__}: {exc})") from exc
    finally:
        channel.close()
