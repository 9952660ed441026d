"""The fast engine's cost model: which ReLU protocol answers a query sooner on a given link.

Per query of one image, for each protocol, from the public plan alone (`protocol_costs`):

    online_s = rounds * (rtt / 2 + local turnaround)  +  max(bytes each way) / rate  +  ReLU compute

(+ the linear layers' compute, the same under both protocols and left out).

Rounds and bytes are exact counts of the protocol (the engine's tests assert the same counts against
its channels): a round is one flight of messages (`secure.core.channel.Channel`), so it costs one
one-way delay, rtt / 2. The compute terms are per-element constants measured on this project's
2-core development VM (docs/RESULTS.md, "ReLU protocols"): the gmw ReLU's bit-sliced carry tree is
cheap per element but pays a local turnaround per round; the FSS ReLU's DCF evaluation walks
fss_bits - 1 AES levels per element. The model predicts the ReLUs and the link, not the linear layers. The linear layers cost the same under both protocols, so they do
not enter the choice. `resolve_relu_protocol("auto", ...)` picks the smallest predicted time among the
protocols that are faithful for the plan (no truncation wrap garbles an image but with probability at most
2^-40: gmw and fss where every truncation folds into a ReLU's opening, fss-exact with its gates), and
among all of them only if none is."""

from __future__ import annotations

import math
from dataclasses import dataclass

from secure.core.correlations import FSS_BITS, LINEAR_OPS, Layout, ReluParams, offline_known
from secure.core.party import RELU_CHOICES, RELU_PROTOCOLS
from secure.core.plan import PublicPlan
from secure.core.ring import ACT_BITS, WEIGHT_BITS, packed_size

# Fitted on localhost, a quiet 2-core VM, medians of 5 runs of the shipped plan and the full ResNet18 under
# both protocols (docs/RESULTS.md "ReLU protocols", `python scripts/relu_protocol_costs.py`): the gmw terms
# to its ReLU layers' time, the fss terms to the difference in whole online time between the protocols
# (an FSS run also slows the linear layers around it: three processes share two cores).
LOCAL_S_PER_ROUND = 0.7e-3  # a round's turnaround on localhost (TLS records, wake-ups), either protocol
GMW_S_PER_ELEMENT = 0.07e-6  # the carry tree and multiplexer over bit planes, per ReLU element
FSS_S_PER_LEVEL = 0.052e-6  # DCF evaluation and the combine, per element and level (w - 1 levels)
FSS_S_PER_RUN = 3.8e-3  # per run of the FSS ReLU or gate: buffers, conversions, both parties' turns
# auto's bar for a protocol on a plan: a truncation wrap garbles at most one image in 2^40 (`faithful`)
FAITHFUL_BOUND = 2.0 ** -40


@dataclass(frozen=True)
class ProtocolCost:
    protocol: str
    rounds: int
    client_bytes: int  # client -> server, online
    server_bytes: int  # server -> client, online
    relu_elements: int
    compute_s: float

    def online_s(self, rtt_s: float = 0.0, rate_bps: float | None = None) -> float:
        wire = 0.0 if not rate_bps else 8 * max(self.client_bytes, self.server_bytes) / rate_bps
        return self.rounds * (rtt_s / 2 + LOCAL_S_PER_ROUND) + wire + self.compute_s


def protocol_costs(public: PublicPlan, batch: int = 1) -> dict[str, ProtocolCost]:
    """The online rounds, bytes and ReLU compute of one query of `batch` images, per protocol."""
    return {p: query_cost(public, p, batch) for p in RELU_PROTOCOLS}


def query_cost(public: PublicPlan, protocol: str, batch: int = 1) -> ProtocolCost:
    """One query's online cost under `protocol` (gmw, fss, or fss-exact with truncation gates): one
    round per ReLU run (fss) or 2 + log2(relu_bits) (gmw), one per truncation gate unless it rides a
    ReLU's exchange (`correlations.gate_riders`); the client's X1 - B
    for a linear layer whose input it cannot know before the query, one round unless its previous step
    was such a message too; the reveal. Bytes: 4 per element and direction for an FSS opening, the
    gmw planes (`_gmw_bytes`), 8 per element of X1 - B and of the logits."""
    relu = ReluParams()
    layout = Layout.for_protocol(public.ops, public.tensor_shapes, relu, protocol)
    ops, known = public.ops, offline_known(public.ops, layout.gates)
    rounds, sent, received, sending, elements, runs = 1, 0, 8 * batch * math.prod(ops[-1].shape), False, 0, 0
    fss = layout.protocol == "fss"
    per_run = 1 if fss else 2 + len(relu.levels)
    riding = {g for gs in layout.riders.values() for g in gs}
    for op in ops[1:]:
        if op.id in riding:
            continue  # ran with an earlier ReLU (counted there)
        for g in layout.riders.get(op.id, ()):  # before that ReLU's exchange: the riders' X1 - B
            if not known[ops[g].inputs[0]]:
                rounds += not sending
                sending = True
                sent += 8 * batch * math.prod(ops[ops[g].inputs[0]].shape)
        if op.kind in LINEAR_OPS and not known[op.inputs[0]]:
            rounds += not sending  # the client's X1 - B; consecutive ones travel as one message
            sending = True
            sent += 8 * batch * math.prod(ops[op.inputs[0]].shape)
        for _, n in layout.relu_sites(op, batch) + layout.gate_sites(op, batch):
            rounds += per_run
            runs += 1
            each_way = 4 * n if fss else _gmw_bytes(relu, n)
            sent, received, elements, sending = sent + each_way, received + each_way, elements + n, False
        for g in layout.riders.get(op.id, ()):  # in the same exchange: bytes and DCF work, no round
            n = batch * math.prod(ops[g].shape)
            runs, sent, received, elements = runs + 1, sent + 4 * n, received + 4 * n, elements + n
    compute = (elements * FSS_S_PER_LEVEL * (layout.fss_bits - 1) + runs * FSS_S_PER_RUN if fss
               else elements * GMW_S_PER_ELEMENT)
    return ProtocolCost(protocol, rounds, sent, received, elements, compute)


