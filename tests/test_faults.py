"""Fault injection: parties killed at random points of a session, and a server restart while clients wait.

`test_faults_in_a_row` runs at least 20 faulty sessions in a row against one pi-server and
pi-dealer, cycling through: the pi-client process SIGKILLed, the client's party process SIGKILLed
with its control connection dropped (a client that vanished), the pi-dealer process SIGKILLed
(then restarted on its port), the dealer's party process SIGKILLed, and the server's party process
SIGKILLed, each after a random delay into the session. After every fault the survivors must end
the session within the configured bound (--rendezvous-timeout) with a clear one-line error, and
free their party processes (sessions open no port of their own: the party links run to the server's and
the dealer's ports). Then a correct inference, and at the end no
process, listening port or temporary file of any role is left.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from secure.control import auth, protocol
from support.env import free_port
from support.roles import (CLIENT_FAST, IMAGES, TOKEN, Proc, alive, client, cmdline, eventually,
                           listening_ports, plaintext, role_env, security, worker_children)

BOUND_S = 8.0  # --rendezvous-timeout: how long a survivor may wait on a vanished peer
MARGIN_S = 7.0
FAULTS = ["client process", "client party", "dealer process", "dealer party", "server party", "client party",
          "server party"]
MIN_FAULTY = 20


class SessionDriver:
    """The client side of one session, driven by the test: its control channel and its party process."""

    def __init__(self, address: str, public: dict, x):
        from secure.control.workers import PartyJob, Worker
        from secure.transport.credentials import PartyIdentity
        from secure.transport.meeting import Meeting
        host, port = protocol.parse_address(address)
        self.ch = auth.open_channel(host, port, security(), 10, 30, "server")
        self.ch.send("session", batch_size=len(x), plan_hash=public.plan_hash, dealer_nonce=secrets.token_hex(32))
        reply = protocol.expect(self.ch.recv(30), "session")
        self.sid = reply["session_id"]
        meeting = Meeting("client", bytes.fromhex(self.sid), PartyIdentity.from_secret(bytes.fromhex(TOKEN), "client"),
                          dial={"server": (host, port), "dealer": protocol.parse_address(reply["dealer"])},
                          timeout_s=reply["timeout_s"])
        self.worker = Worker("fault-test-client")
        self.worker.start_job(PartyJob("client", meeting, public=public, batches=[x]))
        self.outcome = None
        self.ended_at = None
        self._thread = threading.Thread(target=self._finish, daemon=True)
        self._thread.start()

    def _finish(self) -> None:
        from secure.control.workers import supervise
        self.outcome = supervise(self.worker, {"server": self.ch}, time.monotonic() + 120, read_timeout=120)
        self.ended_at = time.monotonic()

    def kill(self) -> None:
        """What a client that dies looks like to the others: its party gone, its connection closed."""
        kill_if_alive(self.worker.pid)
        try:
            self.ch.link._sock.shutdown(socket.SHUT_RDWR)  # (not close(): the watching thread still holds the socket)
        except OSError:
            pass  # already closed by a session that finished first

    def wait(self, timeout: float):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the client side did not end"
        self.worker.stop()
        self.ch.close()
        return self.outcome


def kill_if_alive(pid: int) -> None:
    """SIGKILL `pid`; a process that already exited (its session finished before the fault) is fine."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += list(kids - out)
            out |= kids
    return out


