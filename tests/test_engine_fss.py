"""The fast engine's FSS ReLU (`relu_protocol="fss"`, docs/PROTOCOL.md "FSS ReLU"): secure logits against
plaintext on every op kind that runs the ReLU (relu, masked relu, max pool), the ReLU at the edges of
its window, rounds and bytes counted by hand (one round per ReLU run), the dealer's keys as offline
traffic with their exact size, streamed one query at a time, and the truncation folded into the
opening: exact where local truncation fails (shares chosen so that it fails nearly always)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from secure.core import fss
from secure.core.correlations import FSS_BITS, FSS_PAYLOAD, Layout, ReluParams, _fss_keys, tournament
from secure.core.costmodel import faithful, protocol_costs, query_cost, resolve_relu_protocol, wrap_bound
from secure.core.engine import EngineConfig, fss_combine, fss_open, fss_truncate, gmw_folded_output
from secure.core.party import DealerLimits, Role
from secure.core.plan import SecurePlan
from secure.core.ring import ACT_BITS, WEIGHT_BITS, truncate_share
from support.parties import run_session
from deepreduce.checkpoint import random_checkpoint
from deepreduce.spec import ModelSpec
from secure.core.export import plan_from_checkpoint
from test_engine import (BATCHES, RESOLUTION, TINY, assert_clean, assert_matches_plaintext, client_logits, images,
                         relu_probe_plan)
from test_engine_ops import IMAGE, ZOO, online, traced

FSS = EngineConfig(server_threads=1, relu_protocol="fss")


@pytest.fixture(scope="module")
def relu_plan() -> SecurePlan:
    """test_engine's plan with every ReLU kept (9 ReLU layers, 2,432 ReLUs per image)."""
    return plan_from_checkpoint(random_checkpoint(ModelSpec(**TINY), seed=4))
WINDOW = 2.0 ** (FSS_BITS - 1 - ACT_BITS)  # |x| < 128: the FSS ReLU's exact range at ACT_BITS


def hand_rounds_and_bytes(plan: SecurePlan, batch: int, protocol: str = "fss") -> tuple[int, int, int]:
    """Per query, the cost model's counts (`secure.core.costmodel.query_cost`, which these tests hold to
    the engine's channels): (rounds, client sent, client received)."""
    c = query_cost(plan.public_info(), protocol, batch)
    return c.rounds, c.client_bytes, c.server_bytes