def wrap_bound(public: PublicPlan, protocol: str) -> tuple[int, float]:
    """(elements, probability): the local truncations per image whose rare wrap can garble the logits
    (`correlations.harmful_truncations`), and the bound on that happening for one image, each element
    failing with probability |v| / 2^64 < 2^(fss_bits - 1 + WEIGHT_BITS - 64) for |v| inside the window
    (|x| < 128 at the default, docs/PROTOCOL.md "Faithful truncation")."""
    from secure.core.correlations import harmful_truncations
    layout = Layout.for_protocol(public.ops, public.tensor_shapes, ReluParams(), protocol)
    elements = sum(harmful_truncations(public.ops, layout.protocol, layout.wide, layout.gates).values())
    return elements, elements * 2.0 ** (layout.fss_bits - 1 + WEIGHT_BITS - 64)


def _gmw_bytes(relu: ReluParams, n: int) -> int:
    """One party's bytes in one gmw ReLU run over n elements: round 1's bit planes and x - m, three planes
    per pair at each carry level (two at the last), the multiplexer's plane."""
    planes = relu.relu_bits + sum(3 * p for p in relu.levels[:-1]) + 2 * relu.levels[-1] + 1
    return planes * packed_size(n) + 8 * n


def fss_window_problem(public: PublicPlan, fss_bits: int = FSS_BITS) -> str | None:
    """Why the fss protocols cannot run this plan, or None: the FSS ReLU reads a w-bit window, so its
    inputs must stay below 2^(w - 1 - ACT_BITS) = 128 in magnitude. A plan exported with calibration
    images records the largest activation it saw (`spec["value_range"]`, `secure.core.export`); one
    that records none is not checked (documented: docs/DEPLOY.md)."""
    seen = public.spec.get("value_range")
    window = 2.0 ** (fss_bits - 1 - ACT_BITS)
    if seen is not None and float(seen) >= window:
        return (f"the plan's activations reach {float(seen):.4g} on its calibration images, beyond the fss ReLU's "
                f"window ({window:g}): run it with --relu-protocol gmw")
    return None


def resolve_relu_protocol(choice: str, public: PublicPlan, rtt_s: float = 0.0, rate_bps: float | None = None,
                          offered: tuple[str, ...] = RELU_PROTOCOLS) -> str:
    """A concrete protocol: `choice` itself, or for "auto" the faithful one (`faithful`: no truncation
    wrap can garble an image, but with probability at most FAITHFUL_BOUND) with the smallest predicted
    online time for one image on a link of round trip `rtt_s` and rate `rate_bps` (None: unlimited),
    among the server's `offered` protocols; if none of them is faithful for this plan, the fastest. Never
    an fss one for a plan whose recorded activations leave its window."""
    if choice not in RELU_CHOICES:
        raise ValueError(f"unknown ReLU protocol {choice!r}: one of {', '.join(RELU_CHOICES)}")
    if choice != "auto":
        return choice
    runnable = [p for p in offered if p == "gmw" or fss_window_problem(public) is None]
    if not runnable:
        raise ValueError(f"the server runs only {', '.join(offered)}: {fss_window_problem(public)}")
    candidates = [p for p in runnable if faithful(public, p)] or runnable
    costs = protocol_costs(public)
    return min(candidates, key=lambda p: (costs[p].online_s(rtt_s, rate_bps), RELU_PROTOCOLS.index(p)))


def faithful(public: PublicPlan, protocol: str) -> bool:
    """Whether `protocol` keeps the chance that a local truncation's wrap garbles an image of this plan
    at most FAITHFUL_BOUND (`wrap_bound`)."""
    return wrap_bound(public, protocol)[1] <= FAITHFUL_BOUND
