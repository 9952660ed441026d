"""pi-server: holds the secure plan (the weights) and runs the server party (rank 0) of each session.

    DEEPREDUCE_TOKEN=... pi-server --plan MODEL.plan --host 127.0.0.1 --port 7000 --dealer 127.0.0.1:7001
    pi-server --plan MODEL.plan --token-file token --label-only --max-queries 1000 --query-window 86400
    pi-server --plan MODEL.plan --no-auth --insecure-tfp   # INSECURE local benchmark: no token, no dealer

Everything on the server's one port is TLS 1.3 with certificates on both sides (secure.control.auth):
control connections from clients, and each session's party connections, which go to that session's
worker. Per session the server picks a session id, asks the dealer to join (a control connection that
lives as long as the session), runs its party in a fresh worker process that connects to the dealer's
port, and tells the client the session id and the dealer's address; the client connects to both ports
and authenticates the dealer itself. At most --max-sessions run at once and --max-waiting wait for a
slot; a client beyond that gets a `busy` answer with a retry-after time. The server keeps serving
whatever happens to a session; workers are reaped when it ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import select
import sys
import threading
import secrets
import time
from collections import deque
from dataclasses import dataclass

from secure.control import auth, protocol
from secure.control.limits import QueryLimiter, QuotaExceeded
from secure.control.service import PortPicker, Service, add_limit_arguments, limits_from_args, run_main
from secure.control.workers import (PartyJob, Worker, peer_reason, private_tempdir, recv_done, start_fork_server,
                                    supervise)
from secure.core.party import DEFAULT_ENGINE, ENGINES, RELU_PROTOCOLS, Rendezvous
from secure.transport.meeting import Meeting

INSECURE_WARNING = ("INSECURE: --insecure-tfp runs without a dealer (trusted-first-party mode); "
                    "the server party generates all correlated randomness and could learn the client's "
                    "inputs. For benchmarking only.")


CRYPTEN_WARNING = ("--engine crypten: sessions run CrypTen's reference engine over gloo, whose traffic is "
                   "neither encrypted nor authenticated and which opens ephemeral ports; only clients that pass "
                   "--engine crypten are served. For comparisons, on a trusted network (SECURITY.md).")


@dataclass
class Settings:
    dealer: tuple[str, int] | None
    insecure_tfp: bool
    engine: str  # what the server offers: "fast" (this project's protocol) or "crypten" (the reference)
    max_batch: int
    max_sessions: int
    read_timeout: float
    rendezvous_timeout: float
    session_timeout: float
    dealer_timeout: float
    queue_timeout: float
    max_waiting: int = 8
    retry_after: float = 10.0
    label_only: bool = False
    max_queries: int | None = None
    query_window: float = 86400.0
    # Warm sessions (pi-client stream, client.warm.WarmSession): each holds a --max-sessions slot for its life.
    max_pool: int = 16  # queries one warm session may keep prepared
    max_pool_mb: float = 4096.0  # the prepared material of all warm sessions at once (the server party's part)
    idle_timeout: float = 120.0  # a warm session without a query for this long ends (its pool is dropped)
    warm_lifetime: float = 3600.0  # a warm session ends after this long (the client reconnects)
    warm_reserve: int = 64  # with --max-queries: images a warm session reserves at most (then a fresh one)
    # The fast engine's ReLU protocols this server runs (--relu-protocols): a client asking for another is
    # refused; `info` lists them so that a client's auto picks among them.
    relu_protocols: tuple[str, ...] = RELU_PROTOCOLS


class PiServer:
    def __init__(self, service: Service, plan, settings: Settings, dealer_id: str | None = None):
        self.service, self.s = service, settings
        self.security = service.security
        if settings.label_only:
            from secure.control.limits import label_only_plan
            plan = label_only_plan(plan)
        self.plan = plan  # what the parties run (with the label-only head in that mode)
        self.public = plan.public_info().to_dict()  # what `info` sends
        self.dealer_id = dealer_id
        self.slots = threading.BoundedSemaphore(settings.max_sessions)
        self.ports = PortPicker()
        self.quota = QueryLimiter(settings.max_queries, settings.query_window)
        self._lock = threading.Lock()
        self._waiting = 0
        self._durations: deque[float] = deque(maxlen=20)
        self._pool_bytes = 0  # the warm sessions' estimated pools (Settings.max_pool_mb)

    # -- requests -----------------------------------------------------------------------------
    def handle(self, ch) -> None:
        msg = ch.recv(self.s.read_timeout)
        kind = msg["type"]
        if kind == "ping":
            ch.send("pong", role="server")
        elif kind == "info":
            ch.send("info", plan=self.public, insecure_tfp=self.s.insecure_tfp, max_batch=self.s.max_batch,
                    engine=self.s.engine, relu_protocols=list(self.s.relu_protocols) if self.s.engine == "fast" else None,
                    label_only=self.s.label_only, dealer_id=self.dealer_id, queries_left=self.quota.left(ch.limit_key))
        elif kind == "session":
            self.session(ch, msg)
        else:
            raise protocol.ProtocolError(f"the server does not answer {kind[:40]!r} messages")

    def session(self, ch, msg: dict) -> None:
        if "stream" in msg:
            self.warm_session(ch, msg)
            return
        if "batch_sizes" in msg:  # several queries in one session: set-up and weight masks paid once
            sizes = protocol.field(msg, "batch_sizes", list,
                                   lambda b: 0 < len(b) <= self.s.max_batch and all(
                                       isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in b)
                                   and sum(b) <= self.s.max_batch,
                                   f"a list of query sizes >= 1 summing to at most {self.s.max_batch} "
                                   "(the server's --max-batch)")
        else:
            sizes = [protocol.field(msg, "batch_size", int, lambda b: 1 <= b <= self.s.max_batch,
                                    f"an image count in 1..{self.s.max_batch} (the server's --max-batch)")]
        engine = protocol.field(msg, "engine", str, lambda e: 0 < len(e) <= 32, "an engine name") \
            if "engine" in msg else DEFAULT_ENGINE
        if engine != self.s.engine:  # the client chooses its protection: it must ask for the engine itself
            raise protocol.ControlError(f"this server runs the {self.s.engine} engine, not {engine[:32]!r}: "
                                        + ("pass --engine crypten to use the CrypTen reference engine"
                                           if self.s.engine == "crypten" else "drop --engine"))
        if engine == "crypten" and len(sizes) > 1:
            raise protocol.ControlError("the crypten engine runs one query per session: drop --session-size")
        relu_protocol = _relu_protocol(msg, engine, self.s.relu_protocols)
        n = sum(sizes)
        self._check_plan(msg)
        try:
            ticket = self.quota.reserve(ch.limit_key, n)
        except QuotaExceeded as exc:
            self.service.log(f"refused {ch.peer_addr} ({ch.limit_key}): {exc}")
            protocol.send_error(ch, str(exc), exc.retry_after)
            return
        refund = True
        try:
            if not self._acquire_slot(ch):
                return
            try:
                refund = self._run(ch, sizes, relu_protocol)
            finally:
                self.slots.release()
        finally:
            if refund:
                self.quota.refund(ticket)

    def warm_session(self, ch, msg: dict) -> None:
        """A warm session: queries as the client sends them, on material prepared ahead, until the client
        ends it, it idles past --idle-timeout or reaches --warm-lifetime. Its images are reserved against
        the client's quota up front (as many as it asks for, at most what is left) and what it did not use
        is given back at the end. With a quota, a session reserves at most --warm-reserve images, so a
        session that fails (what it used is then unknown and all its reservation stays used) costs the
        client at most that many; the client then starts a fresh session."""
        stream = self._stream_request(msg)
        relu_protocol = _relu_protocol(msg, self.s.engine, self.s.relu_protocols)
        self._check_plan(msg)
        left = self.quota.left(ch.limit_key)
        budget = stream.max_images if left is None else min(stream.max_images or self.s.warm_reserve,
                                                             self.s.warm_reserve, left)
        try:
            ticket = self.quota.reserve(ch.limit_key, max(budget or 0, stream.batch_size))
        except QuotaExceeded as exc:
            self.service.log(f"refused {ch.peer_addr} ({ch.limit_key}): {exc}")
            protocol.send_error(ch, str(exc), exc.retry_after)
            return
        stream = dataclasses.replace(stream, max_images=budget)
        pool_bytes = stream.pool * _server_query_bytes(self.plan, relu_protocol, stream.batch_size)
        pooled, settled = False, False

        def give_back(used: int | None) -> None:
            """Free the pool and settle the quota once: before the client hears `done` (it may open its next
            session at once and must find both given back), or on the way out if it never does."""
            nonlocal pooled, settled
            if pooled:
                with self._lock:
                    self._pool_bytes -= pool_bytes
                pooled = False
            if not settled:
                self.quota.settle(ticket, used)
                settled = True

        used = 0  # refunded in full unless the session ran: then what it used, or None (kept) if it failed
        try:
            if not self._reserve_pool(ch, pool_bytes):
                return
            pooled = True
            if not self._acquire_slot(ch):
                return
            try:
                used = self._run(ch, [stream.batch_size], relu_protocol, stream, before_reply=give_back)
            finally:
                self.slots.release()
        finally:
            give_back(used)

    def _check_plan(self, msg: dict) -> None:
        wanted = protocol.field(msg, "plan_hash", str, lambda h: 0 < len(h) <= 128, "the plan hash from info")
        if wanted != self.plan.plan_hash:
            raise protocol.ControlError(f"the server now serves plan {self.plan.plan_hash[:12]}, not {wanted[:12]} "
                                        "from the client's info request: run the client again")

    def _stream_request(self, msg: dict):
        from secure.core.stream import REFILL_POLICIES, StreamSettings
        if self.s.engine != "fast" or self.s.insecure_tfp:
            raise protocol.ControlError("warm sessions run the fast engine with a dealer: this server "
                                        + ("runs the crypten engine" if self.s.engine != "fast" else
                                           "has no dealer (--insecure-tfp)"))
        spec = protocol.field(msg, "stream", dict)
        count = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        batch = protocol.field(spec, "batch_size", int, lambda b: count(b) and 1 <= b <= self.s.max_batch,
                               f"images per query in 1..{self.s.max_batch} (the server's --max-batch)")
        pool = protocol.field(spec, "pool", int, lambda k: count(k) and 1 <= k <= self.s.max_pool,
                              f"queries prepared ahead, 1..{self.s.max_pool} (the server's --max-pool)")
        refill = protocol.field(spec, "refill", str, lambda r: r in REFILL_POLICIES, " or ".join(REFILL_POLICIES))
        most = spec.get("max_images")
        if most is not None and not (count(most) and most >= batch):
            raise protocol.ControlError("the warm session's max_images must be a whole number of at least one query")
        return StreamSettings(batch_size=batch, pool=pool, refill=refill, idle_timeout_s=self.s.idle_timeout,
                              max_images=most)

    def _reserve_pool(self, ch, nbytes: int) -> bool:
        """Count a warm session's pool against --max-pool-mb; False (the client was told `busy`) if it
        does not fit now, an error if it never could."""
        limit = self.s.max_pool_mb * 1e6
        if nbytes > limit:
            raise protocol.ControlError(f"the warm session's pool needs about {nbytes / 1e6:,.0f} MB on the server, "
                                        f"more than its --max-pool-mb of {self.s.max_pool_mb:g}: ask for a smaller pool")
        with self._lock:
            if self._pool_bytes + nbytes <= limit:
                self._pool_bytes += nbytes
                return True
        after = self.retry_after()
        protocol.send_busy(ch, f"the server's warm sessions hold {self._pool_bytes / 1e6:,.0f} MB of prepared material "
                               f"(--max-pool-mb {self.s.max_pool_mb:g}): retry after {after:g} s", after)
        return False

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: the recent mean session time per slot, times the queue."""
        with self._lock:
            mean = sum(self._durations) / len(self._durations) if self._durations else self.s.retry_after
            ahead = self._waiting + 1
        return float(max(1, math.ceil(mean * ahead / self.s.max_sessions)))

    def _acquire_slot(self, ch) -> bool:
        """Take a session slot; False (the client was told `busy`) when the queue is full or too slow,
        or the server is shutting down."""
        try:
            if self._take_slot(ch, blocking=False):
                return True
            with self._lock:
                full = self._waiting >= self.s.max_waiting
                if not full:
                    self._waiting += 1
                waiting = self._waiting
            if full:
                after = self.retry_after()
                protocol.send_busy(ch, f"the server is busy ({self.s.max_sessions} session(s) running, "
                                       f"{self.s.max_waiting} waiting): retry after {after:g} s", after)
                return False
            self.service.log(f"session request from {ch.peer_addr} waits for a slot ({waiting} waiting)")
            try:
                deadline = time.monotonic() + self.s.queue_timeout
                while not self._take_slot(ch, timeout=0.2):  # stopping: it tells the client and raises
                    if _hung_up(ch):
                        raise protocol.PeerClosed("the client left while waiting for a session slot")
                    if time.monotonic() > deadline:
                        after = self.retry_after()
                        protocol.send_busy(ch, f"the server is busy ({self.s.max_sessions} session(s) running) for "
                                               f"longer than its --queue-timeout: retry after {after:g} s", after)
                        return False
                return True
            finally:
                with self._lock:
                    self._waiting -= 1
        except _Stopping:
            return False

    def _take_slot(self, ch, blocking: bool = True, timeout: float | None = None) -> bool:
        """A slot (True) or none yet (False); _Stopping once the server stops (the client hears `busy`)."""
        if not self.service.stop.is_set() and self.slots.acquire(blocking, timeout):
            if not self.service.stop.is_set():
                return True
            self.slots.release()
        if self.service.stop.is_set():
            protocol.send_busy(ch, "the server is shutting down", self.s.retry_after)
            raise _Stopping()
        return False

    # -- one session -----------------------------------------------------------------------------
    def _run(self, ch, sizes: list[int], relu_protocol: str = "gmw", stream=None, before_reply=None):
        """Run one session of len(sizes) queries with the client's ReLU protocol; True if the client cannot
        have received a result (the quota is refunded). A warm session (`stream`: its StreamSettings):
        the images it classified (None when unknown: it failed), also given to `before_reply` before the
        client is told how the session ended."""
        session_id = secrets.token_bytes(16)  # names the session's party connections on both ports
        sid, host = session_id.hex(), ch.getsockname()[0]
        links = self.s.engine == "fast"  # TLS links on the two ports; crypten meets over gloo at a fresh port
        port = None if links else self.ports.fresh()
        started = time.monotonic()
        dealer, dealer_id = (None, None) if self.s.insecure_tfp else self._join_dealer(sid, port)
        worker = None
        try:
            worker = Worker(f"pi-server-{sid[:12]}")
            self.service.track(worker)
            if links:
                rdv = Meeting("server", session_id, self.security.party, accept=("client",),
                              dial={} if self.s.insecure_tfp else {"dealer": self.s.dealer},
                              timeout_s=self.s.rendezvous_timeout)
                self.service.route(session_id, worker)
            else:
                rdv = Rendezvous(host, port, self.s.rendezvous_timeout)
            worker.start_job(PartyJob("server", rdv, insecure_tfp=self.s.insecure_tfp, engine=self.s.engine,
                                      plan=self.plan, batch_sizes=sizes, relu_protocol=relu_protocol, stream=stream))
            ch.send("session", session_id=sid, host=None if links else host, port=port,
                    timeout_s=self.s.rendezvous_timeout, insecure_tfp=self.s.insecure_tfp,
                    plan_hash=self.plan.plan_hash, label_only=self.s.label_only, dealer_id=dealer_id,
                    engine=self.s.engine, relu_protocol=relu_protocol if links else None,
                    dealer=None if self.s.insecure_tfp else protocol.format_address(*self.s.dealer),
                    **({"stream": {**stream.to_dict(), "lifetime_s": self.s.warm_lifetime}} if stream else {}))
            what = (f"warm, {stream.pool} queries of {stream.batch_size} image(s) prepared ahead ({stream.refill})"
                    if stream else f"{sum(sizes)} image(s)")
            self.service.log(f"session {sid[:12]}: {what}, "
                             + ("TLS links" if links else f"rendezvous {protocol.format_address(host, port)}")
                             + (f", {len(sizes)} queries" if len(sizes) > 1 else "")
                             + (f", ReLU protocol {relu_protocol}" if links else "")
                             + (" (INSECURE TFP)" if self.s.insecure_tfp else "")
                             + (" (crypten engine)" if self.s.engine == "crypten" else "")
                             + (f", client {ch.peer_id!r} from {ch.peer_addr}" if ch.peer_addr else ""))
            peers = {"client": ch} if dealer is None else {"client": ch, "dealer": dealer}
            lifetime = self.s.warm_lifetime if stream else self.s.session_timeout
            outcome = supervise(worker, peers, started + lifetime, self.service.stop, self.s.read_timeout)
            outcome = peer_reason(outcome, "dealer", dealer)  # a refusing dealer names the cause
            images = (outcome.result.get("images") if outcome.kind == "ok" else None) if stream else None
            if before_reply is not None:
                before_reply(images)
            self._conclude(ch, dealer, sid, outcome, time.monotonic() - started)
            if stream:
                return images
            return outcome.kind != "ok" and outcome.peer != "client"
        finally:
            self.service.unroute(session_id)
            if worker is not None:
                self.service.untrack(worker)
            if dealer is not None:
                dealer.close()

    def _join_dealer(self, sid: str, port: int | None):
        host, dport = self.s.dealer
        address = protocol.format_address(host, dport)
        try:
            dealer = auth.open_channel(host, dport, self.security, self.s.dealer_timeout, self.s.dealer_timeout,
                                       "dealer", role="server")
        except protocol.Unreachable as exc:  # the dealer may be restarting: the client may retry
            raise protocol.RemoteError(str(exc), self.s.retry_after) from None
        try:
            # The dealer reaches the rendezvous store at this server's address on the dealer's network.
            dealer.send("join", session_id=sid, host=dealer.getsockname()[0] if port else None, port=port,
                        timeout_s=self.s.rendezvous_timeout, engine=self.s.engine)
            reply = protocol.expect(dealer.recv(self.s.dealer_timeout), "joined")
            dealer_id = protocol.field(reply, "dealer_id", str)
        except protocol.BusyError as exc:
            dealer.close()
            raise protocol.RemoteError(f"the dealer is busy: {exc}", exc.retry_after) from None
        except protocol.RemoteError as exc:
            dealer.close()
            raise protocol.ControlError(f"the dealer refused the session: {exc}") from None
        except protocol.ProtocolError as exc:
            dealer.close()
            raise protocol.RemoteError(f"the dealer at {address} did not join: {exc}", self.s.retry_after) from None
        return dealer, dealer_id

    def _conclude(self, ch, dealer, sid: str, outcome, elapsed: float) -> None:
        if outcome.kind == "ok":
            said = outcome.done_messages.get("dealer")
            if dealer is not None and "dealer" not in outcome.done_peers:
                said = recv_done(dealer, self.s.read_timeout)  # let the dealer's party end on its own
            warm = outcome.result if outcome.result and "queries" in outcome.result else None
            rate = (said or {}).get("refill_queries_per_s")
            ch.send("done", session_id=sid, elapsed_s=round(elapsed, 3),
                    **({"queries": warm["queries"], "images": warm["images"], "ended": warm["ended"],
                        "dealer_refill_queries_per_s": rate if isinstance(rate, (int, float)) else None}
                       if warm else {}))
            with self._lock:
                self._durations.append(elapsed)
            self.service.log(f"session {sid[:12]}: done in {elapsed:.1f} s" + (
                f": {warm['queries']} queries, {warm['prepared']} prepared, pool peak "
                f"{warm['pool_peak_bytes'] / 1e6:.1f} MB, ended by {_ENDED.get(warm['ended'], warm['ended'])}"
                if warm else ""))
            return
        message = _describe(outcome)
        self.service.log(f"session {sid[:12]}: ended ({outcome.kind}) after {elapsed:.1f} s: {message}")
        if outcome.peer != "client":
            protocol.send_error(ch, message, self.s.retry_after)