@pytest.mark.slow
@pytest.mark.faults
def test_faults_in_a_row(plan_file, plan, tmp_path):
    from client.inputs import load_inputs
    rng = random.Random(int(os.environ.get("DEEPREDUCE_FAULT_SEED", "7")))
    roles_tmp = Path(tempfile.mkdtemp(prefix="pi-faults-", dir="/tmp"))  # short: unix socket paths live in it
    env = role_env(TMPDIR=str(roles_tmp))
    dealer_port = free_port()
    dealer_args = ("secure.control.dealer", "--host", "127.0.0.1", "--port", str(dealer_port), "--read-timeout", "10",
                   "--session-timeout", "60")
    dealer = Proc(*dealer_args, env=env)
    dealer.address()
    server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--dealer",
                  f"127.0.0.1:{dealer_port}", "--rendezvous-timeout", str(BOUND_S), "--read-timeout", "10",
                  "--session-timeout", "60", "--dealer-timeout", "5", "--max-sessions", "2", env=env)
    address = server.address()
    server.wait_line("serving plan", 120)
    public = plan.public_info()
    x, _ = load_inputs([str(IMAGES[3])], public.input_shape, public.mean, public.std, resize=False)
    seen_pids: set[int] = set()
    counts: dict[str, int] = {}
    detect: list[float] = []
    completed_before_fault = 0
    faulty = 0
    dealers = [dealer]
    attempts = 0
    try:
        while faulty < MIN_FAULTY:
            attempts += 1
            assert attempts <= MIN_FAULTY + 15, f"only {faulty} of {attempts} sessions were hit mid-way"
            kind = FAULTS[(attempts - 1) % len(FAULTS)]
            delay = rng.uniform(0.0, 1.0)
            before = len(server.out)
            if kind == "client process":
                victim = Proc("client", "infer", "--server", address, *CLIENT_FAST, str(IMAGES[3]), env=env)
                m = server.wait_line(r"session (\w+): 1 image\(s\), TLS links", 120, start=before)
                sid = m.group(1)
                time.sleep(delay)
                seen_pids |= descendants(victim.p.pid) | {victim.p.pid}
                seen_pids |= descendants(server.p.pid) | descendants(dealer.p.pid)
                killed_at = time.monotonic()
                victim.p.kill()
                victim.p.wait(10)
                victim.terminate()
                ended = server.wait_line(rf"session {sid}: (ended|done)", BOUND_S + MARGIN_S, start=before)
                survivor_s = time.monotonic() - killed_at
                if ended.group(1) == "done":
                    completed_before_fault += 1
                else:
                    faulty += 1
                eventually(lambda: not any(alive(p) for p in descendants(victim.p.pid)), 20,
                           "the killed client's party process exiting")
            else:
                c = SessionDriver(address, public, x)
                sid = c.sid[:12]  # as the roles log it
                time.sleep(delay)
                seen_pids |= descendants(server.p.pid) | descendants(dealer.p.pid)
                killed_at = time.monotonic()
                if kind == "client party":
                    c.kill()
                elif kind == "dealer process":
                    dealer.p.kill()
                elif kind == "dealer party":
                    for pid in worker_children(dealer.p.pid):
                        kill_if_alive(pid)
                elif kind == "server party":
                    for pid in worker_children(server.p.pid):
                        kill_if_alive(pid)
                outcome = c.wait(BOUND_S + MARGIN_S)
                ended = server.wait_line(rf"session {sid}: (ended|done)", BOUND_S + MARGIN_S, start=before)
                survivor_s = time.monotonic() - killed_at
                if ended.group(1) == "done" or (kind != "client party" and outcome.kind == "ok"):
                    completed_before_fault += 1
                else:
                    faulty += 1
                    if kind != "client party":  # the client survived: it must have heard why
                        assert outcome.kind != "ok" and outcome.message and "\n" not in outcome.message, outcome
                if kind == "dealer process":
                    dealer.p.wait(10)
                    dealer.terminate()
                    dealer = Proc(*dealer_args, env=env)  # the same port: the server's --dealer stays valid
                    dealer.address()
                    dealers.append(dealer)
            counts[kind] = counts.get(kind, 0) + 1
            detect.append(survivor_s)
            assert survivor_s < BOUND_S + MARGIN_S, (kind, survivor_s)
            eventually(lambda: not server.children() and not dealer.children(), 20, f"party processes reaped ({kind})")
        # then a correct inference, with a real pi-client
        done = client("infer", "--server", address, "--json", *CLIENT_FAST, str(IMAGES[3]), env=env)
        assert done.returncode == 0, done.stderr
        import json
        record = json.loads(done.stdout)["images"][0]
        assert record["class_index"] == plaintext(plan, [IMAGES[3]])[0]["class_index"]
        seen_pids |= descendants(server.p.pid) | descendants(dealer.p.pid)
    finally:
        assert server.terminate() == 0
        for d in dealers:
            d.terminate()
    deadline = time.monotonic() + 15  # a fork server exits just after its role
    while any(alive(p) for p in seen_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = sorted(f"{p} {cmdline(p)[:80]}" for p in seen_pids if alive(p))
    listening = listening_ports()
    ports_left = [p for p in [dealer_port, int(address.rsplit(":", 1)[1])] if p in listening]
    base = roles_tmp / f"deepreduce-pi-{os.getuid()}"
    temp_left = sorted(str(p.relative_to(roles_tmp)) for p in roles_tmp.rglob("*") if p != base)
    print(f"\nfault figures: {faulty} faulty sessions in a row ({attempts} started, {completed_before_fault} finished "
          f"before the fault landed); faults injected: "
          + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f"; survivors ended the session {min(detect):.2f}-{max(detect):.2f} s after the fault (bound "
          f"{BOUND_S:g} s + {MARGIN_S:g} s); then 1 correct inference; processes left {len(left)} of {len(seen_pids)} "
          f"seen, ports left {len(ports_left)}, temp files left {len(temp_left)}")
    shutil.rmtree(roles_tmp, ignore_errors=True)
    assert faulty >= MIN_FAULTY
    assert left == [], left
    assert ports_left == [], ports_left
    assert temp_left == [], temp_left


@pytest.mark.slow
@pytest.mark.faults
def test_server_restart_while_clients_wait(plan_file, plan, tmp_path):
    env = role_env()
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--read-timeout", "10", env=env)
    dealer_addr = dealer.address()
    port = free_port()
    args = ("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", str(port), "--dealer", dealer_addr,
            "--max-sessions", "1", "--retry-after", "1", "--rendezvous-timeout", "30", "--read-timeout", "10",
            "--dealer-timeout", "5")
    server = Proc(*args, env=env)
    address = server.address()
    server.wait_line("serving plan", 120)
    public = plan.public_info()
    holder = waiting = patient = None
    try:
        # a session whose client never shows up holds the only slot (its rendezvous waits 30 s)
        host, _ = protocol.parse_address(address)
        holder = auth.open_channel(host, port, security(), 10, 30, "server")
        holder.send("session", batch_size=1, plan_hash=public.plan_hash)
        protocol.expect(holder.recv(30), "session")
        patient = Proc("client", "infer", "--server", address, "--retries", "5", "--retry-backoff", "1",
                       *CLIENT_FAST, str(IMAGES[7]), env=env)
        waiting = Proc("client", "infer", "--server", address, *CLIENT_FAST, str(IMAGES[7]), env=env)
        eventually(lambda: sum("waits for a slot" in line for line in server.out) >= 2, 120, "both clients queued")
        assert server.terminate() == 0  # SIGTERM while they wait
        assert waiting.p.wait(60) == 2 and waiting.err[-1:] == ["error: the server is shutting down"], waiting.err
        server = Proc(*args, env=env)  # the restart, on the same port
        assert server.address() == address
        assert patient.p.wait(180) == 0, patient.err
        assert any(re.match(r"note: the server is shutting down; retrying in \d", line) for line in patient.err)
        image, name, _ = patient.out[0].split()
        assert name == plaintext(plan, [IMAGES[7]])[0]["class_name"]
        retries = sum(line.startswith("note: ") for line in patient.err)
        print(f"\nrestart figures: 2 clients waiting when the server stopped: the one without --retries got a one-line "
              f"error, the one with --retries 5 --retry-backoff 1 retried {retries} time(s) and got its result "
              "from the restarted server")
    finally:
        if holder is not None:
            holder.close()
        for p in (patient, waiting):
            if p is not None:
                p.terminate()
        server.terminate()
        dealer.terminate()
