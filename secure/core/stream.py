"""Warm sessions: one long-lived session of the fast engine that answers queries as they arrive, each on
material prepared ahead of it (docs/PROTOCOL.md, "Warm sessions").

A batch session (`secure.core.engine.run_party`) knows its queries in advance and prepares each just before
it runs. A warm session has no end fixed in advance: after the set-up (seeds, the opened weights E = W - A,
once) each computing party keeps a `Pool` of up to `pool` queries prepared ahead, at the session's one
batch size, filled by a thread of its own while the main thread waits for queries or runs them online:

    server   asks the dealer for one more query's correlations whenever its pool has room (an int64 on
             the dealer link; 0 ends the session), derives its own randomness for it
    client   derives its randomness, takes its dealer keys (fss), computes its output share of every linear
             layer and its early message (the input masks of layers whose input it knows offline)
    dealer   makes each requested query's correlations in order, one query's at a time
             (`secure.core.engine._serve_refills`)

Query q's material is labelled by (the party's seed, q) and the PRG labels carry q, so nothing prepared is
ever used for two queries; a failed query, a dead party or a closed session ends the session and its
pool with it: the client's next session has new seeds (`correlations.record_correlation` logs both ends
for the tests). Online, per query, the client sends a header (int64 [QUERY, q]) and its early message in
one flight, then the query runs as in a batch session; [END, q] ends the session. The server ends it too
when no query comes within `idle_timeout_s`, or when the session's image budget (`max_images`: the
client's quota, reserved by pi-server) is used.

Refill policies: "idle" (default) fills the pool only while no query is online, and pauses between
layers while one is, so that preparation takes no CPU from a running query on the same machine; "eager"
refills beside the online phase. Preparation threads talk to the dealer only; the online phase talks to
the peer only, so the two never share a link.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from secure.core.channel import Channel, ChannelTimeout
from secure.core.correlations import FSS_BITS, Layout, ReluParams, message_sizes, party_randomness
from secure.core.engine import EngineConfig, Party, QueryResult, session_channel
from secure.core.party import Role
from secure.core.plan import PublicPlan
from secure.core.ring import packed_size

SERVER, CLIENT, DEALER = Role.SERVER, Role.CLIENT, Role.DEALER
REFILL_POLICIES = ("idle", "eager")
QUERY, END = 1, 0  # the header's kind
DEFAULT_POOL, MAX_POOL = 4, 64


class StreamError(RuntimeError):
    """A warm session ended early: the peer's header was wrong, the budget is used, a thread failed."""


@dataclass(frozen=True)
class StreamSettings:
    """A warm session's shape. Both computing parties run the same batch size and pool (they agree on
    them at set-up); the refill policy and the timeouts are each party's own."""
    batch_size: int = 1  # images per query
    pool: int = DEFAULT_POOL  # queries prepared ahead
    refill: str = "idle"  # one of REFILL_POLICIES
    idle_timeout_s: float = 300.0  # the server ends the session after this long without a query
    max_images: int | None = None  # the server's budget for the session (a quota); None: unbounded

    def check(self) -> "StreamSettings":
        if not 1 <= self.batch_size <= 4096 or not 1 <= self.pool <= MAX_POOL:
            raise ValueError(f"a warm session takes a batch size of at least 1 and a pool of 1..{MAX_POOL} queries "
                             f"(got {self.batch_size} and {self.pool})")
        if self.refill not in REFILL_POLICIES:
            raise ValueError(f"unknown refill policy {str(self.refill)[:32]!r}: one of {', '.join(REFILL_POLICIES)}")
        if not self.idle_timeout_s > 0 or (self.max_images is not None and self.max_images < self.batch_size):
            raise ValueError("a warm session's idle timeout must be positive and its image budget at least one query")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    """One query of a warm session, as a party saw it."""
    query: int
    logits: torch.Tensor | None  # client only
    online_s: float  # this party's online phase
    wait_s: float  # time the query waited for its material (0 when the pool had it ready)
    pool_level: int  # prepared queries when it arrived, its own included
    bytes_sent: int
    bytes_received: int
    rounds: int

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "logits"}


@dataclass
class StreamSummary:
    queries: int = 0
    images: int = 0
    prepared: int = 0  # queries prepared, used or not (the rest were discarded with the session)
    pool_peak_bytes: int = 0  # the most memory the pool's material held at once
    prepare_s: float = 0.0  # the preparation thread's time on material (dealer waits included)
    ended: str = ""  # why: "end" (the client), "idle", "budget"
    answers: list[Answer] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "answers"},
                "answers": [a.to_dict() for a in self.answers]}


# -- the pool -------------------------------------------------------------------------------------