def test_fss_relu_near_zero_and_at_the_edges_of_its_window():
    """A ReLU of the image itself: its input is at ACT_BITS (nothing to truncate), so the opening is
    exact and the output must be ReLU of the encoded input exactly, over the whole window |x| < 128."""
    edges = torch.tensor([0.0, RESOLUTION, -RESOLUTION, 3 * RESOLUTION, -3 * RESOLUTION, 0.5, -0.5, 37.25, -37.25,
                          WINDOW - RESOLUTION, -(WINDOW - RESOLUTION), -WINDOW], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    spread = torch.randint(-2 ** 19, 2 ** 19, (116,), generator=g).double() * RESOLUTION
    values = torch.cat([edges, spread])  # 128 per image
    x = torch.stack([values, values.flip(0), values[torch.randperm(len(values), generator=g)]]).view(3, -1, 1, 1)
    plan = relu_probe_plan(len(values))
    session = run_session(plan, [x[:2], x[2:]], config=FSS)
    assert_clean(session)
    encoded = torch.round(x.view(3, -1) / RESOLUTION)
    assert torch.equal(client_logits(session), encoded.clamp(min=0) * RESOLUTION)


def test_fss_matches_plaintext_with_hand_counted_rounds_and_bytes(relu_plan):
    x = images(relu_plan, seed=6)
    session = run_session(relu_plan, x, config=FSS)
    assert_clean(session)
    assert_matches_plaintext(relu_plan, torch.cat(x), client_logits(session))
    want = [hand_rounds_and_bytes(relu_plan, b) for b in BATCHES]
    rounds, sent, received = (sum(w[k] for w in want) for k in range(3))
    assert online(session) == (sent, received, rounds)
    assert online(session, Role.SERVER) == (received, sent, rounds)
    # 9 ReLU layers and 13 linear layers (3 of them shortcuts sent with their conv2): 10 + 9 + 1 a query,
    # at most 2 x (ReLU layers) + 4 (issue #25's target)
    assert rounds == len(BATCHES) * 20 <= len(BATCHES) * (2 * 9 + 4)
    gmw = run_session(relu_plan, x)
    assert online(gmw)[2] == len(BATCHES) * 74 and online(gmw)[0] > 2 * sent


@pytest.mark.parametrize("name", ["vgg", "resnet18-masked"])
def test_fss_runs_max_pools_and_masked_relus(name):
    plan = traced(ZOO[name](), IMAGE)
    x = images(plan, batches=[2, 1], seed=5)
    session = run_session(plan, x, config=FSS)
    assert_clean(session)
    assert_matches_plaintext(plan, torch.cat(x), client_logits(session))
    want = [hand_rounds_and_bytes(plan, len(b)) for b in x]
    assert online(session) == tuple(sum(w[k] for w in want) for k in (1, 2, 0))
    if name == "vgg":
        pools = [op for op in plan.ops if op.kind == "maxpool"]
        assert pools and sum(len(tournament(math.prod(op.kernel))) for op in pools) > len(pools)


def test_shipped_plan_in_fourteen_rounds_a_query():
    """The shipped 14,336-ReLU plan (6 ReLU layers): 6 exchanges, 6 X1 - B messages after them, the
    stem's and the reveal: 14 rounds a query (gmw: 50), inside the target 2 x 6 + 4 = 16."""
    plan = SecurePlan.load("demo/model.plan")
    x = images(plan, batches=[1, 2], seed=2)
    session = run_session(plan, x, config=FSS, timeout_s=30)
    assert_clean(session)
    assert_matches_plaintext(plan, torch.cat(x), client_logits(session))
    assert online(session)[2] == 2 * 14 == sum(hand_rounds_and_bytes(plan, len(b))[0] for b in x)


def test_dealer_keys_are_offline_traffic_of_their_exact_size(relu_plan):
    """The client's offline bytes from the dealer: its seed, then per query and ReLU run of n elements
    its shares of m, Rr, m Rr (3 x 8n) and its DCF key (`fss.key_size`); nothing from the dealer online."""
    x = images(relu_plan, seed=7)
    session = run_session(relu_plan, x, config=FSS)
    assert_clean(session)
    layout = Layout(relu_plan.ops, relu_plan.public_info().tensor_shapes, ReluParams(), protocol="fss")
    per_query = [sum(24 * n + fss.key_size(n, FSS_BITS - 1, FSS_PAYLOAD)
                     for op in relu_plan.ops for _, n in layout.relu_sites(op, b)) for b in BATCHES]
    assert session.hub.delivered(Role.DEALER, Role.CLIENT) == 32 + sum(per_query)
    # by hand for the first query (2 images), w - 1 = 19 levels of a 3-word payload: 16 header bytes;
    # per comparison a 16-byte seed, 24 of CW^(n+1), per level 16 + 24; 2 packed bits per level
    assert per_query[0] == sum(24 * n + 16 + n * (16 + 24 + 19 * (16 + 24)) + 2 * 19 * math.ceil(n / 8)
                               for n in [2 * op.relu_count for op in relu_plan.ops if op.kind == "relu"])


def test_dealer_holds_one_query_of_keys_at_a_time(relu_plan):
    """FSS keys are streamed query by query, so the dealer's cap on what it holds applies to one query:
    a cap between one query's keys and the session's total admits the session; below one query's it is
    refused with the reason, before any key is made."""
    x = images(relu_plan, seed=8)
    layout = Layout(relu_plan.ops, relu_plan.public_info().tensor_shapes, ReluParams(), protocol="fss")
    from secure.core.engine import _message_bytes
    sizes = [_message_bytes(layout, b) for b in BATCHES]
    ok = run_session(relu_plan, x, config=FSS, dealer_limits=DealerLimits(max_session_bytes=max(sizes) + 1))
    assert_clean(ok)
    assert max(sizes) + 1 < sum(sizes)
    refused = run_session(relu_plan, x, config=FSS, dealer_limits=DealerLimits(max_session_bytes=max(sizes) - 1))
    assert "--max-session-mb" in str(refused.errors[Role.DEALER])


def test_folded_truncation_is_exact_where_local_truncation_fails():
    """The magnifier: shares of x (at ACT_BITS + WEIGHT_BITS fractional bits, |x| < 64) split so that the
    client's share lies within |x| of the wrap point +-2^63, where local truncation of the shares
    (SecureML's, what the engine does on narrow values) fails for every element; its error is a multiple of
    2^(64 - WEIGHT_BITS), which the FSS window and the 48-bit reveal do not read. The FSS ReLU, fed the
    untruncated x, returns ReLU(x >> WEIGHT_BITS) to one unit for every element, with real DCF keys."""
    g = torch.Generator().manual_seed(3)
    n, w, drop = 4096, FSS_BITS, WEIGHT_BITS
    x = torch.randint(-2 ** 34, 2 ** 34, (n,), generator=g)  # |x| < 2^34: |value| < 64 at 28 bits
    offset = (torch.rand(n, generator=g) * x.abs()).long()  # in [0, |x|)
    x1 = torch.where(x >= 0, -2 ** 63 + offset, (2 ** 63 - 1) - offset)
    x0 = x - x1
    local = truncate_share(x0, drop, 0) + truncate_share(x1, drop, 1) - (x >> drop)
    wrapped = local.abs() > 1
    assert wrapped.float().mean() > 0.99  # magnified: uniform shares fail with probability ~|x| / 2^64
    assert torch.all(((local[wrapped] + 1) % (1 << (64 - drop))).abs() <= 2)  # a multiple of 2^48, to one unit
    s = {"k.r": torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), generator=g),
         **{f"k.{name}": torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), generator=g) for name in ("m0", "R0", "mR0")}}
    c = {"k.r": torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), generator=g)}
    to_server, to_client = {}, {}
    _fss_keys(to_server, to_client, s, c, "k", drop, w)
    h0, h1 = fss_open(x0, s["k.r"], drop, w, 0), fss_open(x1, c["k.r"], drop, w, 1)
    X = (h0.long() + h1.long()) & ((1 << w) - 1)
    u = (X & ((1 << (w - 1)) - 1)).numpy().view(np.uint64)
    keys = [fss.from_bytes(fss.to_bytes(to_server["k.k0"])), fss.from_bytes(fss.to_bytes(to_client["k.k1"]))]
    t = [torch.from_numpy(fss.eval(j, keys[j], u).view(np.int64)) for j in (0, 1)]
    y0 = fss_combine(0, X, t[0], s["k.m0"], s["k.R0"], s["k.mR0"], w)
    y1 = fss_combine(1, X, t[1], to_client["k.m1"], to_client["k.R1"], to_client["k.mR1"], w)
    want = (x.double() / 2 ** drop).clamp(min=0)  # to 1.5 units, without bias (the opening's rounding)
    error = (y0 + y1).double() - want
    assert error.abs().max().item() < 1.5 and abs(error[x > 2 ** 20].mean().item()) < 0.05


