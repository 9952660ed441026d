"""Warm sessions in the engine (`secure.core.stream`), with the three parties as threads over
`InProcessHub` channels: queries as they come against plaintext PyTorch, each query's rounds and bytes
against a batch session's (hand-counted in test_engine.py), the pool's bound, the dealer's refills,
the idle timeout and the image budget, and the correlation log: no label used twice, none used that
the dealer did not make. The roles' warm sessions (processes, kills, reconnects) are in test_warm.py."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import Counter

import pytest
import torch

from deepreduce.checkpoint import random_checkpoint
from deepreduce.spec import ModelSpec
from secure.core.correlations import CORRELATION_LOG_ENV
from secure.core.engine import EngineConfig, Party, serve_dealer
from secure.core.export import plan_from_checkpoint
from secure.core.party import Role
from secure.core.plaintext import run_plaintext
from secure.core.stream import StreamError, StreamSettings, client_stream, serve_stream, server_query_bytes
from support.parties import CountingHub, run_session

TINY = dict(alpha=0.125, input_size=8, blocks=(1, 1, 1, 1))
TOLERANCE = 1e-2  # as tests/test_engine.py
HEADER_BYTES = 16  # int64 [kind, query]
ROUNDS_PER_QUERY = 74  # tests/test_engine.py::test_online_rounds_equal_the_hand_count, per query (gmw)


@pytest.fixture(scope="module")
def relu_plan():
    return plan_from_checkpoint(random_checkpoint(ModelSpec(**TINY), seed=4))


def images(plan, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, *plan.input_shape, generator=g) for _ in range(n)]


class WarmRun:
    """A warm session's three parties as threads; `feed` hands the client its next query (None: end)."""

    def __init__(self, plan, settings: StreamSettings, protocol: str = "gmw", timeout_s: float = 20.0,
                 client_settings: StreamSettings | None = None):
        self.hub = CountingHub()
        self.channels = {role: self.hub.channel(role, timeout_s) for role in Role}
        self.inbox: queue.Queue = queue.Queue()
        self.answers, self.results, self.errors = [], {}, {}
        config = EngineConfig(server_threads=1, relu_protocol=protocol)
        public = plan.public_info()
        mine = client_settings or settings

        def server(ch):
            party = Party(Role.SERVER, ch, public, [settings.batch_size], config, False, plan,
                          stream_pool=settings.pool, stream_idle_s=settings.idle_timeout_s)
            party.setup()
            return serve_stream(party, settings, ch.sibling(Role.DEALER))

        def client(ch):
            party = Party(Role.CLIENT, ch, public, [mine.batch_size], config, False,
                          stream_pool=mine.pool, stream_idle_s=mine.idle_timeout_s)
            party.setup()
            self.client_party = party
            return client_stream(party, mine, ch.sibling(Role.DEALER), self.inbox.get, self.answers.append)

        jobs = {Role.SERVER: server, Role.CLIENT: client, Role.DEALER: serve_dealer}
        self.threads = {role: threading.Thread(target=self._run, args=(role, jobs[role]), daemon=True) for role in Role}
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for t in self.threads.values():
            t.start()

    def _run(self, role, job):
        try:
            self.results[role] = job(self.channels[role])
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.errors[role] = exc

    def query(self, x: torch.Tensor, timeout_s: float = 60.0):
        n = len(self.answers)
        self.inbox.put(x)
        deadline = time.monotonic() + timeout_s
        while len(self.answers) == n and not self.errors and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(self.answers) == n + 1, self.errors
        return self.answers[-1]

    def finish(self, end: bool = True, timeout_s: float = 60.0) -> "WarmRun":
        if end:
            self.inbox.put(None)
        for t in self.threads.values():
            t.join(timeout_s)
        torch.set_num_threads(self._torch_threads)
        assert not [r for r, t in self.threads.items() if t.is_alive()], "parties still running"
        return self


def test_warm_queries_match_plaintext_with_a_batch_sessions_rounds(relu_plan):
    """Queries that arrive one by one are answered as plaintext PyTorch answers them; each costs the
    rounds of a batch session's query (74, hand-counted), and its client sends the batch session's online
    bytes plus the 16-byte header plus the early message a batch session sends offline."""
    xs = images(relu_plan, 5)
    run = WarmRun(relu_plan, StreamSettings(pool=2))
    for x in xs:
        run.query(x)
        time.sleep(0.05)
    run.finish()
    assert not run.errors, run.errors
    got = torch.cat([a.logits for a in run.answers])
    expected = run_plaintext(relu_plan, torch.cat(xs))
    assert (got - expected).abs().max().item() <= TOLERANCE and torch.equal(got.argmax(1), expected.argmax(1))
    batch = run_session(relu_plan, [xs[0]]).ok()
    online = batch.channels[Role.CLIENT].phases["online"]
    early = sum(8 * math.prod(run.client_party.layout.input_shape(relu_plan.ops[i])) for i in run.client_party.early_ids())
    server = run.results[Role.SERVER]
    for mine, theirs in zip(run.answers, server.answers):
        assert mine.rounds == theirs.rounds == ROUNDS_PER_QUERY == online.rounds
        assert mine.bytes_sent == theirs.bytes_received == online.sent + HEADER_BYTES + early
        assert mine.bytes_received == theirs.bytes_sent == online.received
    assert run.hub.pending() == 0