class Pool:
    """Up to `settings.pool` prepared queries of one party, in query order, filled by a thread."""

    def __init__(self, party: Party, settings: StreamSettings, dealer_ch: Channel | None):
        self.party, self.settings, self.dealer_ch = party, settings, dealer_ch
        self.items: deque[tuple[int, dict, int]] = deque()  # (query, material, bytes)
        self.cond = threading.Condition()
        self.stopping = False
        self.busy = False  # a query is online (the idle policy pauses meanwhile)
        self.error: BaseException | None = None
        self.prepared, self.prepare_s, self.held_bytes, self.peak_bytes = 0, 0.0, 0, 0
        self.thread = threading.Thread(target=self._fill, name=f"pool-{party.j}", daemon=True)

    def start(self) -> "Pool":
        self.thread.start()
        return self

    def status(self) -> dict:
        with self.cond:
            return {"level": len(self.items), "pool": self.settings.pool, "prepared": self.prepared,
                    "held_bytes": self.held_bytes, "peak_bytes": self.peak_bytes,
                    "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}"}

    def _room(self) -> bool:
        return len(self.items) < self.settings.pool and not (self.settings.refill == "idle" and self.busy)

    def _pause(self) -> None:
        """Between layers of a client's preparation: wait while a query is online (idle policy)."""
        if self.settings.refill != "idle":
            return
        with self.cond:
            self.cond.wait_for(lambda: self.stopping or not self.busy)
            if self.stopping:
                raise _Stopped()

    def _fill(self) -> None:
        q = 0
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping or self._room())
                    if self.stopping:
                        return
                start = time.perf_counter()
                if self.party.j == SERVER and self.dealer_ch is not None:
                    self.dealer_ch.send(DEALER, [torch.tensor([1])])  # one more query's correlations
                mat = self.party.material(q, self.dealer_ch, self._pause)
                size = material_bytes(mat)
                with self.cond:
                    self.prepare_s += time.perf_counter() - start
                    self.items.append((q, mat, size))
                    self.prepared += 1
                    self.held_bytes += size
                    self.peak_bytes = max(self.peak_bytes, self.held_bytes)
                    self.cond.notify_all()
                q += 1
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - the main thread raises it when it next takes
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def take(self, q: int, timeout_s: float) -> tuple[dict, float, int]:
        """Query q's material (waiting for it if the pool is empty), the wait, and the level it found."""
        start = time.perf_counter()
        with self.cond:
            if not self.cond.wait_for(lambda: self.items or self.error is not None, timeout_s):
                raise StreamError(f"no material for query {q} within {timeout_s:g} s")
            if not self.items:
                raise StreamError(f"preparing query {q} failed: {type(self.error).__name__}: {self.error}")
            level = len(self.items)
            got, mat, size = self.items.popleft()
            self.held_bytes -= size
            self.busy = True
            self.cond.notify_all()
        if got != q:
            raise StreamError(f"the pool holds query {got}, not {q}")
        return mat, time.perf_counter() - start, level

    @contextlib.contextmanager
    def online(self):
        """While a query is online (the material was taken with `take`, which set `busy`)."""
        try:
            yield
        finally:
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def close(self, timeout_s: float) -> None:
        """Stop filling and drop what is prepared (it is never used: the session ends)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout_s)
        with self.cond:
            self.items.clear()
            self.held_bytes = 0


class _Stopped(Exception):
    pass


def material_bytes(obj) -> int:
    """The memory of one query's prepared material (tensors, arrays, parsed FSS keys)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(material_bytes(v) for v in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(material_bytes(getattr(obj, name)) for name in obj.__dataclass_fields__)
    return 0


def _online_counts(ch: Channel) -> tuple[int, int, int]:
    t = ch.phases.get("online")
    return (t.sent, t.received, t.rounds) if t else (0, 0, 0)


def _answer(q: int, result: QueryResult, wait_s: float, level: int, before: tuple[int, int, int], ch: Channel) -> Answer:
    """Query q's record; its bytes and rounds are the online phase's, header and early message included."""
    after = _online_counts(ch)
    return Answer(q, result.logits, result.online_s, wait_s, level, *(a - b for a, b in zip(after, before)))


# -- the two computing parties ----------------------------------------------------------------------

def serve_stream(party: Party, settings: StreamSettings, dealer_ch: Channel | None,
                 pools: list | None = None) -> StreamSummary:
    """The server's side of a warm session after `party.setup()`: queries until the client ends the
    session, the idle timeout passes or the budget is used."""
    summary, ch = StreamSummary(), party.ch
    with _pooled(party, settings, dealer_ch, pools, summary) as pool:
        while True:
            ch.phase = "online"  # the header opens the query's first flight (with the early message)
            before = _online_counts(ch)
            try:
                (header,) = ch.recv(CLIENT, [(torch.int64, 2)], timeout_s=settings.idle_timeout_s)
            except ChannelTimeout:  # the client went quiet: its pool is dropped with the session
                summary.ended = "idle"
                break
            kind, q = (int(v) for v in header)
            if kind == END:
                summary.ended = "end"
                break
            if kind != QUERY or q != summary.queries:
                raise StreamError(f"the client sent header {[kind, q]}, expected query {summary.queries}")
            if settings.max_images is not None and summary.images + settings.batch_size > settings.max_images:
                summary.ended = "budget"
                raise StreamError(f"the session's budget of {settings.max_images} images is used (the server's "
                                  "--max-queries quota): start a new session")
            mat, wait_s, level = pool.take(q, party.wait)
            with pool.online():
                party._send_early(mat)
                result = party.online(q, mat, None)
            summary.answers.append(_answer(q, result, wait_s, level, before, ch))
            summary.queries += 1
            summary.images += settings.batch_size
    return summary