def test_wrap_risk_of_the_shipped_plan_by_hand():
    """Which local truncations can garble the logits (`wrap_bound`), counted by hand on the shipped plan
    (20 linear layers before the fc; per image 8,192 / 4,096 / 2,048 / 1,024 outputs per layer in stages
    1-4). Both protocols fold the truncation of the 6 convs before a ReLU into its opening. gmw: every
    other one can garble (nothing drops a wrap's error): the stem and 4 stage-1 convs, then per stage
    2-4 conv2, the shortcut and the second block's conv2: 5 x 8,192 + 3 x (4,096 + 2,048 + 1,024) = 62,464.
    fss: a wrap's error is a multiple of 2^48, dropped at the next ReLU window or the 48-bit reveal unless
    a second local truncation comes first: the stem, the 4 stage-1 convs, and per stage 2-3 the three
    convs that feed the next stage's shortcut through the residual stream: 5 x 8,192 + 3 x 4,096 +
    3 x 2,048 = 59,392. With exact truncation: none."""
    public = SecurePlan.load("demo/model.plan").public_info()
    assert wrap_bound(public, "gmw")[0] == 5 * 8192 + 3 * (4096 + 2048 + 1024) == 62_464
    assert wrap_bound(public, "fss")[0] == 5 * 8192 + 3 * 4096 + 3 * 2048 == 59_392
    assert wrap_bound(public, "fss-exact") == (0, 0.0)
    full = plan_from_checkpoint(random_checkpoint(ModelSpec(**TINY), seed=4)).public_info()
    for protocol in ("gmw", "fss"):  # every truncation is folded into a ReLU's opening
        assert wrap_bound(full, protocol) == (0, 0.0)


