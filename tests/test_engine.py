"""The fast engine (secure/core/engine.py) in one process: server, client and dealer as threads over
`InProcessHub` channels (tests/support/parties.py). Secure logits against plaintext PyTorch, the
ReLU at the edges of its window, several queries in one session, exact traffic and round counts,
and a mismatched client refused on both sides. The multi-process runs are in test_runtime.py."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from deepreduce.checkpoint import random_checkpoint
from deepreduce.graph import Op
from deepreduce.spec import ModelSpec
from secure.core.engine import EngineError
from secure.core.export import plan_from_checkpoint
from secure.core.party import Role
from secure.core.plaintext import run_plaintext
from secure.core.plan import SecurePlan
from secure.core.ring import ACT_BITS
from support.parties import run_session, tls_channels

TOLERANCE = 1e-2  # logits against float64 plaintext: the bound of tests/test_runtime.py
BATCHES = [2, 1, 3]  # three queries of one session
TINY = dict(alpha=0.125, input_size=8, blocks=(1, 1, 1, 1))  # ResNet18 shape, 8x8 inputs, 8-64 channels
RESOLUTION = 2.0 ** -ACT_BITS


@pytest.fixture(scope="module")
def linear_plan() -> SecurePlan:
    """Every stage culled and no stem ReLU: conv / add / avgpool / linear only."""
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(**TINY, cull=(1, 2, 3, 4), stem_relu=False), seed=3))
    assert plan.relu_count == 0 and {op.kind for op in plan.ops} == {"input", "conv", "add", "avgpool", "linear"}
    return plan


@pytest.fixture(scope="module")
def relu_plan() -> SecurePlan:
    """Every ReLU kept (2,432 per image)."""
    return plan_from_checkpoint(random_checkpoint(ModelSpec(**TINY), seed=4))


def images(plan: SecurePlan, batches=BATCHES, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *plan.input_shape, generator=g) for n in batches]


def client_logits(session) -> torch.Tensor:
    logits, _ = session.results[Role.CLIENT]
    return torch.cat(logits)


def assert_clean(session) -> None:
    """Every party finished, nothing is left in the hub, and each party counted exactly the bytes the
    hub delivered from it and to it (all phases: set-up, offline, online)."""
    session.ok()
    assert session.hub.pending() == 0
    for role, ch in session.channels.items():
        others = [r for r in Role if r != role]
        assert sum(t.sent for t in ch.phases.values()) == sum(session.hub.delivered(role, r) for r in others)
        assert sum(t.received for t in ch.phases.values()) == sum(session.hub.delivered(r, role) for r in others)


def assert_matches_plaintext(plan, x, logits) -> None:
    expected = run_plaintext(plan, x)
    assert logits.dtype == torch.float64 and logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert expected.std().item() > 0.05  # not a degenerate all-equal output


# -- linear layers alone ------------------------------------------------------------------------------

def test_linear_layers_alone_match_plaintext_with_hand_counted_traffic(linear_plan):
    x = images(linear_plan)
    session = run_session(linear_plan, x)
    assert_clean(session)
    assert_matches_plaintext(linear_plan, torch.cat(x), client_logits(session))
    # By hand (docs/PROTOCOL.md): only the first conv reads a value the client cannot know before the
    # query (the image); every later layer reads convs, adds and the pool of convs, whose client share
    # is computed offline, so its masked input goes before the query. Online, per query: the client's
    # X1 - B for the stem conv (N x 3 x 8 x 8 int64) and the logits' reveal (N x 10 int64): 2 rounds.
    images_total = sum(BATCHES)
    client = session.channels[Role.CLIENT].phases["online"]
    server = session.channels[Role.SERVER].phases["online"]
    assert (client.sent, client.received, client.rounds) == (images_total * 3 * 8 * 8 * 8, images_total * 10 * 8,
                                                             2 * len(BATCHES))
    assert (server.sent, server.received, server.rounds) == (client.received, client.sent, client.rounds)
    assert "online" not in session.channels[Role.DEALER].phases  # the dealer works before the queries only


# -- the ReLU protocol --------------------------------------------------------------------------------

def relu_probe_plan(channels: int) -> SecurePlan:
    """logits = ReLU(x) elementwise: the image's C x 1 x 1 values straight into a ReLU, the (1 x 1)
    pool, an identity linear layer. No product is truncated on the way, so the secure output is
    exactly ReLU of the encoded input."""
    ops = [Op(0, "input", "input", [], [channels, 1, 1]),
           Op(1, "relu", "relu", [0], [channels, 1, 1], site="relu", relu_count=channels),
           Op(2, "avgpool", "pool", [1], [channels]),
           Op(3, "linear", "fc", [2], [channels], weight="f.w", bias="f.b")]
    tensors = {"f.w": torch.eye(channels), "f.b": torch.zeros(channels)}
    return SecurePlan(ops, tensors, (channels, 1, 1), [str(i) for i in range(channels)], [0.0] * channels,
                      [1.0] * channels, {}, channels)


def test_relu_near_zero_and_at_the_edges_of_its_window():
    """The sign test reads bits 0..32 of x * 2^12: exact for x * 2^12 in [-2^32, 2^32). Values around
    the resolution 2^-12 (below it they encode to 0), the largest magnitudes inside the window (it
    holds -2^20 but not +2^20), random values over the whole window; float64 inputs so that every
    value encodes exactly."""
    edges = torch.tensor([0.0, RESOLUTION, -RESOLUTION, RESOLUTION / 2, -RESOLUTION / 2, 3 * RESOLUTION,
                          -3 * RESOLUTION, 1e-3, -1e-3, 0.5, -0.5, 37.25, -37.25, 2.0 ** 20 - RESOLUTION,
                          -(2.0 ** 20 - RESOLUTION), -(2.0 ** 20)], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    spread = torch.randint(-2 ** 32, 2 ** 32, (112,), generator=g).double() * RESOLUTION
    values = torch.cat([edges, spread])  # 128 per image
    x = torch.stack([values, values.flip(0), values[torch.randperm(len(values), generator=g)]]).view(3, -1, 1, 1)
    plan = relu_probe_plan(len(values))
    session = run_session(plan, [x[:2], x[2:]])
    assert_clean(session)
    logits = client_logits(session)
    encoded = torch.round(x.view(3, -1) / RESOLUTION)  # what the client shares
    assert torch.equal(logits, encoded.clamp(min=0) * RESOLUTION)
    assert (logits - run_plaintext(plan, x)).abs().max().item() <= RESOLUTION / 2
    # By hand, per query of n = N x 128 ReLUs (n a multiple of 8, so n/8 bytes a packed bit plane):
    # round 1 sends 32 planes + n int64 (x - m); the 5 carry levels send 3 planes per pair
    # (16 + 8 + 4 + 2 pairs) and 2 on the last level (1 pair); the multiplexer round 1 plane.
    # 7 rounds, 125 n/8 + 8 n bytes each way. Then the linear layer's masked input (n int64, the
    # pool of a ReLU is unknown before the query) and the logits' reveal (n int64): 1 round each.
    n = 3 * len(values)
    relu_bytes = 125 * n // 8 + 8 * n
    client = session.channels[Role.CLIENT].phases["online"]
    server = session.channels[Role.SERVER].phases["online"]
    assert (client.sent, client.received, client.rounds) == (relu_bytes + 8 * n, relu_bytes + 8 * n, 9 * 2)
    assert (server.sent, server.received, server.rounds) == (client.received, client.sent, client.rounds)


# -- a whole plan, several queries ------------------------------------------------------------------

def test_whole_plan_three_queries_in_one_session(relu_plan):
    x = images(relu_plan, seed=5)
    session = run_session(relu_plan, x)
    assert_clean(session)
    logits, profile = session.results[Role.CLIENT]
    assert [len(q) for q in logits] == BATCHES
    for q, xq in zip(logits, x):  # each query gets its own images' logits
        expected = run_plaintext(relu_plan, xq)
        assert (q - expected).abs().max().item() <= TOLERANCE and torch.equal(q.argmax(1), expected.argmax(1))
    assert_matches_plaintext(relu_plan, torch.cat(x), torch.cat(logits))
    assert profile.queries == len(BATCHES) and profile.relu_count == relu_plan.relu_count * sum(BATCHES)
    assert session.results[Role.SERVER][0] is None  # the logits are revealed to the client only


def test_online_rounds_equal_the_hand_count(relu_plan):
    """The plan (ops in order): input, conv, relu, [conv relu conv add relu] (block 1, identity
    shortcut), then per stage 2-4 [conv relu conv, conv (shortcut on the block input), add, relu],
    avgpool, linear: 9 ReLUs and 13 linear layers. Every linear layer reads the image, a ReLU output
    or the pool of one, none of which the client knows before the query, so each needs the client's
    X1 - B, one round; but a stage's shortcut conv comes right after its conv2, so the client sends
    both in one message: one round for the two (docs/PROTOCOL.md, "Rounds"). A ReLU costs 7 (round 1,
    five carry levels for L = 32, the multiplexer); adds and the pool are local; the reveal is 1.
    Per query and party: (13 - 3) + 9 * 7 + 1 = 74; three queries: 222."""
    kinds = [op.kind for op in relu_plan.ops]
    assert kinds.count("relu") == 9 and kinds.count("conv") + kinds.count("linear") == 13
    session = run_session(relu_plan, images(relu_plan, seed=6))
    assert_clean(session)
    for role in (Role.SERVER, Role.CLIENT):
        assert session.channels[role].phases["online"].rounds == 222
        profile = session.results[role][1]
        assert profile.rounds == 222
        assert all(lp.rounds == 7 * len(BATCHES) for lp in profile.layers if lp.op == "relu")
        shortcuts = [lp for lp in profile.layers if lp.name.endswith("shortcut")]
        assert len(shortcuts) == 3 and all(lp.rounds == 0 and lp.bytes_sent + lp.bytes_received > 0 for lp in shortcuts)
        assert all(lp.rounds == len(BATCHES) for lp in profile.layers
                   if lp.op in ("conv", "linear", "reveal") and lp not in shortcuts)
        assert all(lp.rounds == 0 for lp in profile.layers if lp.op in ("add", "avgpool"))
    server, client = (session.channels[r].phases["online"] for r in (Role.SERVER, Role.CLIENT))
    assert (server.sent, server.received) == (client.received, client.sent)  # online: only the two talk


def test_the_engine_over_tls_links_counts_the_same_and_matches_plaintext(relu_plan):
    """The three parties over real TLS 1.3 links on 127.0.0.1 (secure.transport, as the roles will
    connect them): logits that match plaintext, the same counted bytes and rounds in every phase as
    over the in-process hub, and each link's payload counters equal what the engine counted; the wire carries the
    payload plus TLS framing."""
    x = images(relu_plan, seed=7)
    reference = run_session(relu_plan, x)
    assert_clean(reference)
    channels = tls_channels()
    try:
        session = run_session(relu_plan, x, channels=channels).ok()
    finally:  # both ends of a link close at about the same time (each waits for the other's close_notify)
        closers = [threading.Thread(target=ch.close) for ch in channels.values()]
        for c in closers:
            c.start()
        for c in closers:
            c.join(10)
    assert_matches_plaintext(relu_plan, torch.cat(x), client_logits(session))  # fresh seeds: the rounding differs
    for role in Role:
        ch, ref = session.channels[role], reference.channels[role]
        assert ch.phases == ref.phases  # bytes and rounds, phase by phase
        counted_sent = sum(t.sent for t in ch.phases.values())
        counted_received = sum(t.received for t in ch.phases.values())
        assert counted_sent == sum(link.payload_sent for link in ch.links.values())
        assert counted_received == sum(link.payload_received for link in ch.links.values())
        assert sum(link.wire_sent for link in ch.links.values()) > counted_sent


# -- a client that does not match the server --------------------------------------------------------

MISMATCH_TIMEOUT_S = 1.0  # how long the dealer waits for a server that never describes the session


@pytest.mark.parametrize("change", ["plan", "query count", "batch sizes"])
def test_a_mismatched_client_fails_on_both_sides(linear_plan, change):
    other = plan_from_checkpoint(random_checkpoint(ModelSpec(**TINY, cull=(1, 2, 3, 4), stem_relu=False), seed=7))
    assert other.plan_hash != linear_plan.plan_hash
    x = images(linear_plan, [2, 1])
    client = {"plan": {"client_public": other.public_info()},
              "query count": {"client_batches": [2, 1, 1]},
              "batch sizes": {"client_batches": [1, 2]}}[change]
    session = run_session(linear_plan, x, timeout_s=MISMATCH_TIMEOUT_S, **client)
    for role in (Role.SERVER, Role.CLIENT):
        assert isinstance(session.errors.get(role), EngineError), session.errors
        assert "disagree" in str(session.errors[role])
    # The dealer never hears from the server: it gives up after its timeout instead of waiting on.
    assert isinstance(session.errors.get(Role.DEALER), RuntimeError) and "within" in str(session.errors[Role.DEALER])


@pytest.mark.parametrize("limit, match", [
    ({"max_description_bytes": 100}, r"description has [\d,]+ bytes, the dealer accepts at most 100"),
    ({"max_images": 2}, r"3 images in all, the dealer serves at most 3 queries and 2 images"),
    ({"max_queries": 1}, r"asks for 2 queries"),
    ({"max_session_bytes": 1000}, r"MB of correlations, the dealer holds at most 0 MB")])
def test_the_dealer_refuses_a_session_beyond_its_limits_before_handing_out_seeds(linear_plan, limit, match):
    from secure.core.party import DealerLimits
    limits = DealerLimits(**{**{"max_queries": 3}, **limit})
    session = run_session(linear_plan, images(linear_plan, [2, 1]), timeout_s=MISMATCH_TIMEOUT_S, dealer_limits=limits)
    assert isinstance(session.errors.get(Role.DEALER), ValueError), session.errors
    assert re.search(match, str(session.errors[Role.DEALER])), session.errors[Role.DEALER]
    # it said no before any seed left: both parties fail waiting for theirs, nothing was computed
    assert Role.SERVER in session.errors and Role.CLIENT in session.errors
    assert session.hub.delivered(Role.DEALER, Role.CLIENT) == 0 and session.hub.delivered(Role.DEALER, Role.SERVER) == 0