def _relu_protocol(msg: dict, engine: str, allowed: tuple[str, ...] = RELU_PROTOCOLS) -> str:
    """The ReLU protocol the client asked for (the fast engine's gmw, fss or fss-exact; the client resolved
    "auto"), or gmw for a client that names none; an unknown one, one outside the server's --relu-protocols,
    or any with the crypten engine but its default, is refused with one line naming the choices."""
    from secure.core.runtime import DEFAULT_RELU_PROTOCOL, check_relu_protocol  # torch is loaded (the plan)
    wanted = DEFAULT_RELU_PROTOCOL if "relu_protocol" not in msg else \
        protocol.field(msg, "relu_protocol", str, lambda p: 0 < len(p) <= 32, "a ReLU protocol name")
    try:
        chosen = check_relu_protocol(wanted, engine)
    except ValueError as exc:
        raise protocol.ControlError(f"{exc}" + ("" if engine == "crypten" else
                                                 f" (pi-client --relu-protocol auto or {', '.join(allowed)})")) from None
    if engine == "fast" and chosen not in allowed:
        asked = "" if "relu_protocol" in msg else " (the default of a client that names none)"
        raise protocol.ControlError(f"this server runs the ReLU protocols {', '.join(allowed)} (its --relu-protocols), "
                                    f"not {chosen}{asked}: pass --relu-protocol auto or {allowed[0]}")
    return chosen


