"""The fast engine (secure/core/engine.py) on the op kinds of traced modules (issue #22 phase 2): the
local ops (reshape, concat, scale, avgpool2d, grouped and dilated conv, scale_shift on a flat value,
an average pool read by a non-linear op), masked ReLUs whose public mask reaches the client, and max
pooling as a tournament of ReLUs. Secure logits against plaintext, exact bytes and rounds counted by
hand from the protocol (docs/PROTOCOL.md), the three parties as threads (tests/support/parties.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secure
from deepreduce.graph import Op
from secure.core.correlations import ReluParams, tournament
from secure.core.engine import EngineConfig, EngineError, Party
from secure.core.party import Role
from secure.core.plaintext import run_plaintext
from secure.core.plan import PublicPlan, SecurePlan
from secure.core.ring import ACT_BITS, packed_size
from support import models as M
from support.parties import run_session
from test_engine import BATCHES, assert_clean, assert_matches_plaintext, client_logits, images

RESOLUTION = 2.0 ** -ACT_BITS
RELU = ReluParams()
RELU_ROUNDS = 1 + len(RELU.levels) + 1  # round 1, one per carry level, the multiplexer


def relu_bytes(n: int) -> int:
    """What each party sends in one run of the ReLU protocol over n elements: round 1's low bits
    (relu_bits planes) and x - m (n ring elements); per carry level 3 planes per pair, 2 on the last
    (no propagate bit); the multiplexer's one plane. A plane is n bits, packed."""
    planes = RELU.relu_bits + sum(3 * p for p in RELU.levels[:-1]) + 2 * RELU.levels[-1] + 1
    return planes * packed_size(n) + 8 * n


def online(session, role=Role.CLIENT):
    t = session.channels[role].phases["online"]
    return t.sent, t.received, t.rounds


def hand_plan(ops: list[Op], tensors: dict) -> SecurePlan:
    shape = tuple(ops[0].shape)
    classes = [str(i) for i in range(ops[-1].shape[0])]
    relus = sum(op.relu_count for op in ops if op.kind == "relu")
    return SecurePlan(ops, tensors, shape, classes, [0.0] * shape[0], [1.0] * shape[0], {}, relus)


def window_values(count: int, seed: int) -> torch.Tensor:
    """Random values over the whole exact window of the sign test (|x| < 2^20), on the 2^-12 grid
    so that they encode exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2 ** 31, 2 ** 31, (count,), generator=g).double() * RESOLUTION


# -- local ops ----------------------------------------------------------------------------------------

class LinearOps(nn.Module):
    """No ReLU: grouped (depthwise, dilated) and 2-group convs, an average pool read by a conv only
    (its division folded into that conv), concat, a constant scale and offset, a 2x2 average pool read
    by a flatten (it divides itself), a batch-norm on the flat features (scale_shift on 1-D)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.smooth, self.pointwise = nn.AvgPool2d(3, 1, 1), nn.Conv2d(8, 4, 1)
        self.pool = nn.AvgPool2d(2)
        self.bn = nn.BatchNorm1d(20 * 4 * 4)
        self.fc = nn.Linear(20 * 4 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.depthwise(x), self.grouped(x), self.pointwise(self.smooth(x))], 1)
        y = self.pool(y * 0.5 + 0.25)
        return self.fc(self.bn(torch.flatten(y, 1)))