def test_exact_truncation_gates_on_the_shipped_plan():
    """Gates where a second local truncation would follow a first (hand: the conv1 of both stage-1 blocks,
    which read the stem's and the first block's truncated outputs, and the shortcut convs of stages 2-4,
    which read the residual stream). A stage-1 gate costs one exchange, and the next linear layer's X1 - B
    then goes online: 2 rounds each. A shortcut's gate rides its block's conv1 ReLU (one exchange for
    both), and the X1 - B of the conv after the block's add goes with that of the block's conv2: no round.
    14 + 2 x 2 = 18 rounds a query; secure == plaintext."""
    plan = SecurePlan.load("demo/model.plan")
    layout = Layout.for_protocol(plan.ops, plan.public_info().tensor_shapes, ReluParams(), "fss-exact")
    assert sorted(plan.ops[i].name for i in layout.gates) == ["s1.b1.conv1", "s1.b2.conv1", "s2.b1.shortcut",
                                                               "s3.b1.shortcut", "s4.b1.shortcut"]
    riders = {plan.ops[r].name: [plan.ops[g].name for g in gs] for r, gs in layout.riders.items()}
    assert riders == {f"s{k}.b1.r1": [f"s{k}.b1.shortcut"] for k in (2, 3, 4)}, riders
    x = images(plan, batches=[2], seed=3)
    session = run_session(plan, x, config=EngineConfig(server_threads=1, relu_protocol="fss-exact"), timeout_s=30)
    assert_clean(session)
    assert_matches_plaintext(plan, torch.cat(x), client_logits(session))
    assert online(session)[2] == 18 == hand_rounds_and_bytes(plan, 2, "fss-exact")[0]
    assert online(session)[:2] == hand_rounds_and_bytes(plan, 2, "fss-exact")[1:]


def test_gate_truncates_exactly_where_local_truncation_fails():
    """The gate's local step (`fss_truncate`) with real keys, on the magnifier's shares (see above):
    x >> WEIGHT_BITS to one unit for every element, signed values over the window."""
    g = torch.Generator().manual_seed(4)
    n, w, drop = 4096, FSS_BITS, WEIGHT_BITS
    x = torch.randint(-2 ** 34, 2 ** 34, (n,), generator=g)
    offset = (torch.rand(n, generator=g) * x.abs()).long()
    x1 = torch.where(x >= 0, -2 ** 63 + offset, (2 ** 63 - 1) - offset)
    x0 = x - x1
    assert ((truncate_share(x0, drop, 0) + truncate_share(x1, drop, 1) - (x >> drop)).abs() > 1).float().mean() > 0.99
    rand = lambda: torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), generator=g)  # noqa: E731
    s, c = {"k.r": rand(), "k.m0": rand(), "k.R0": rand()}, {"k.r": rand()}
    to_server, to_client = {}, {}
    _fss_keys(to_server, to_client, s, c, "k", drop, w, gate=True)
    assert "k.mR1" not in to_client
    X = (fss_open(x0, s["k.r"], drop, w, 0).long() + fss_open(x1, c["k.r"], drop, w, 1).long()) & ((1 << w) - 1)
    u = (X & ((1 << (w - 1)) - 1)).numpy().view(np.uint64)
    keys = [fss.from_bytes(fss.to_bytes(to_server["k.k0"])), fss.from_bytes(fss.to_bytes(to_client["k.k1"]))]
    t = [torch.from_numpy(fss.eval(j, keys[j], u).view(np.int64)).view(n, 2) for j in (0, 1)]
    y = fss_truncate(0, X, t[0], s["k.m0"], s["k.R0"], w) + fss_truncate(1, X, t[1], to_client["k.m1"],
                                                                          to_client["k.R1"], w)
    error = y.double() - x.double() / 2 ** drop  # to 1.5 units, without bias
    assert error.abs().max().item() < 1.5 and abs(error.mean().item()) < 0.05