@contextlib.contextmanager
def _pooled(party: Party, settings: StreamSettings, dealer_ch: Channel | None, pools: list | None,
            summary: StreamSummary):
    """A running `Pool` for the session's queries; at the end (also on an error) it stops, its figures go
    into `summary`, and the server dismisses the dealer."""
    pool = Pool(party, settings, dealer_ch).start()
    if pools is not None:
        pools.append(pool)
    try:
        yield pool
    finally:
        party.ch.phase = "offline"
        pool.close(party.wait)
        summary.prepared, summary.pool_peak_bytes, summary.prepare_s = pool.prepared, pool.peak_bytes, pool.prepare_s
        if party.j == SERVER and dealer_ch is not None:
            _dismiss(dealer_ch)


def _dismiss(dealer_ch: Channel) -> None:
    """Tell the dealer the session is over (also when it ends in an error: the dealer stops at once
    instead of waiting out its timeout); a dealer link that already failed has nothing to hear."""
    try:
        dealer_ch.send(DEALER, [torch.tensor([0])])
        dealer_ch.flush(DEALER)
    except RuntimeError:
        pass


def client_stream(party: Party, settings: StreamSettings, dealer_ch: Channel | None,
                  next_images: Callable[[], torch.Tensor | None], answer: Callable[[Answer], None],
                  pools: list | None = None) -> StreamSummary:
    """The client's side after `party.setup()`: `next_images()` blocks until the next query's images
    (a batch of `settings.batch_size`) or None to end the session; each query's result goes to `answer`."""
    summary, ch = StreamSummary(), party.ch
    with _pooled(party, settings, dealer_ch, pools, summary) as pool:
        while True:
            images = next_images()
            q = summary.queries
            ch.phase = "online"
            if images is None:
                ch.send(SERVER, [torch.tensor([END, q])])
                summary.ended = "end"
                break
            if len(images) != settings.batch_size:
                raise StreamError(f"a query of this warm session has {settings.batch_size} images, not {len(images)}")
            mat, wait_s, level = pool.take(q, party.wait)
            with pool.online():
                before = _online_counts(ch)
                ch.send(SERVER, [torch.tensor([QUERY, q])])
                party._send_early(mat)
                result = party.online(q, mat, images.float())
            item = _answer(q, result, wait_s, level, before, ch)
            summary.answers.append(item)
            summary.queries += 1
            summary.images += len(images)
            answer(item)
    ch.flush(SERVER)
    return summary


# -- a party's whole warm session ------------------------------------------------------------------

def run_stream(role: str, rdv, public: PublicPlan, settings: StreamSettings, config: EngineConfig | None = None,
               plan=None, next_images: Callable[[], torch.Tensor | None] | None = None,
               answer: Callable[[Answer], None] | None = None, pools: list | None = None) -> StreamSummary:
    """One computing party's warm session in this process: meet the peers and the dealer at `rdv`, set up
    (seeds, the opened weights), then `serve_stream` (server, with `plan`) or `client_stream` (client,
    with `next_images` and `answer`). Warm sessions always have a dealer (no insecure TFP mode). `pools`, if
    given, receives the party's `Pool` once it runs (for status requests)."""
    settings.check()
    with session_channel(role, rdv, world=3) as channel:
        rank = Role[role.upper()]
        party = Party(rank, channel, public, [settings.batch_size], config or EngineConfig(), False, plan,
                      stream_pool=settings.pool, stream_idle_s=settings.idle_timeout_s)
        party.setup()
        dealer_ch = channel.sibling(DEALER)
        if rank == SERVER:
            return serve_stream(party, settings, dealer_ch, pools)
        return client_stream(party, settings, dealer_ch, next_images, answer, pools)


# -- what a pool holds ----------------------------------------------------------------------------------

class _ShapesOnly:
    """A stand-in PRG whose values are uninitialised tensors of the right shapes: sizes without the work."""

    seed = b""

    def ring(self, label: str, shape) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.int64)

    def bits(self, label: str, planes: int, n: int) -> torch.Tensor:
        return torch.empty(planes, packed_size(n), dtype=torch.uint8)


def server_query_bytes(public: PublicPlan, relu_protocol: str, batch: int) -> int:
    """The server party's prepared material for one query of `batch` images: its own randomness and its
    dealer message (what pi-server counts against --max-pool-mb per pooled query)."""
    layout = Layout.for_protocol(public.ops, public.tensor_shapes, ReluParams(), relu_protocol, FSS_BITS)
    rings, bits = message_sizes(layout.server_message_spec(batch))
    return 8 * rings + bits + material_bytes(party_randomness(_ShapesOnly(), SERVER, layout, 0, batch))