class NonLinearReaders(nn.Module):
    """Average pools and a non-integer scale read by ReLUs: the engine must divide before comparing."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(F.avg_pool2d(self.stem(x), 3, 1, 1))
        x = F.relu(x * 1.5 - 0.1)
        return self.fc(F.relu(F.adaptive_avg_pool2d(x, 1).flatten(1)))


SMALL = (3, 8, 8)


def traced(model: nn.Module, shape=SMALL) -> SecurePlan:
    torch.manual_seed(0)
    return secure.export_module(M.randomize_bn(model, shape=shape), torch.randn(4, *shape), None)


def test_local_ops_match_plaintext_and_cost_no_online_round():
    plan = traced(LinearOps())
    kinds = [op.kind for op in plan.ops]
    assert {"concat", "scale", "avgpool2d", "reshape", "scale_shift"} <= set(kinds)
    assert any(op.groups == op.shape[0] and op.dilation for op in plan.ops)  # depthwise and dilated
    assert any(op.kind == "scale_shift" and len(op.shape) == 1 for op in plan.ops)
    x = images(plan)
    session = run_session(plan, x)
    assert_clean(session)
    assert_matches_plaintext(plan, torch.cat(x), client_logits(session))
    # By hand: every op but the stem conv reads values whose client share is computed offline (linear
    # layers and local ops of them), so online there is the stem's X1 - B (N x 3 x 8 x 8 ring
    # elements) and the reveal of the logits (N x 10): 2 rounds per query, as for classic linear plans.
    n = sum(BATCHES)
    assert online(session) == (n * math.prod(SMALL) * 8, n * plan.ops[-1].shape[0] * 8, 2 * len(BATCHES))
    assert online(session, Role.SERVER) == (n * plan.ops[-1].shape[0] * 8, n * math.prod(SMALL) * 8, 2 * len(BATCHES))


def test_pools_and_scales_read_by_relus_match_plaintext_with_hand_counted_rounds():
    plan = traced(NonLinearReaders())
    readers = {op.inputs[0]: op.kind for op in plan.ops if op.kind == "relu"}
    assert {plan.ops[i].kind for i in readers} == {"avgpool2d", "scale", "avgpool"}
    x = images(plan, seed=1)
    session = run_session(plan, x)
    assert_clean(session)
    assert_matches_plaintext(plan, torch.cat(x), client_logits(session))
    # Per query: the stem conv and the fc read values the client cannot know before the query (the
    # image, a ReLU output): 1 round each; 3 ReLUs; the reveal. Pools and scales are local.
    relus = [op for op in plan.ops if op.kind == "relu"]
    _, _, rounds = online(session)
    assert rounds == len(BATCHES) * (2 + RELU_ROUNDS * len(relus) + 1)


# -- masked ReLU ----------------------------------------------------------------------------------

PROBE_SHAPE = [8, 2, 2]


def masked_probe_plan(mask: torch.Tensor | None) -> SecurePlan:
    """logits = the (masked) ReLU of the image's 8 x 2 x 2 values: reshape and an identity linear
    layer, no truncation on the way, so the secure output is exact."""
    c = math.prod(PROBE_SHAPE)
    kept = c if mask is None else int(mask.sum())
    ops = [Op(0, "input", "input", [], PROBE_SHAPE),
           Op(1, "relu", "relu", [0], PROBE_SHAPE, site="relu", relu_count=kept, mask=None if mask is None else "m"),
           Op(2, "reshape", "flat", [1], [c]),
           Op(3, "linear", "fc", [2], [c], weight="f.w", bias="f.b")]
    tensors = {"f.w": torch.eye(c), "f.b": torch.zeros(c), **({} if mask is None else {"m": mask})}
    return hand_plan(ops, tensors)


def probe_mask() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return (torch.rand(*PROBE_SHAPE, generator=g) < 0.3).float()


def test_masked_relu_is_exact_and_pays_for_kept_positions_only():
    mask = probe_mask()
    masked, full = masked_probe_plan(mask), masked_probe_plan(None)
    x = window_values(3 * math.prod(PROBE_SHAPE), seed=3).view(3, *PROBE_SHAPE)
    batches = [x[:2], x[2:]]
    # The client's public plan as it crosses the network (JSON): the mask travels in it.
    public = PublicPlan.from_dict(json.loads(json.dumps(masked.public_info().to_dict())))
    sessions = {"masked": run_session(masked, batches, client_public=public), "full": run_session(full, batches)}
    for session in sessions.values():
        assert_clean(session)
    encoded = torch.round(x / RESOLUTION) * RESOLUTION
    expected = torch.where(mask.bool(), encoded.clamp(min=0), encoded).view(3, -1)
    assert torch.equal(client_logits(sessions["masked"]), expected)
    assert torch.equal(client_logits(sessions["full"]), encoded.clamp(min=0).view(3, -1))
    assert (client_logits(sessions["masked"]) - run_plaintext(masked, x)).abs().max() <= RESOLUTION / 2
    # By hand, per query of N images: the ReLU protocol over the N x kept positions (7 rounds), the
    # linear layer's masked input (N x 32 ring elements: a ReLU output is unknown before the query)
    # and the logits' reveal (the same size): 1 round each. Identity positions cost nothing.
    values = math.prod(PROBE_SHAPE)
    for name, kept in (("masked", int(mask.sum())), ("full", values)):
        each_way = sum(relu_bytes(len(b) * kept) + 8 * len(b) * values for b in batches)
        assert online(sessions[name]) == (each_way, each_way, len(batches) * (RELU_ROUNDS + 2))
        profile = sessions[name].results[Role.CLIENT][1]
        assert profile.relu_count == kept * len(x)
    sent = {name: online(s)[0] for name, s in sessions.items()}
    dealer = {name: s.results[Role.DEALER]["bytes_sent"] for name, s in sessions.items()}
    assert sent["masked"] < sent["full"] and dealer["masked"] < dealer["full"]


def test_a_client_without_the_mask_is_refused():
    public = masked_probe_plan(probe_mask()).public_info()
    public.masks = {}
    with pytest.raises(EngineError, match="lacks the ReLU mask"):
        Party(Role.CLIENT, None, public, [1], EngineConfig(), insecure_tfp=False)


def test_plans_without_masks_describe_themselves_as_before():
    public = masked_probe_plan(None).public_info().to_dict()
    assert "relu_masks" not in public and public == masked_probe_plan(None).public_info().to_dict()
    assert "relu_masks" in masked_probe_plan(probe_mask()).public_info().to_dict()


# -- max pooling ----------------------------------------------------------------------------------

def maxpool_probe_plan(shape, kernel, stride, padding) -> SecurePlan:
    """logits = max_pool2d of the image: reshape and an identity linear layer (exact, as above)."""
    c, h, w = shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    out = [c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1]
    flat = math.prod(out)
    ops = [Op(0, "input", "input", [], list(shape)),
           Op(1, "maxpool", "pool", [0], out, kernel=list(kernel), stride=list(stride), padding=list(padding),
              comparison_count=flat * (kh * kw - 1)),
           Op(2, "reshape", "flat", [1], [flat]),
           Op(3, "linear", "fc", [2], [flat], weight="f.w", bias="f.b")]
    return hand_plan(ops, {"f.w": torch.eye(flat), "f.b": torch.zeros(flat)})


@pytest.mark.parametrize("kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)),
                                                     ((3, 2), (1, 2), (1, 0))])
def test_maxpool_is_exact_with_a_tournament_of_hand_counted_relus(kernel, stride, padding):
    shape = (2, 5, 6)
    plan = maxpool_probe_plan(shape, kernel, stride, padding)
    # Ties and all-negative windows too: zero padding would win there if it took part.
    x = window_values(3 * math.prod(shape), seed=4).view(3, *shape)
    x[0] = -x[0].abs()
    x[1, :, :, 1::2] = x[1, :, :, ::2][..., : x.shape[-1] // 2]
    session = run_session(plan, [x[:2], x[2:]])
    assert_clean(session)
    encoded = torch.round(x / RESOLUTION) * RESOLUTION
    assert torch.equal(client_logits(session), F.max_pool2d(encoded, kernel, stride, padding).view(3, -1))
    # By hand, per query of N images: one ReLU run per tournament level over N x outputs x pairs
    # elements, k - 1 comparisons per output in all (the plan's count); then the linear layer's masked
    # input (client to server) and the reveal (server to client): N x outputs ring elements, 1 round each.
    pool = plan.ops[1]
    levels = tournament(math.prod(kernel))
    assert sum(levels) == math.prod(kernel) - 1
    outputs = math.prod(pool.shape)
    each_way = sum(sum(relu_bytes(len(b) * outputs * pairs) for pairs in levels) + 8 * len(b) * outputs
                   for b in (x[:2], x[2:]))
    assert online(session) == (each_way, each_way, 2 * (len(levels) * RELU_ROUNDS + 2))
    profile = session.results[Role.CLIENT][1]
    (layer,) = [lp for lp in profile.layers if lp.op == "maxpool"]
    assert layer.rounds == 2 * len(levels) * RELU_ROUNDS
    assert layer.relu_count == 0 and profile.relu_count == 0  # comparisons are not counted as ReLUs
    assert layer.comparison_count == profile.comparison_count == pool.comparison_count * len(x)  # but apart


# -- traced networks ----------------------------------------------------------------------------------

ZOO = {"vgg": lambda: M.vgg(width=4), "mobilenet": lambda: M.mobilenet(width=4), "concatnet": M.concatnet,
       "resnet18-masked": lambda: M.resnet18(width=8, act=M.masked_act)}
IMAGE = (3, 32, 32)


@pytest.fixture(scope="module")
def zoo() -> dict[str, SecurePlan]:
    return {name: traced(make(), IMAGE) for name, make in ZOO.items()}


@pytest.mark.parametrize("name", list(ZOO))
def test_traced_networks_match_plaintext_with_hand_counted_rounds(zoo, name):
    plan = zoo[name]
    x = images(plan, batches=[2, 1], seed=5)
    session = run_session(plan, x)
    assert_clean(session)
    assert_matches_plaintext(plan, torch.cat(x), client_logits(session))
    # Per query: every relu 7 rounds, every maxpool 7 per tournament level, every linear layer that
    # reads a value the client cannot know before the query 1 (the others were sent offline), unless
    # the client's previous step was such a message too (one message, one round: a shortcut conv right
    # after a conv2), the reveal 1.
    known = {0: False}
    per_query, sending = 1, False
    for op in plan.ops[1:]:
        if op.kind in ("conv", "linear", "scale_shift"):
            if not known[op.inputs[0]]:
                per_query += not sending
                sending = True
            known[op.id] = True
        elif op.kind in ("relu", "maxpool"):
            per_query += RELU_ROUNDS * (1 if op.kind == "relu" else len(tournament(math.prod(op.kernel))))
            known[op.id], sending = False, False
        else:  # local ops
            known[op.id] = all(known[i] for i in op.inputs)
    profile = session.results[Role.CLIENT][1]
    assert profile.rounds == online(session)[2] == len(x) * per_query
    assert profile.relu_count == plan.relu_count * sum(len(b) for b in x)  # kept ReLUs; not max-pool comparisons
    assert profile.comparison_count == plan.comparison_count * sum(len(b) for b in x)  # those apart


def test_snl_masks_send_less_than_the_same_network_unmasked(zoo):
    masked = zoo["resnet18-masked"]
    full = traced(M.resnet18(width=8), IMAGE)
    assert masked.relu_count < full.relu_count and masked.comparison_count == full.comparison_count
    x = images(full, batches=[1], seed=6)
    sent, rounds = {}, {}
    for name, plan in (("masked", masked), ("full", full)):
        session = run_session(plan, x)
        assert_clean(session)
        sent[name], _, rounds[name] = online(session)
    assert sent["masked"] < sent["full"]
    # A site whose mask keeps nothing (the stem here) is no op at all: its 7 rounds go too.
    sites = {name: sum(op.kind == "relu" for op in plan.ops) for name, plan in (("masked", masked), ("full", full))}
    assert sites["masked"] < sites["full"]
    assert rounds["full"] - rounds["masked"] == RELU_ROUNDS * (sites["full"] - sites["masked"])


def test_unknown_kinds_are_still_refused_at_session_start():
    plan = masked_probe_plan(None)
    public = plan.public_info()
    public.ops = [*public.ops[:-1], Op(2, "softmax", "soft", [1], [32]), public.ops[-1]]
    with pytest.raises(EngineError, match="cannot run op 'soft' \\(softmax\\)"):
        Party(Role.SERVER, None, public, [1], EngineConfig(), insecure_tfp=False)
