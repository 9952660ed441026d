"""Load: several clients at once get isolated, correct results; beyond --max-sessions (with
--max-waiting 0) a client hears `busy, retry after N s` at once instead of hanging. `pi-client load`
drives it (bounded in sessions and time, 127.0.0.1 only) and reports sessions per minute and latency
percentiles as a table and as JSON."""

from __future__ import annotations

import json
import re

import pytest

from client import app as client_app
from client.load import percentile
from support.roles import CLIENT_FAST, IMAGES, Proc, client, eventually, plaintext

MAX_SESSIONS = 4
CLIENTS = 6
SESSIONS = 12


def test_percentiles_and_load_bounds(capsys, monkeypatch):
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([3.0], 99) == 3.0
    monkeypatch.setenv("DEEPREDUCE_TOKEN", "x" * 32)
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
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--max-sessions", str(CLIENTS),
                  "--read-timeout", "30")
    server = None
    try:
        dealer_addr = dealer.address()
        server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--dealer", dealer_addr,
                      "--max-sessions", str(MAX_SESSIONS), "--max-waiting", "0", "--retry-after", "2",
                      "--rendezvous-timeout", "60", "--read-timeout", "30")
        address = server.address()
        server.wait_line("serving plan", 120)
        images = [IMAGES[i] for i in (0, 4, 8, 12, 16, 19)]  # six classes: a mixed-up result would show
        out = tmp_path / "load.json"
        done = client("load", "--server", address, "--clients", str(CLIENTS), "--sessions", str(SESSIONS),
                      "--duration", "300", "--batch-size", "1", "--json-out", str(out), *CLIENT_FAST,
                      *map(str, images), timeout=600)
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
        assert busy, "no client heard busy although more clients than --max-sessions ran at once"
        for r in busy:  # answered at once with a retry-after hint, no hanging
            assert r["latency_s"] < 5 and r["retry_after_s"] >= 1 and "retry after" in r["message"], r
        most = concurrency(server.out)
        assert most == MAX_SESSIONS, most
        assert {"p50", "p90", "p99", "max"} <= set(doc["latency_s"]) and doc["sessions_per_minute"] > 0
        for row in ("ok", "busy", "failed", "sessions/min", "latency p50", "latency p90", "latency p99"):
            assert re.search(rf"^\s+{re.escape(row)}\s", done.stdout, re.M), row
        eventually(lambda: not server.children() and not dealer.children(), 30, "party processes reaped")
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
