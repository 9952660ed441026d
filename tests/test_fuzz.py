"""Fuzzing the listening ports: at least 10,000 generated messages (hypothesis) against a running pi-server
and pi-dealer, where the transport's preface belongs (garbage, old control frames, mutated prefaces)
and inside an authenticated TLS control connection (JSON messages and raw bodies). Each goes on a
fresh connection; the role must answer (an error) or hang up sooner than its read timeout would end a
wait (`REPLY_BOUND_S`). The messages are the same in every
run (a fixed seed, `DEEPREDUCE_FUZZ_SEED`). At the end both roles are still serving, printed no traceback and started
no party process."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections import Counter, deque

import pytest
from concurrent.futures import ThreadPoolExecutor

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from secure.control import auth, protocol
from secure.transport.preface import MAGIC
from support.roles import FAST, SERVER_FAST, Proc, security

TARGET_MESSAGES = int(os.environ.get("DEEPREDUCE_FUZZ_MESSAGES", 10_000))  # the issue asks for at least 10,000
# Fixed: every run (CI included) sends the same messages, so a failure reproduces; set another seed to
# explore further.
SEED = int(os.environ.get("DEEPREDUCE_FUZZ_SEED", "0"))
HANDSHAKE_TIMEOUT_S = 2  # both roles' --handshake-timeout: how long they wait on a half-sent first message
READ_TIMEOUT_S = float(FAST[FAST.index("--read-timeout") + 1])  # their wait for a whole later message
# Every message's sending side is closed at once, so a role that waits on it waits for nothing. Between
# the two waits: a role may use its handshake timeout before hanging up, never its read timeout.
REPLY_BOUND_S = (HANDSHAKE_TIMEOUT_S + READ_TIMEOUT_S) / 2
TYPES = ["hello", "ping", "pong", "info", "session", "join", "joined", "done", "error", "busy"]
FIELDS = ["v", "type", "role", "id", "nonce", "auth", "proof", "batch_size", "plan_hash", "dealer_nonce", "session_id",
          "host", "port", "timeout_s", "seq", "mac", "message", "retry_after_s"]

scalars = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=24)
           | st.sampled_from(["0" * 64, "client", "server", "dealer", "hmac-sha256", "none", "127.0.0.1"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
messages = st.builds(lambda fields, kind, v: {**fields, "type": kind, "v": v},
                     st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=6),
                     st.sampled_from(TYPES) | st.text(max_size=12) | scalars,
                     st.sampled_from([2, 2, 2, 2, 1, 3, "2", None, 2.0]))


KINDS = {
    "raw bytes": st.tuples(st.just("raw bytes"), st.binary(max_size=300)),
    "framed bytes": st.tuples(st.just("framed bytes"), st.binary(max_size=300)),
    "length prefix": st.tuples(st.just("length prefix"), st.integers(0, 2 ** 32 - 1), st.binary(max_size=40)),
    "json before auth": st.tuples(st.just("json before auth"), messages),
    "mutated preface": st.tuples(st.just("mutated preface"), st.sampled_from([3, 3, 3, 2, 4, 0, 65535]),
                                 st.integers(0, 255), st.integers(0, 255), st.integers(0, 2 ** 32 - 1),
                                 st.binary(min_size=16, max_size=16), st.binary(max_size=64)),
    "json after auth": st.tuples(st.just("json after auth"), messages),
    "bytes after auth": st.tuples(st.just("bytes after auth"), st.binary(max_size=200)),
}
rounds = st.tuples(*KINDS.values())  # one message of every kind per example


def _payload(case) -> tuple[bool, bytes]:
    """(whether to authenticate first, the bytes to send)."""
    kind = case[0]
    if kind == "raw bytes":
        return False, case[1]
    if kind == "framed bytes":
        return False, struct.pack(">I", len(case[1])) + case[1]
    if kind == "length prefix":
        return False, struct.pack(">I", case[1]) + case[2]
    if kind == "mutated preface":
        version, purpose, role, reserved, session, tail = case[1:]
        return False, struct.pack(">8sHBBI16s", MAGIC, version, purpose, role, reserved, session) + tail
    if kind == "json before auth":
        return False, _frame(case[1])
    if kind == "bytes after auth":
        return True, case[1]  # one message inside TLS that is not a JSON control message
    return True, b""  # json after auth: sent by the channel


def _frame(msg: dict) -> bytes:
    body = json.dumps(msg, allow_nan=True).encode()
    return struct.pack(">I", len(body)) + body


def _send_one(address: tuple[str, int, str], case, stats: Counter, lock: threading.Lock) -> None:
    needs_auth, data = _payload(case)
    start = time.monotonic()
    if needs_auth:
        _send_authenticated(address, case, data)
        got = b"answered"
    else:
        got = _send_raw(address, data, case)
    with lock:
        stats["messages"] += 1
        stats[f"target {address[2]}"] += 1
        stats[f"kind {case[0]}"] += 1
        stats["answered" if got else "hung up"] += 1
        stats["slowest_ms"] = max(stats["slowest_ms"], int(1000 * (time.monotonic() - start)))


def _send_authenticated(address, case, data: bytes) -> None:
    """Inside a control connection the role accepts (a client's to the server, a server's to the dealer):
    it must answer with an error (or a reply) and hang up."""
    role = "server" if address[2] == "dealer" else "client"
    with auth.open_channel(address[0], address[1], security(role), 5, 5, address[2], role) as ch:
        if case[0] == "json after auth":
            msg = dict(case[1])
            kind = msg.pop("type")
            try:
                ch.send(kind if isinstance(kind, str) else str(kind), **{str(k): v for k, v in msg.items()})
            except protocol.ProtocolError:  # above the message size limit: nothing was sent
                return
        else:
            ch.link.send(data)
        deadline = time.monotonic() + REPLY_BOUND_S
        while True:  # the reply (an error, or pong/info), then the role hangs up
            try:
                ch.recv(max(0.01, deadline - time.monotonic()))
            except protocol.PeerClosed:
                return
            except protocol.ProtocolError as exc:
                if "timed out" in str(exc):
                    raise AssertionError(f"no answer and no hang-up within {REPLY_BOUND_S} s for {case!r:.300}") from None
                return  # the link ended another way (reset, truncation): the role hung up


def _send_raw(address, data: bytes, case) -> bytes:
    sock = socket.create_connection(address[:2], 5)
    try:
        sock.sendall(data)
    except OSError:
        pass
    with sock:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.settimeout(REPLY_BOUND_S)
        got = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except socket.timeout:
            raise AssertionError(f"no answer and no hang-up within {REPLY_BOUND_S} s for {case!r:.300}") from None
        except ConnectionResetError:
            pass
    return got


@pytest.mark.slow
@pytest.mark.fuzz
def test_fuzz_control_protocol(plan_file):
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0",
                  "--handshake-timeout", str(HANDSHAKE_TIMEOUT_S), *FAST)
    server = None
    try:
        dealer_addr = dealer.address()
        server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--dealer", dealer_addr,
                      "--handshake-timeout", str(HANDSHAKE_TIMEOUT_S), *SERVER_FAST)
        server_addr = server.address()
        server.wait_line("serving plan", 120)
        targets = {"server": protocol.parse_address(server_addr), "dealer": protocol.parse_address(dealer_addr)}
        stats, lock, failures = Counter(), threading.Lock(), []
        pool, in_flight = ThreadPoolExecutor(8), deque()  # 8 connections at a time (the limit per address is 16)

        def settle(limit: int) -> None:
            while len(in_flight) > limit:
                future, case = in_flight.popleft()
                try:
                    future.result()
                except Exception as exc:  # noqa: BLE001 - reported below with its case
                    failures.append(f"{type(exc).__name__}: {exc} ({case!r:.200})")

        @settings(max_examples=-(-TARGET_MESSAGES // len(KINDS)), deadline=None, database=None, derandomize=False,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(batch=rounds, target=st.sampled_from(["server", "server", "server", "dealer"]))
        def fuzz(batch, target):
            for case in batch:
                in_flight.append((pool.submit(_send_one, (*targets[target], target), case, stats, lock), case))
            settle(16)

        started = time.monotonic()
        try:
            for attempt in range(5):  # hypothesis may stop a run early once it has seen enough distinct examples
                seed(SEED + attempt)(fuzz)()  # a further run draws from its own fixed seed: new messages
                settle(0)
                if stats["messages"] + len(failures) >= TARGET_MESSAGES:
                    break
        finally:
            settle(0)
            pool.shutdown()
        seconds = time.monotonic() - started
        assert not failures, failures[:5]
        assert stats["messages"] >= TARGET_MESSAGES, stats
        for name, address in targets.items():  # both still serve
            role = "server" if name == "dealer" else "client"
            reply = auth.request(*address, {"type": "ping"}, 5, 5, name, "pong", security=security(role), role=role)
            assert reply["role"] == name
        assert server.p.poll() is None and dealer.p.poll() is None
        assert not server.children() and not dealer.children()
        for role in (server, dealer):
            assert not any("internal error" in line for line in role.out), role.out[-5:]
        kinds = ", ".join(f"{k[5:]} {v}" for k, v in sorted(stats.items()) if k.startswith("kind "))
        print(f"\nfuzz figures: {stats['messages']} generated messages (seed {SEED}) in {seconds:.0f} s (server "
              f"{stats['target server']}, dealer {stats['target dealer']}; {kinds}); answered {stats['answered']}, "
              f"hung up {stats['hung up']}; 0 crashes, {stats['hangs']} hangs, slowest answer "
              f"{stats['slowest_ms']} ms; both roles still serving, 0 party processes started")
    finally:
        if server is not None:
            assert server.terminate() == 0
            assert not any("Traceback" in line for line in server.err), server.err[-10:]
        assert dealer.terminate() == 0
        assert not any("Traceback" in line for line in dealer.err), dealer.err[-10:]