_ENDED = {"end": "the client", "idle": "--idle-timeout", "budget": "the query quota"}


def _server_query_bytes(plan, relu_protocol: str, batch: int) -> int:
    from secure.core.stream import server_query_bytes  # torch is loaded (the plan)
    return server_query_bytes(plan.public_info(), relu_protocol, batch)


class _Stopping(Exception):
    """The server stopped while a request waited for a slot."""


def _describe(outcome) -> str:
    if outcome.kind == "failed":
        return f"the server party failed: {outcome.message}"
    if outcome.kind == "died":
        return f"the server party process died: {outcome.message}"
    if outcome.kind == "stopped":
        return "the server is shutting down"
    if outcome.kind == "timeout":
        return "the session ran past the server's --session-timeout"
    if outcome.peer == "dealer":
        return ("the dealer closed the session connection (did it stop?)" if outcome.kind == "peer_closed"
                else outcome.message)
    return outcome.message


def _hung_up(ch) -> bool:
    """True if the peer closed (or sent something) while we were not reading."""
    if ch.pending():
        return True
    readable, _, _ = select.select([ch], [], [], 0)
    return bool(readable)


# -- startup ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi-server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # `--token` must not pass for --token-file
    p.add_argument("--plan", required=True, help="the secure plan (MODEL.plan from `deepreduce export`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7000, help="control port (0 picks a free one; default 7000)")
    p.add_argument("--dealer", help="the pi-dealer's control address HOST:PORT")
    p.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                   help="the engine this server offers: fast (default, this project's protocol) or crypten (the "
                        "CrypTen reference engine: over gloo, unencrypted, ephemeral ports; clients and the dealer "
                        "must opt in too)")
    p.add_argument("--insecure-tfp", action="store_true",
                   help="INSECURE benchmark mode: no dealer, the server party makes the randomness")
    p.add_argument("--max-batch", type=int, default=64, help="most images in one session (default 64)")
    p.add_argument("--max-sessions", type=int, default=1, help="concurrent sessions (default 1; others queue)")
    p.add_argument("--max-waiting", type=int, default=8,
                   help="session requests that may wait for a slot; more get `busy, retry after` (default 8)")
    p.add_argument("--queue-timeout", type=float, default=300.0,
                   help="seconds a session request waits for a free slot before `busy` (default 300)")
    p.add_argument("--retry-after", type=float, default=10.0,
                   help="retry-after hint, in seconds, before any session has finished (default 10)")
    p.add_argument("--session-timeout", type=float, default=900.0,
                   help="seconds a session may run before it is stopped (default 900)")
    p.add_argument("--rendezvous-timeout", type=float, default=60.0,
                   help="seconds the parties wait for their links to each other (or, with --engine crypten, at "
                        "the rendezvous) and for each message of the secure computation (default 60)")
    p.add_argument("--dealer-timeout", type=float, default=30.0,
                   help="seconds to wait for the dealer, at startup and per session (default 30)")
    p.add_argument("--read-timeout", type=float, default=protocol.DEFAULT_READ_TIMEOUT,
                   help="seconds to wait for a control message (default 30)")
    w = p.add_argument_group("warm sessions (pi-client stream): each holds a --max-sessions slot while it lives")
    w.add_argument("--max-pool", type=int, default=16, help="queries a warm session may keep prepared (default 16)")
    w.add_argument("--max-pool-mb", type=float, default=4096.0,
                   help="the server party's prepared material of all warm sessions at once, MB (default 4096)")
    w.add_argument("--idle-timeout", type=float, default=120.0,
                   help="seconds a warm session may wait for a query before it ends (default 120)")
    w.add_argument("--warm-lifetime", type=float, default=3600.0,
                   help="seconds a warm session may live; the client then starts a new one (default 3600)")
    w.add_argument("--warm-reserve", type=int, default=64,
                   help="with --max-queries: images a warm session reserves of the client's quota when it starts; "
                        "it gives back what it did not use when it ends, keeps all of it if it fails (default 64)")
    p.add_argument("--relu-protocols", default=",".join(RELU_PROTOCOLS),
                   help="the fast engine's ReLU protocols clients may ask for, comma-separated, of "
                        f"{', '.join(RELU_PROTOCOLS)} (default: all). E.g. fss-exact alone: no wrap of a local "
                        "truncation can garble an image (docs/PROTOCOL.md, Faithful truncation); gmw alone: no FSS "
                        "keys, the dealer's smallest traffic")
    g = p.add_argument_group("model-stealing limits")
    g.add_argument("--label-only", action="store_true",
                   help="reveal only each image's label to the client, never the logits (a head computed under "
                        "encryption; see secure/limits.py)")
    g.add_argument("--max-queries", type=int,
                   help="images one client may classify per --query-window (default: no limit)")
    g.add_argument("--query-window", type=float, default=86400.0,
                   help="the window of --max-queries, in seconds (default 86400)")
    auth.add_arguments(p, listener=True, connector=True, default_id="server")
    add_limit_arguments(p)
    return p