@pytest.mark.parametrize("refill", ["idle", "eager"])
def test_the_pool_is_bounded_and_the_dealer_makes_what_the_server_asked(relu_plan, refill):
    settings = StreamSettings(pool=3, refill=refill)
    run = WarmRun(relu_plan, settings, protocol="fss")
    xs = images(relu_plan, 4, seed=1)
    time.sleep(1.0)  # the pools fill
    for x in xs:
        run.query(x)
    run.finish()
    assert not run.errors, run.errors
    server, client, dealer = (run.results[r] for r in Role)
    assert server.queries == client.queries == 4 and server.ended == client.ended == "end"
    # Never more than the pool ahead of the queries; what was prepared and not used is dropped.
    assert 4 <= server.prepared <= 4 + settings.pool and 4 <= client.prepared <= 4 + settings.pool
    assert dealer["queries"] == server.prepared and dealer["refill_queries_per_s"] > 0
    assert server.pool_peak_bytes <= settings.pool * server_query_bytes(relu_plan.public_info(), "fss", 1)
    assert server.pool_peak_bytes >= server_query_bytes(relu_plan.public_info(), "fss", 1) // 2
    got = torch.cat([a.logits for a in run.answers])
    assert torch.equal(got.argmax(1), run_plaintext(relu_plan, torch.cat(xs)).argmax(1))


def test_an_idle_session_ends_and_drops_its_pool(relu_plan):
    run = WarmRun(relu_plan, StreamSettings(pool=2, idle_timeout_s=1.0),
                  client_settings=StreamSettings(pool=2, idle_timeout_s=1.0))
    run.query(images(relu_plan, 1)[0])
    deadline = time.monotonic() + 30
    while Role.SERVER not in run.results and Role.SERVER not in run.errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Role.SERVER in run.results, run.errors  # the server ended on its own, before the client's END
    run.finish()  # the client's END goes nowhere: its session is over; the dealer's thread ends too
    server = run.results[Role.SERVER]
    assert server.ended == "idle" and server.queries == 1 and run.results[Role.DEALER]["queries"] == server.prepared


def test_the_image_budget_ends_the_session(relu_plan):
    run = WarmRun(relu_plan, StreamSettings(pool=1, max_images=2), timeout_s=3.0)  # the client waits for nothing
    xs = images(relu_plan, 3, seed=2)
    run.query(xs[0])
    run.query(xs[1])
    run.inbox.put(xs[2])
    run.finish(end=False)
    assert isinstance(run.errors.get(Role.SERVER), StreamError) and "budget" in str(run.errors[Role.SERVER])
    assert len(run.answers) == 2


def test_settings_are_checked():
    for bad in (dict(pool=0), dict(pool=65), dict(batch_size=0), dict(refill="lazy"), dict(idle_timeout_s=0),
                dict(batch_size=2, max_images=1)):
        with pytest.raises(ValueError):
            StreamSettings(**bad).check()


def test_no_correlation_is_used_twice_across_sessions(relu_plan, tmp_path, monkeypatch):
    """The log of every session (warm and batch) in this process: each label made once, used at most
    once, and only if made; sessions that end early (idle, budget) leave theirs unused."""
    log = tmp_path / "labels.log"
    monkeypatch.setenv(CORRELATION_LOG_ENV, str(log))
    xs = images(relu_plan, 4, seed=3)
    for settings in (StreamSettings(pool=2), StreamSettings(pool=3, refill="eager"), StreamSettings(pool=1)):
        run = WarmRun(relu_plan, settings)
        for x in xs[:3]:
            run.query(x)
        run.finish()
    run_session(relu_plan, xs[:2]).ok()
    lines = [line.split() for line in log.read_text().splitlines()]
    made = Counter(label for event, label in lines if event == "made")
    used = Counter(label for event, label in lines if event == "used")
    assert made and max(made.values()) == 1
    assert max(used.values()) == 1 and set(used) <= set(made)
    assert sum(used.values()) == 2 * (3 * 3 + 2)  # server and client, every query
