"""Warm sessions through the roles: no correlation used twice across more than 20 injected failures (party
processes of the client, the server and the dealer killed between and during queries, sessions idled out),
four clients at once with correct answers, and the server's limits: --max-sessions slots held by warm
sessions, --max-pool-mb, and a client's disconnect freeing its slot and processes at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from secure.core.correlations import CORRELATION_LOG_ENV
from support.env import ROOT
from support.roles import CLIENT_FAST, IMAGES, Proc, plaintext, role_env, worker_children

START_S = 120  # a role process starting up (imports)
IDLE_S = 3  # the server's --idle-timeout in these tests
FAILURES = 21
ROLE_TIMEOUTS = ["--read-timeout", "30", "--session-timeout", "240"]
SERVER_TIMEOUTS = ROLE_TIMEOUTS + ["--rendezvous-timeout", "60", "--dealer-timeout", "10"]


class Stream:
    """A `pi-client stream` process: one line in, one JSON line out."""

    def __init__(self, address: str, *args: str, env: dict | None = None):
        self.p = subprocess.Popen([sys.executable, "-m", "client", "stream", "--server", address, "--relu-protocol", "gmw",
                                   *args, *CLIENT_FAST], cwd=ROOT, env=env or role_env(), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, path, timeout: float = 120.0) -> dict:
        self.p.stdin.write(f"{path}\n")
        self.p.stdin.flush()
        return self.answer(timeout)

    def answer(self, timeout: float = 120.0) -> dict:
        import select
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        assert ready, f"no answer within {timeout} s"
        line = self.p.stdout.readline()
        assert line, f"pi-client stream ended: {self.p.stderr.read()}"
        return json.loads(line)

    def close(self, timeout: float = 60.0) -> subprocess.CompletedProcess:
        out, err = self.p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.p.args, self.p.returncode, out, err)


def roles(plan_file, env: dict, *server_args: str) -> tuple[Proc, Proc, str]:
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--max-sessions", "8", *ROLE_TIMEOUTS,
                  env=env)
    try:
        dealer_addr = dealer.address(START_S)
        server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--dealer", dealer_addr,
                      *SERVER_TIMEOUTS, *server_args, env=env)
        address = server.address(START_S)
        server.wait_line("serving plan", START_S)
    except BaseException:
        dealer.terminate()
        raise
    return dealer, server, address


def kill_parties(pid: int) -> int:
    """SIGKILL the party processes of the role or client `pid`; how many there were."""
    kids = worker_children(pid)
    for kid in kids:
        try:
            os.kill(kid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(kids)


@pytest.mark.slow
def test_no_correlation_is_used_twice_across_twenty_failures(plan_file, plan, tmp_path):
    """Every failure ends a session with prepared material in both pools; the client's next query runs
    on a fresh session. The correlation log of all three roles and every party process shows each label
    made once and used at most once (and only if made)."""
    log = tmp_path / "labels.log"
    env = role_env(**{CORRELATION_LOG_ENV: str(log)})
    dealer, server, address = roles(plan_file, env, "--idle-timeout", str(IDLE_S), "--max-sessions", "2")
    images = [IMAGES[i] for i in (0, 4, 8, 12, 16)]
    expected = [r["class_index"] for r in plaintext(plan, images)]
    stream = Stream(address, "--pool", "3", env=env)
    injected, answered, sessions = Counter(), 0, set()
    try:
        def check(row: dict, i: int) -> None:
            nonlocal answered
            assert "error" not in row, row
            assert row["class_index"] == expected[i], (row, expected[i])
            answered += 1
            sessions.add(row["session_id"])

        for f in range(FAILURES):
            i = f % len(images)
            check(stream.ask(images[i]), i)  # a healthy session: a fresh one after the previous failure
            kind = f % 5
            if kind == 0:
                injected["client party"] += kill_parties(stream.p.pid) > 0
            elif kind == 1:
                injected["server party"] += kill_parties(server.p.pid) > 0
            elif kind == 2:
                injected["dealer party"] += kill_parties(dealer.p.pid) > 0
            elif kind == 3:
                time.sleep(IDLE_S + 1.5)  # the server ends the session, dropping both pools
                injected["idle timeout"] += 1
            else:  # the server's party dies while the next query is online (or just answered)
                j = (i + 1) % len(images)
                stream.p.stdin.write(f"{images[j]}\n")
                stream.p.stdin.flush()
                time.sleep(0.03)
                injected["server party, during a query"] += kill_parties(server.p.pid) > 0
                check(stream.answer(), j)
            time.sleep(0.3)  # the pools of the next session start filling
        check(stream.ask(images[0]), 0)
        done = stream.close()  # end of input: the session ends cleanly
        assert done.returncode == 0, done.stderr
    finally:
        if stream.p.poll() is None:
            stream.p.kill()
        server.terminate()
        dealer.terminate()
    print(f"\ninjected failures: {dict(injected)}; {answered} queries answered in {len(sessions)} sessions")
    assert sum(injected.values()) == FAILURES >= 20 and len(injected) == 5
    assert len(sessions) >= FAILURES  # each failure ended the session it hit
    lines = [line.split() for line in log.read_text().splitlines()]
    made = Counter(label for event, label in lines if event == "made")
    used = Counter(label for event, label in lines if event == "used")
    assert max(made.values()) == 1, [k for k, v in made.items() if v > 1][:5]
    assert max(used.values()) == 1, [k for k, v in used.items() if v > 1][:5]
    assert set(used) <= set(made)
    assert sum(used.values()) >= 2 * answered  # both computing parties, every answered query
    assert len(made) > sum(used.values())  # prepared material was dropped with the sessions, never reused


@pytest.mark.slow
def test_four_warm_clients_at_once_and_the_servers_limits(plan_file, plan, tmp_path):
    from secure.core.stream import server_query_bytes
    per_query = server_query_bytes(plan.public_info(), "gmw", 1)
    limit_mb = 10.5 * per_query / 1e6  # five sessions with a pool of 2 fit; one pool of 11 never does
    env = role_env()
    dealer, server, address = roles(plan_file, env, "--max-sessions", "4", "--max-waiting", "0", "--retry-after", "1",
                                    "--max-pool-mb", f"{limit_mb:.6f}")
    images = [IMAGES[i] for i in (1, 5, 9, 13)]
    expected = [r["class_index"] for r in plaintext(plan, images)]
    streams = [Stream(address, "--pool", "2") for _ in range(4)]
    try:
        rows = [[] for _ in streams]
        for j in range(3):  # each round: all four clients send, then all four read: queries at once
            for c, s in enumerate(streams):
                s.p.stdin.write(f"{images[(c + j) % 4]}\n")
                s.p.stdin.flush()
            for c, s in enumerate(streams):
                rows[c].append(s.answer())
        walls = []
        for c, answers in enumerate(rows):
            assert len({r["session_id"] for r in answers}) == 1
            for j, r in enumerate(answers):
                assert r["class_index"] == expected[(c + j) % 4], (c, j, r)
                walls.append(r["wall_s"])
        assert len({answers[0]["session_id"] for answers in rows}) == 4
        # Four warm sessions hold the four slots: a fifth client hears busy at once.
        fifth = subprocess.run([sys.executable, "-m", "client", "stream", "--server", address, "--pool", "2",
                                "--relu-protocol", "gmw", *CLIENT_FAST], cwd=ROOT, env=env, input=f"{images[0]}\n",
                               capture_output=True, text=True, timeout=120)
        assert fifth.returncode == 2 and re.search(r"busy", fifth.stderr), fifth.stderr
        # A client that vanishes (SIGKILL: no goodbye) frees its slot and its party processes at once.
        assert len(worker_children(server.p.pid)) == 4
        streams[0].p.kill()
        streams[0].p.wait()
        deadline = time.monotonic() + 30
        while len(worker_children(server.p.pid)) > 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(worker_children(server.p.pid)) == 3
        replacement = Stream(address, "--pool", "2")
        assert replacement.ask(images[0])["class_index"] == expected[0]
        streams[0] = replacement
        # A pool the server could never hold is refused with the reason.
        big = subprocess.run([sys.executable, "-m", "client", "stream", "--server", address, "--pool", "11",
                              "--relu-protocol", "gmw", *CLIENT_FAST], cwd=ROOT, env=env, input=f"{images[0]}\n",
                             capture_output=True, text=True, timeout=120)
        assert big.returncode == 2 and "--max-pool-mb" in big.stderr, big.stderr
        for s in streams:
            assert s.close().returncode == 0
        # The dealer served the refills of every session and says at what rate it made them.
        # (the session whose client was killed ended in an error there: four sessions ended cleanly)
        deadline = time.monotonic() + 30
        while sum("refill rate" in line for line in dealer.out) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        rates = [float(m.group(1).replace(",", "")) for line in dealer.out
                 for m in [re.search(r"refill rate ([\d.,]+) queries/s", line)] if m]
        assert len(rates) == 4 and min(rates) > 0, dealer.out[-8:]
    finally:
        for s in streams:
            if s.p.poll() is None:
                s.p.kill()
        server.terminate()
        dealer.terminate()
    walls.sort()
    print(f"\nfour warm clients: wall p50 {walls[len(walls) // 2]:.3f} s, max {walls[-1]:.3f} s over {len(walls)} queries")


@pytest.mark.slow
def test_a_server_without_a_dealer_refuses_warm_sessions(plan_file, tmp_path):
    server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--insecure-tfp",
                  *SERVER_TIMEOUTS)
    try:
        address = server.address(START_S)
        server.wait_line("serving plan", START_S)
        done = subprocess.run([sys.executable, "-m", "client", "stream", "--server", address, *CLIENT_FAST], cwd=ROOT,
                              env=role_env(), input=f"{IMAGES[0]}\n", capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "warm sessions need one" in lines[0], lines


@pytest.mark.slow
def test_warm_sessions_reserve_the_quota_in_parts_and_give_back_the_rest(plan_file, plan):
    """--max-queries 5 with --warm-reserve 2: each warm session reserves 2 images and the client starts a
    fresh one when they are used; the fifth image gets the last one; the sixth is refused in one line. A
    request the server refuses (a pool above --max-pool-mb) costs no quota."""
    from secure.core.stream import server_query_bytes
    env = role_env()
    limit_mb = 3 * server_query_bytes(plan.public_info(), "gmw", 1) / 1e6  # a pool of 2 fits, one of 4 never
    dealer, server, address = roles(plan_file, env, "--max-queries", "5", "--query-window", "3600",
                                    "--warm-reserve", "2", "--max-pool-mb", f"{limit_mb:.6f}")
    images = [IMAGES[i] for i in (2, 6, 10, 14, 18, 3)]
    expected = [r["class_index"] for r in plaintext(plan, images)]
    try:
        big = subprocess.run([sys.executable, "-m", "client", "stream", "--server", address, "--pool", "4",
                              "--relu-protocol", "gmw", *CLIENT_FAST], cwd=ROOT, env=env, input=f"{images[0]}\n",
                             capture_output=True, text=True, timeout=120)
        assert big.returncode == 2 and "--max-pool-mb" in big.stderr, big.stderr
        done = subprocess.run([sys.executable, "-m", "client", "stream", "--server", address, "--pool", "2",
                               "--relu-protocol", "gmw", *CLIENT_FAST], cwd=ROOT, env=env,
                              input="".join(f"{p}\n" for p in images), capture_output=True, text=True, timeout=240)
    finally:
        server.terminate()
        dealer.terminate()
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["class_index"] for r in rows] == expected[:5], (rows, done.stderr)
    assert [len({r["session_id"] for r in rows[k:k + 2]}) for k in (0, 2)] == [1, 1]
    assert len({r["session_id"] for r in rows}) == 3  # 2 + 2 + 1 images
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "query limit reached" in lines[0], done.stderr