def _settings(args) -> Settings:
    if args.insecure_tfp and args.dealer:
        raise protocol.ControlError("--insecure-tfp runs without a dealer: drop --dealer (or drop --insecure-tfp)")
    if not args.insecure_tfp and not args.dealer:
        raise protocol.ControlError("pass --dealer HOST:PORT (the pi-dealer's control address), or --insecure-tfp "
                                    "for an INSECURE benchmark without a dealer")
    numbers = (args.max_batch, args.max_sessions, args.queue_timeout, args.session_timeout,
               args.rendezvous_timeout, args.dealer_timeout, args.read_timeout, args.query_window, args.retry_after,
               args.max_pool, args.max_pool_mb, args.idle_timeout, args.warm_lifetime, args.warm_reserve)
    if min(numbers) <= 0 or args.max_waiting < 0:
        raise protocol.ControlError("--max-batch, --max-sessions, --retry-after, --query-window, --max-pool, "
                                    "--max-pool-mb, --warm-lifetime, --warm-reserve and every --*-timeout must be "
                                    "positive (--max-waiting at least 0)")
    if args.max_pool > 64:
        raise protocol.ControlError("--max-pool is at most 64 queries")
    if args.max_queries is not None and args.max_queries < 1:
        raise protocol.ControlError("--max-queries must be at least 1")
    relu_protocols = _protocol_list(args.relu_protocols)
    return Settings(dealer=protocol.parse_address(args.dealer, "--dealer") if args.dealer else None,
                    insecure_tfp=args.insecure_tfp, engine=args.engine, max_batch=args.max_batch, max_sessions=args.max_sessions,
                    read_timeout=args.read_timeout, rendezvous_timeout=args.rendezvous_timeout,
                    session_timeout=args.session_timeout, dealer_timeout=args.dealer_timeout,
                    queue_timeout=args.queue_timeout, max_waiting=args.max_waiting, retry_after=args.retry_after,
                    label_only=args.label_only, max_queries=args.max_queries, query_window=args.query_window,
                    max_pool=args.max_pool, max_pool_mb=args.max_pool_mb, idle_timeout=args.idle_timeout,
                    warm_lifetime=args.warm_lifetime, warm_reserve=args.warm_reserve, relu_protocols=relu_protocols)


