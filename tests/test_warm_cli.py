"""The warm-session command line: `pi-client stream` (one warm session, input paths on standard input,
one JSON line per image, a bad line reported and skipped) and `pi-client load --warm` (one warm session
per client, per-query wall and online percentiles), against a real pi-dealer and pi-server."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from support.env import ROOT
from support.roles import CLIENT_FAST, IMAGES, Proc, assert_one_line_error, client, plaintext, role_env

START_S = 120  # a role process starting up (imports)
SERVER_TIMEOUTS = ["--read-timeout", "30", "--session-timeout", "240", "--rendezvous-timeout", "60"]


def stream(*args: str, stdin: str, timeout: float) -> subprocess.CompletedProcess:
    """`pi-client stream ARGS` with `stdin` as its standard input (support.roles.client takes none)."""
    return subprocess.run([sys.executable, "-m", "client", "stream", *args], cwd=ROOT, env=role_env(), input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def roles(plan_file):
    """A pi-dealer and a pi-server (two warm sessions at once) on 127.0.0.1 -> (server Proc, address)."""
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--read-timeout", "30",
                  "--session-timeout", "240")
    server = None
    try:
        dealer_addr = dealer.address(START_S)
        server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--dealer",
                      dealer_addr, "--max-sessions", "2", "--max-pool", "8", *SERVER_TIMEOUTS)
        address = server.address(START_S)
        server.wait_line("serving plan", START_S)
        yield server, address
    finally:
        if server is not None:
            assert server.terminate() == 0
        assert dealer.terminate() == 0


@pytest.mark.slow
def test_stream_answers_each_line_in_one_warm_session(roles, plan, tmp_path):
    server, address = roles
    start = len(server.out)
    images = [IMAGES[i] for i in (0, 4, 8, 12, 16)]
    missing = tmp_path / "missing.png"
    lines = [str(p) for p in images[:2]] + ["", str(missing)] + [str(p) for p in images[2:]]
    summary = tmp_path / "stream.json"
    done = stream("--server", address, "--pool", "3", "--json-out", str(summary), *CLIENT_FAST,
                  stdin="\n".join(lines) + "\n", timeout=240)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["image"] for r in rows] == [l for l in lines if l]  # one line per input line, in order
    bad = rows[2]
    assert set(bad) == {"image", "error"} and "does not exist" in bad["error"], bad
    good = rows[:2] + rows[3:]
    expected = plaintext(plan, images)
    for r, e in zip(good, expected):
        assert r["class_index"] == e["class_index"] and r["class_name"] == e["class_name"], (r, e)
        assert abs(r["probability"] - e["probability"]) < 0.02, (r, e)
        assert r["wall_s"] >= r["online_s"] > 0 and r["wait_s"] >= 0, r
        assert r["reconnects"] == 0, r
    assert len({r["session_id"] for r in good}) == 1
    assert [r["query"] for r in good] == list(range(5))
    doc = json.loads(summary.read_text())
    assert doc["queries"] == 5 and doc["sessions"] == 1 and {"p50", "p99"} <= set(doc["wall_s"])
    sid = good[0]["session_id"][:12]
    m = server.wait_line(rf"session {sid}: done in .*: (\d+) queries", 60, start=start)
    assert int(m.group(1)) == 5, m.group(0)
    warm = [line for line in server.out[start:] if re.search(r"session \w+: warm,", line)]
    assert len(warm) == 1, warm
    print("\nstream: " + ", ".join(f"wall {1e3 * r['wall_s']:.0f} ms / online {1e3 * r['online_s']:.0f} ms"
                                   for r in good))


@pytest.mark.slow
def test_load_warm_reports_percentiles_and_correct_labels(roles, plan, tmp_path):
    _, address = roles
    images = [IMAGES[i] for i in (0, 8, 16)]
    out = tmp_path / "warm.json"
    done = client("load", "--server", address, "--warm", "--clients", "2", "--sessions", "6", "--interval", "0.2",
                  "--pool", "3", "--json-out", str(out), *CLIENT_FAST, *map(str, images), timeout=300)
    assert done.returncode == 0, done.stderr
    print("\n" + done.stdout)
    doc = json.loads(out.read_text())
    assert doc["mode"] == "warm" and doc["queries"] == 6 and doc["errors"] == 0, doc["results"]
    expected = [r["class_index"] for r in plaintext(plan, images)]
    for r in doc["results"]:
        assert r["status"] == "ok" and r["label"] == expected[r["batch"]], r
        assert r["wall_s"] >= r["online_s"] > 0, r
    assert sorted(r["query"] for r in doc["results"]) == list(range(6))
    assert doc["consistent"] is True
    for key in ("query_wall_s", "online_s"):
        assert {"p50", "p90", "p99"} <= set(doc[key]) and doc[key]["p50"] > 0, doc[key]
    assert doc["wall_over_online"] >= 1 and doc["queries_per_s"] > 0
    assert [c["sessions"] for c in doc["per_client"]] == [1, 1], doc["per_client"]
    assert len({r["session_id"] for r in doc["results"]}) == 2
    assert doc["dealer_refill_queries_per_s"]["p50"] > 0  # the dealer's rate, passed on by the server
    for row in ("ok", "errors", "queries/s", "wall p50", "online p99", "wall/online", "dealer q/s"):
        assert re.search(rf"^\s+{re.escape(row)}\s", done.stdout, re.M), row


def test_stream_rejects_a_bad_pool_in_one_line():
    done = stream("--server", "127.0.0.1:9", "--pool", "0", *CLIENT_FAST, stdin="", timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    assert_one_line_error(done, r"--pool must be 1\.\.\d+")


def test_warm_flags_are_checked_before_anything_is_sent(capsys, monkeypatch):
    from client import app as client_app
    monkeypatch.setenv("DEEPREDUCE_TOKEN", "ab" * 16)
    for argv, match in ((["load", "--server", "127.0.0.1:9", "--pool", "2", "a.png"], "pass --warm"),
                        (["load", "--server", "127.0.0.1:9", "--interval", "1", "a.png"], "pass --warm"),
                        (["load", "--server", "127.0.0.1:9", "--warm", "--pool", "65", "a.png"], "--pool must be"),
                        (["load", "--server", "127.0.0.1:9", "--warm", "--batch-size", "2", "a.png"],
                         "drop --batch-size"),
                        (["load", "--server", "127.0.0.1:9", "--warm", "--interval", "-1", "a.png"], "--interval must"),
                        (["load", "--server", "10.1.2.3:7000", "--warm", "a.png"], "only targets a server on this")):
        assert client_app.run_main(client_app.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(match, err[0]), (argv, err)