def test_auto_weighs_rounds_bytes_and_compute():
    """`auto` (secure.core.costmodel): the cost model's rounds and bytes are the engine's (asserted above);
    among the protocols faithful for the plan, on a slow link the one with fewer rounds wins, on localhost
    the one with less ReLU compute. The shipped plan's ReLU-free first stage leaves gmw and fss with local
    truncations at risk (bound 1.2e-4 per image): auto runs fss-exact there, on any link."""
    shipped = SecurePlan.load("demo/model.plan").public_info()
    costs = protocol_costs(shipped)
    assert (costs["gmw"].rounds, costs["fss"].rounds, costs["fss-exact"].rounds) == (50, 14, 18)
    assert costs["fss"].compute_s > costs["gmw"].compute_s  # 19 AES levels a ReLU against a carry tree
    assert [faithful(shipped, p) for p in ("gmw", "fss", "fss-exact")] == [False, False, True]
    assert resolve_relu_protocol("auto", shipped) == resolve_relu_protocol("auto", shipped, rtt_s=0.1) == "fss-exact"
    full = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=1.0), seed=0)).public_info()
    assert all(faithful(full, p) for p in ("gmw", "fss", "fss-exact"))  # every truncation folds into a ReLU
    assert resolve_relu_protocol("auto", full) == "gmw"  # 557,056 ReLUs of compute, no link to save on
    assert resolve_relu_protocol("auto", full, rtt_s=0.1) == "fss"  # 102 rounds fewer: 5 s less waiting
    for choice in ("gmw", "fss", "fss-exact"):
        assert resolve_relu_protocol(choice, full) == choice
    with pytest.raises(ValueError, match="unknown ReLU protocol"):
        resolve_relu_protocol("fast", full)


def test_fss_refuses_a_plan_whose_activations_leave_its_window(relu_plan):
    """A plan exported with calibration images records its largest activation (`spec["value_range"]`): at
    or beyond the fss window (128) auto never picks fss, and a session asked to run fss is refused by
    both parties with the reason, before anything is opened."""
    spec = {**relu_plan.spec, "value_range": 200.0}
    wide = SecurePlan(relu_plan.ops, relu_plan.tensors, relu_plan.input_shape, relu_plan.classes, relu_plan.mean,
                      relu_plan.std, spec, relu_plan.relu_count)
    assert resolve_relu_protocol("auto", relu_plan.public_info(), rtt_s=1.0) == "fss"
    assert resolve_relu_protocol("auto", wide.public_info(), rtt_s=1.0) == "gmw"
    session = run_session(wide, images(wide, batches=[1]), config=FSS)
    for role in (Role.SERVER, Role.CLIENT):
        assert "beyond the fss ReLU's window (128): run it with --relu-protocol gmw" in str(session.errors[role])


def test_gmw_folds_the_truncation_into_its_multiplexer_exactly():
    """gmw's ReLU of a wide input (`gmw_folded_output`): from the public F = x - m (round 1's opening) and
    e = d ^ r, the dealer's shares of r, M = m >> 16, r M, b = msb(m), r b give d (x >> 16) to one unit
    for every m, including the masks where F + m wraps around 2^64 (about half of them for negative x),
    i.e. without the local truncation that fails on the magnifier's shares above."""
    g = torch.Generator().manual_seed(5)
    n, drop = 8192, WEIGHT_BITS
    rand = lambda: torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), generator=g)  # noqa: E731
    x = torch.randint(-2 ** 34, 2 ** 34, (n,), generator=g)
    m = rand()
    F = x - m
    d = (x >= 0).long()
    r = torch.randint(0, 2, (n,), generator=g)
    e = d ^ r
    M, b = (m >> drop) & ((1 << (64 - drop)) - 1), (m >> 63) & 1
    shares = {}
    for name, value in (("r", r), ("M", M), ("rM", r * M), ("b", b), ("rb", r * b)):
        other = rand()
        shares[name] = (value - other, other)
    y = sum(gmw_folded_output(j, e, F, *(shares[k][j] for k in ("r", "M", "rM", "b", "rb")), drop) for j in (0, 1))
    assert ((F.double() + m.double()) != x.double()).any()  # some masks do wrap
    error = y.double() - d * x.double() / 2 ** drop  # to one unit, without bias
    assert error.abs().max().item() <= 1 and abs(error[d == 1].mean().item()) < 0.05