def _protocol_list(text: str) -> tuple[str, ...]:
    """--relu-protocols: known names, at least one, each once, in the order given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RELU_PROTOCOLS]
    if not names or unknown or len(set(names)) != len(names):
        raise protocol.ControlError(f"--relu-protocols {text[:80]!r}: give one or more of {', '.join(RELU_PROTOCOLS)}, "
                                    "comma-separated, each once")
    return tuple(names)


def _check_dealer(settings: Settings, security) -> str:
    """Ping the dealer over an authenticated channel; its identity."""
    host, port = settings.dealer
    try:
        reply = auth.request(host, port, {"type": "ping"}, settings.dealer_timeout, settings.read_timeout,
                                 "dealer", "pong", security=security, role="server")
    except protocol.AuthError as exc:
        raise protocol.ControlError(f"the dealer at {protocol.format_address(host, port)} did not accept this "
                                    f"server: {exc}") from None
    serves = reply.get("engine", DEFAULT_ENGINE)
    if serves != settings.engine:
        raise protocol.ControlError(f"the dealer at {protocol.format_address(host, port)} serves the {str(serves)[:32]} "
                                    f"engine, this server the {settings.engine} engine: start both with the same --engine")
    return str(reply.get("dealer_id"))


def _check_protocols_fit(settings: Settings, plan) -> None:
    """--relu-protocols without gmw needs a plan whose activations stay inside the fss window."""
    from secure.core.costmodel import fss_window_problem
    if settings.engine == "fast" and "gmw" not in settings.relu_protocols:
        problem = fss_window_problem(plan.public_info())
        if problem:
            raise protocol.ControlError(f"--relu-protocols {','.join(settings.relu_protocols)}: {problem} "
                                        "(add gmw to --relu-protocols)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    security = auth.security_from_args(args, listen_host=args.host, role="server")
    limits = limits_from_args(args)
    if not os.path.isfile(args.plan):
        raise protocol.ControlError(f"plan {args.plan} does not exist: pass the MODEL.plan written by `deepreduce export`")
    private_tempdir("pi-server")
    service = Service("pi-server", args.host, args.port, security, limits)
    service.install_signal_handlers()
    service.announce()  # before the slow imports: clients queue in the listen backlog meanwhile
    from secure.core.plan import SecurePlan  # imports torch
    plan = SecurePlan.load(args.plan)
    _check_protocols_fit(settings, plan)
    if settings.insecure_tfp:
        print(f"WARNING: {INSECURE_WARNING}", file=sys.stderr, flush=True)
    if settings.engine == "crypten":
        print(f"WARNING: {CRYPTEN_WARNING}", file=sys.stderr, flush=True)
    dealer_id = None
    if settings.dealer and not service.stop.is_set():
        dealer_id = _check_dealer(settings, security)
    start_fork_server()  # party processes are forks of it (it loads the runtime once, in the background)
    server = PiServer(service, plan, settings, dealer_id)
    service.log(f"serving plan {plan.plan_hash[:12]}: input {'x'.join(map(str, plan.input_shape))}, "
                f"{len(plan.classes)} classes, {plan.relu_count:,} ReLUs per image"
                + (" (INSECURE TFP mode)" if settings.insecure_tfp else f", dealer {dealer_id!r}")
                + (", crypten engine" if settings.engine == "crypten" else "")
                + (f"; label-only (head plan {server.plan.plan_hash[:12]}, {server.plan.relu_count:,} ReLUs)"
                   if settings.label_only else "")
                + (f"; at most {settings.max_queries} images per client per {settings.query_window:g} s"
                   if settings.max_queries else "")
                + (f"; ReLU protocols {', '.join(settings.relu_protocols)}"
                   if settings.engine == "fast" and settings.relu_protocols != RELU_PROTOCOLS else "")
                + f"; TLS 1.3, {security.party.trust_mode}")
    service.serve(server.handle)
    service.log("stopped")
    return 0


def cli() -> int:
    return run_main(main)
