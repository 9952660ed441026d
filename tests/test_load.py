"""Load: several clients at once get isolated, correct results; beyond --max-sessions (with
--max-waiting 0) a client hears `busy, retry after N s` at once instead of hanging. `pi-client load`
drives it (bounded in sessions and time, 127.0.0.1 only) and reports sessions per minute and latency
percentiles as a table and as JSON."""

from __future__ import annotations

import json
import re

import pytest

from client import app as client_app
from client.load import LOAD_MAX_DURATION, percentile
from support.roles import CLIENT_FAST, IMAGES, Proc, client, eventually, plaintext

MAX_SESSIONS = 4
CLIENTS = 6
SESSIONS = 12
# Every bound below follows from a timeout the test configures, never from how fast this machine is.
READ_TIMEOUT_S = 30  # server and dealer --read-timeout
SESSION_TIMEOUT_S = 240  # server and dealer --session-timeout: a session and its party processes end within it
CLIENT_TIMEOUT_S = float(CLIENT_FAST[CLIENT_FAST.index("--timeout") + 1])  # a client's whole session
BUSY_PAUSE_S = 5  # the longest a load client pauses after a busy answer (client/load.py)
# --duration: every session starts even if each ran to its timeout, one after another; the run itself
# ends after SESSIONS sessions (seconds on an idle machine).
DURATION_S = SESSIONS * (CLIENT_TIMEOUT_S + BUSY_PAUSE_S)
START_S = 120  # a role or pi-client process starting up (imports): the one bound no option sets


def test_percentiles_and_load_bounds(capsys, monkeypatch):
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([3.0], 99) == 3.0
    monkeypatch.setenv("DEEPREDUCE_TOKEN", "ab" * 16)
    for argv, match in ((["load", "--server", "10.1.2.3:7000", "a.png"], "only targets a server on this machine"),
                        (["load", "--server", "127.0.0.1:7000", "--clients", "65", "a.png"], "bound a load run"),
                        (["load", "--server", "127.0.0.1:7000", "--sessions", "0", "a.png"], "bound a load run"),
                        (["load", "--server", "127.0.0.1:7000", "--duration", "7200", "a.png"], "bound a load run")):
        assert client_app.run_main(client_app.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(match, err[0]), err


def concurrency(lines: list[str]) -> int:
    """The most sessions the server ran at once, from its log."""
    running, most = set(), 0
    for line in lines:
        m = re.search(r"session (\w+): (\d+ image|done|ended)", line)
        if not m:
            continue
        if m.group(2).endswith("image"):
            running.add(m.group(1))
            most = max(most, len(running))
        else:
            running.discard(m.group(1))
    return most


@pytest.mark.slow
def test_concurrent_clients_are_isolated_and_extra_ones_hear_busy(plan_file, plan, tmp_path):
    assert DURATION_S <= LOAD_MAX_DURATION
    timeouts = ["--read-timeout", str(READ_TIMEOUT_S), "--session-timeout", str(SESSION_TIMEOUT_S)]
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--max-sessions", str(CLIENTS),
                  *timeouts)
    server = None
    try:
        dealer_addr = dealer.address(START_S)
        server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--dealer", dealer_addr,
                      "--max-sessions", str(MAX_SESSIONS), "--max-waiting", "0", "--retry-after", "2",
                      "--rendezvous-timeout", "60", *timeouts)
        address = server.address(START_S)
        server.wait_line("serving plan", START_S)
        images = [IMAGES[i] for i in (0, 4, 8, 12, 16, 19)]  # six classes: a mixed-up result would show
        out = tmp_path / "load.json"
        # pi-client load waits for its clients up to the duration + --timeout + 30 s (client/load.py).
        done = client("load", "--server", address, "--clients", str(CLIENTS), "--sessions", str(SESSIONS),
                      "--duration", str(DURATION_S), "--batch-size", "1", "--json-out", str(out), *CLIENT_FAST,
                      *map(str, images), timeout=START_S + DURATION_S + CLIENT_TIMEOUT_S + 30)
        assert done.returncode == 0, done.stderr
        print("\n" + done.stdout)
        doc = json.loads(out.read_text())
        expected = [r["class_index"] for r in plaintext(plan, images)]
        ok = [r for r in doc["results"] if r["status"] == "ok"]
        busy = [r for r in doc["results"] if r["status"] == "busy"]
        assert doc["failed"] == 0, [r for r in doc["results"] if r["status"] == "failed"]
        assert doc["sessions"] == SESSIONS and len(ok) + len(busy) == SESSIONS
        for r in ok:  # isolation: every session got the labels of its own image
            assert r["labels"] == [expected[r["batch"]]], r
        assert doc["consistent"] is True
        assert len({r["session_id"] for r in ok}) == len(ok)
        # The six clients ask at once, and a session lasts far longer than a session request takes
        # (a party process, the rendezvous, the secure computation), so the first four fill every
        # slot and the others hear busy, however slow the machine.
        assert busy, "no client heard busy although more clients than --max-sessions ran at once"
        most = concurrency(server.out)
        assert most == MAX_SESSIONS, most
        # Busy at once: no request waited for a slot (the server logs each one that does), and each
        # answer came before any configured timeout could have ended a wait. (Its latency includes
        # the client's party process start, and for the first clients the fork server's.)
        assert not [line for line in server.out if "waits for a slot" in line]
        for r in busy:
            assert r["latency_s"] < READ_TIMEOUT_S and r["retry_after_s"] >= 1 and "retry after" in r["message"], r
        assert {"p50", "p90", "p99", "max"} <= set(doc["latency_s"]) and doc["sessions_per_minute"] > 0
        for row in ("ok", "busy", "failed", "sessions/min", "latency p50", "latency p90", "latency p99"):
            assert re.search(rf"^\s+{re.escape(row)}\s", done.stdout, re.M), row
        eventually(lambda: not server.children() and not dealer.children(), SESSION_TIMEOUT_S, "party processes reaped")
        lat = doc["latency_s"]
        print(f"load figures: {CLIENTS} clients, {SESSIONS} sessions in {doc['wall_s']:.0f} s: {len(ok)} ok (all "
              f"correct and isolated), {len(busy)} busy (answered in <= {max(r['latency_s'] for r in busy):.2f} s), "
              f"0 failed; at most {most} sessions at once (--max-sessions {MAX_SESSIONS}); "
              f"{doc['sessions_per_minute']:.1f} sessions/min, latency p50 {lat['p50']:.1f} s, p90 {lat['p90']:.1f} s, "
              f"p99 {lat['p99']:.1f} s")
    finally:
        if server is not None:
            assert server.terminate() == 0
        assert dealer.terminate() == 0
