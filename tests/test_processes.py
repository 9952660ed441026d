"""pi-dealer, pi-server and pi-client as real processes over TCP, plus the control protocol itself.

The process tests use a small random-weight plan (ResNet18 at alpha 0.25, stages 1 and 4 culled,
thinned; batch-norm statistics calibrated on real images so the logits are spread out) and the
real CIFAR-10 test images shipped in demo/images. Every server binds 127.0.0.1 with --port 0 and
reports its port in its `listening on` line; every wait is bounded. Every role gets the shared
control token through $DEEPREDUCE_TOKEN (never on a command line).
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time

import pytest

from secure.control import auth, protocol
from support.env import free_port
from support.roles import (CLASSES, CLIENT_FAST, FAST, IMAGES, SERVER_FAST, Proc, alive, assert_matches_plaintext,
                           assert_one_line_error, client, eventually, plaintext, security,
                           start_dealer, start_server)


# -- the control protocol (no processes) --------------------------------------------------------

def _pair():
    a, b = socket.socketpair()
    return a, b


def test_frame_round_trip():
    a, b = _pair()
    with a, b:
        protocol.send(a, "info", text="héllo", n=3)
        msg = protocol.recv(b, 1.0)
        assert msg == {"v": protocol.PROTOCOL_VERSION, "type": "info", "text": "héllo", "n": 3}
        raw = protocol.encode({"type": "ping"})
        assert struct.unpack(">I", raw[:4])[0] == len(raw) - 4 and json.loads(raw[4:])["type"] == "ping"


def test_oversized_prefix_is_refused_without_reading_the_body():
    a, b = _pair()
    with a, b:
        a.sendall(struct.pack(">I", protocol.MAX_MESSAGE_BYTES + 1) + b"body")
        with pytest.raises(protocol.ProtocolError, match="limit"):
            protocol.recv(b, 1.0)
        assert b.recv(16) == b"body"  # the announced body was not consumed
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.encode({"type": "info", "blob": "x" * protocol.MAX_MESSAGE_BYTES})


@pytest.mark.parametrize("body, match", [
    (b"\xff\xfe", "not UTF-8 JSON"), (b"{nope", "not UTF-8 JSON"), (b"[1, 2]", "JSON object"),
    (b'{"v": 1}', "JSON object"), (b'{"v": 99, "type": "info"}', "version"), (b'{"type": "info"}', "version"),
])
def test_malformed_messages_are_protocol_errors(body, match):
    a, b = _pair()
    with a, b:
        a.sendall(struct.pack(">I", len(body)) + body)
        with pytest.raises(protocol.ProtocolError, match=match):
            protocol.recv(b, 1.0)


def test_read_timeout_eof_and_truncation():
    a, b = _pair()
    with a, b:
        start = time.monotonic()
        with pytest.raises(protocol.ProtocolError, match="timed out"):
            protocol.recv(b, 0.3)
        assert time.monotonic() - start < 2.0
        a.sendall(struct.pack(">I", 10) + b"abc")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(protocol.ProtocolError, match="middle of a message") as info:
            protocol.recv(b, 1.0)
        assert not isinstance(info.value, protocol.PeerClosed)
    a, b = _pair()
    with b:
        a.close()
        with pytest.raises(protocol.PeerClosed):
            protocol.recv(b, 1.0)


def test_expect_turns_peer_errors_into_remote_errors():
    with pytest.raises(protocol.RemoteError, match="^boom$"):
        protocol.expect({"v": 1, "type": "error", "message": "boom"}, "info")
    with pytest.raises(protocol.ProtocolError, match="expected 'info' message, got 'pong'"):
        protocol.expect({"v": 1, "type": "pong"}, "info")
    with pytest.raises(protocol.ProtocolError, match="batch_size"):
        protocol.field({"type": "session", "batch_size": True}, "batch_size", int)


def test_parse_address():
    assert protocol.parse_address("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert protocol.parse_address("[::1]:7000") == ("::1", 7000)
    for bad in ("7000", "host:", "host:0", "host:70000", ":7000", "host:x"):
        with pytest.raises(protocol.ControlError, match="HOST:PORT"):
            protocol.parse_address(bad)


def test_connect_retries_until_a_listener_appears_and_gives_up_in_time():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(protocol.ControlError, match="cannot reach the server"):
        protocol.connect("127.0.0.1", port, 0.6, "server")
    assert time.monotonic() - start < 3.0
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def late_listen():
        time.sleep(0.5)
        listener.bind(("127.0.0.1", port))
        listener.listen()
    thread = threading.Thread(target=late_listen)
    thread.start()
    try:
        protocol.connect("127.0.0.1", port, 10.0, "server").close()
    finally:
        thread.join()
        listener.close()


# -- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(plan_file):
    """A dealer and a server shared by the tests that only need a running pair."""
    dealer, dealer_addr = start_dealer()
    try:
        server, server_addr = start_server(plan_file, "--dealer", dealer_addr)
    except BaseException:
        dealer.terminate()
        raise
    yield {"dealer": dealer, "server": server, "address": server_addr, "dealer_address": dealer_addr}
    assert server.terminate() == 0, server.err[-5:]
    assert dealer.terminate() == 0, dealer.err[-5:]


# -- roles as processes ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_dealer_listens_answers_ping_refuses_clients_and_stops_on_sigterm():
    start = time.monotonic()
    dealer, address = start_dealer()
    try:
        assert time.monotonic() - start < 20  # printed before any slow import
        host, port = protocol.parse_address(address)
        sec = security("server")
        assert auth.request(host, port, {"type": "ping"}, 5, 5, "dealer", "pong", security=sec,
                            role="server")["role"] == "dealer"
        with pytest.raises(protocol.RemoteError, match="pi-server"):
            auth.request(host, port, {"type": "info"}, 5, 5, "dealer", "info", security=sec, role="server")
        join = {"type": "join", "session_id": "x", "host": "127.0.0.1", "port": 0, "timeout_s": 5}
        # a client cannot ask the dealer for anything, not even by claiming to be a server: its certificate
        # proves the client role
        for claim in ("client", "server"):
            with pytest.raises(protocol.AuthError, match="authenticated as client .*may not connect here"):
                auth.request(host, port, join, 5, 5, "dealer", "joined", security=security(), role=claim)
        with pytest.raises(protocol.RemoteError, match="session_id.*32 lowercase hex"):
            auth.request(host, port, join, 5, 5, "dealer", "joined", security=sec, role="server")
        with pytest.raises(protocol.AuthError, match="same token"):
            auth.request(host, port, {"type": "ping"}, 5, 5, "dealer", "pong", security=security("server", "ab" * 16),
                         role="server")
    finally:
        assert dealer.terminate(20) == 0
    assert dealer.out[-1].endswith("stopped")


@pytest.mark.slow
def test_info(cluster, plan):
    done = client("info", "--server", cluster["address"], "--json", *CLIENT_FAST)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["plan_hash"] == plan.plan_hash and info["classes"] == CLASSES
    assert info["input_shape"] == [3, 32, 32] and info["relu_count"] == plan.relu_count > 0
    assert info["insecure_tfp"] is False and "tensors" not in info["plan"]
    text = client("info", "--server", cluster["address"], *CLIENT_FAST)
    assert text.returncode == 0 and f"{plan.relu_count:,}" in text.stdout and "secure" in text.stdout


@pytest.mark.slow
def test_secure_predictions_equal_plaintext_and_sessions_leave_nothing_behind(cluster, plan):
    images = IMAGES[::5][:4]  # four different classes
    done = client("infer", "--server", cluster["address"], "--batch-size", "2", "--json", *CLIENT_FAST,
                  *map(str, images))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert_matches_plaintext(doc["images"], plaintext(plan, images))
    assert doc["insecure_tfp"] is False and doc["plan_hash"] == plan.plan_hash
    lat = doc["latency"]
    assert {"total_s", "setup_s", "online_s", "relu_share", "mb_sent", "mb_received", "rounds"} <= set(lat)
    assert lat["sessions"] == 2 and lat["rounds"] > 0 and lat["mb_sent"] > 0 and 0 < lat["relu_share"] < 1
    sessions = doc["sessions"]
    assert len({s["session_id"] for s in sessions}) == 2  # a fresh session id per session ...
    # ... and no port of its own: the party links run to the server's and the dealer's ports
    assert all(s["rendezvous"] is None and s["dealer"] == cluster["dealer_address"] for s in sessions)
    assert doc["trust"] == ["single-operator trust"]
    for role in ("server", "dealer"):
        eventually(lambda: not cluster[role].children(), 20, f"{role} workers reaped")


@pytest.mark.slow
def test_several_queries_share_one_session(cluster, plan):
    """--session-size 3 --batch-size 1: one session (one rendezvous, one weight opening), three queries."""
    images = IMAGES[1::5][:3]
    done = client("infer", "--server", cluster["address"], "--batch-size", "1", "--session-size", "3", "--json",
                  *CLIENT_FAST, *map(str, images))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert_matches_plaintext(doc["images"], plaintext(plan, images))
    (session,) = doc["sessions"]
    assert session["images"] == 3 and session["queries"] == 3
    assert doc["latency"]["sessions"] == 1


@pytest.mark.slow
@pytest.mark.faults
def test_client_that_dies_mid_session_does_not_stop_the_server(cluster, plan):
    server = cluster["server"]
    before = len(server.out)
    victim = Proc("client", "infer", "--server", cluster["address"], *CLIENT_FAST, str(IMAGES[1]))
    try:
        m = eventually(lambda: next((re.search(r"session (\w+): 1 image\(s\), TLS links", l)
                                     for l in server.out[before:] if "TLS links" in l), None), 60,
                       "the victim's session starting")
        client_workers = victim.children()
        victim.p.kill()
        victim.p.wait(10)
    finally:
        victim.terminate()
    sid = m.group(1)
    server.wait_line(rf"session {sid}: ended", 60)
    eventually(lambda: not any(map(alive, client_workers)), 20, "the dead client's worker exiting")
    for role in ("server", "dealer"):
        eventually(lambda: not cluster[role].children(), 20, f"{role} workers reaped")
    # The next client is served; its text output has the prediction and the latency table.
    done = client("infer", "--server", cluster["address"], *CLIENT_FAST, str(IMAGES[2]))
    assert done.returncode == 0, done.stderr
    expected = plaintext(plan, [IMAGES[2]])[0]
    image, name, probability = done.stdout.splitlines()[0].split()
    assert (image, name) == (str(IMAGES[2]), expected["class_name"])
    assert abs(float(probability) - expected["probability"]) < 0.02
    for row in ("total", "setup", "inference", "ReLU share", "sent", "received", "rounds"):
        assert re.search(rf"^\s+{row}\s", done.stdout, re.M), (row, done.stdout)
    assert "INSECURE" not in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.faults
def test_bad_and_wrongly_sized_images_are_one_line_errors(cluster, tmp_path):
    from PIL import Image
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image\n")
    assert_one_line_error(client("infer", "--server", cluster["address"], *CLIENT_FAST, str(not_image)),
                          "not a readable image")
    small = tmp_path / "small.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(small)
    assert_one_line_error(client("infer", "--server", cluster["address"], *CLIENT_FAST, str(small)),
                          r"16x16 .* 32x32: pass --resize")
    assert_one_line_error(client("infer", "--server", cluster["address"], *CLIENT_FAST, str(tmp_path / "none.png")),
                          "does not exist")
    assert_one_line_error(client("infer", "--server", cluster["address"], "--batch-size", "1000", *CLIENT_FAST,
                                 str(IMAGES[0])), "limit of 64")
    eventually(lambda: not cluster["server"].children(), 10, "no session started")


@pytest.mark.slow
@pytest.mark.faults
def test_bad_plan_file_is_refused_with_one_line(tmp_path):
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"definitely not a plan")
    for path, pattern in ((bad, "not a secure plan"), (tmp_path / "missing.plan", "does not exist")):
        for mode in (["--insecure-tfp"], ["--dealer", f"127.0.0.1:{free_port()}"]):
            server = Proc("server", "--plan", str(path), "--port", "0", *mode)
            assert server.p.wait(60) == 2
            server.terminate()
            assert len(server.err) == 1 and server.err[0].startswith("error: "), server.err
            assert re.search(pattern, server.err[0]), server.err


@pytest.mark.slow
@pytest.mark.faults
def test_unreachable_dealer_is_one_line_error(plan_file):
    port = free_port()
    server = Proc("server", "--plan", str(plan_file), "--port", "0", "--dealer", f"127.0.0.1:{port}",
                  "--dealer-timeout", "1")
    assert server.p.wait(120) == 2
    server.terminate()
    assert len(server.err) == 1 and re.match(r"error: cannot reach the dealer at 127\.0\.0\.1:\d+", server.err[0])
    # A dealer that goes away after the server started: the session fails, the server keeps serving.
    dealer, dealer_addr = start_dealer()
    server, address = start_server(plan_file, "--dealer", dealer_addr, "--dealer-timeout", "1")
    try:
        assert dealer.terminate() == 0
        assert_one_line_error(client("infer", "--server", address, *CLIENT_FAST, str(IMAGES[0])),
                              "cannot reach the dealer")
        assert client("info", "--server", address, *CLIENT_FAST).returncode == 0
        assert not server.children()
    finally:
        assert server.terminate() == 0


@pytest.mark.slow
@pytest.mark.faults
def test_unreachable_server_is_one_line_error():
    start = time.monotonic()
    assert_one_line_error(client("info", "--server", f"127.0.0.1:{free_port()}", "--connect-timeout", "1"),
                          "cannot reach the server")
    assert time.monotonic() - start < 30
    assert_one_line_error(client("info", "--server", "nonsense"), "HOST:PORT")


@pytest.mark.slow
def test_crypten_engine_runs_through_the_three_roles_and_is_opt_in_on_each(cluster, plan_file, plan):
    """--engine crypten: pi-dealer serves CrypTen's TTP, pi-server offers the reference engine, pi-client asks
    for it; secure == plaintext. Each side refuses the other engine with one line: a fast server against a
    crypten dealer at start-up, a client that did not ask for crypten, a crypten client at a fast server."""
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--engine", "crypten", *FAST)
    server = None
    try:
        dealer_addr = dealer.address()
        mismatched = Proc("server", "--plan", str(plan_file), "--port", "0", "--dealer", dealer_addr, *SERVER_FAST)
        assert mismatched.p.wait(120) == 2
        mismatched.terminate()
        assert len(mismatched.err) == 1 and re.match(r"error: the dealer .* serves the crypten engine, this server "
                                                     r"the fast engine", mismatched.err[0]), mismatched.err
        server, address = start_server(plan_file, "--dealer", dealer_addr, "--engine", "crypten")
        assert "crypten" in " ".join(server.err) and "gloo" in " ".join(server.err)  # the start-up warning
        assert_one_line_error(client("infer", "--server", address, *CLIENT_FAST, str(IMAGES[0])),
                              r"runs the crypten engine, this client asked for fast: pass --engine crypten")
        assert_one_line_error(client("infer", "--server", cluster["address"], "--engine", "crypten", *CLIENT_FAST,
                                     str(IMAGES[0])), r"runs the fast engine, this client asked for crypten")
        images = IMAGES[::7][:2]
        done = client("infer", "--server", address, "--engine", "crypten", "--batch-size", "2", "--json",
                      *CLIENT_FAST, *map(str, images))
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["engine"] == "crypten" and "gloo" in done.stderr  # every output says so
        assert_matches_plaintext(doc["images"], plaintext(plan, images))
        info = json.loads(client("info", "--server", address, "--json", *CLIENT_FAST).stdout)
        assert info["engine"] == "crypten"
        server.wait_line(r"session \w+: .*\(crypten engine\)", 5)
    finally:
        if server is not None:
            assert server.terminate() == 0
        assert dealer.terminate() == 0


@pytest.mark.slow
def test_insecure_tfp_needs_no_dealer_and_says_so(plan_file, plan):
    port = free_port()
    waiting = Proc("client", "info", "--server", f"127.0.0.1:{port}", "--json", "--connect-timeout", "60")
    time.sleep(1.0)  # the client starts first and keeps retrying
    server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", str(port),
                  "--insecure-tfp", *SERVER_FAST)
    try:
        assert server.address() == f"127.0.0.1:{port}"
        server.wait_line("INSECURE", 30, stream="err")
        assert waiting.p.wait(120) == 0 and json.loads("".join(waiting.out))["insecure_tfp"] is True
        # The client decides: without its own opt-in it refuses before any session exists.
        refused = client("infer", "--server", f"127.0.0.1:{port}", *CLIENT_FAST, str(IMAGES[0]))
        assert_one_line_error(refused, r"runs without a dealer .*could decrypt the images.*--allow-insecure-tfp")
        assert not any("session" in line for line in server.out)
        done = client("infer", "--server", f"127.0.0.1:{port}", "--json", "--allow-insecure-tfp", *CLIENT_FAST,
                      *map(str, IMAGES[:2]))
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["insecure_tfp"] is True and "INSECURE" in doc["warning"] and "INSECURE" in done.stderr
        assert_matches_plaintext(doc["images"], plaintext(plan, IMAGES[:2]))
        text = client("info", "--server", f"127.0.0.1:{port}", *CLIENT_FAST)
        assert "INSECURE" in text.stdout
        server.wait_line("INSECURE TFP", 5)
    finally:
        waiting.terminate()
        assert server.terminate() == 0


@pytest.mark.slow
@pytest.mark.faults
def test_sigterm_mid_session_stops_server_and_its_workers(plan_file):
    dealer, dealer_addr = start_dealer()
    server, address = start_server(plan_file, "--dealer", dealer_addr)
    victim = Proc("client", "infer", "--server", address, *CLIENT_FAST, str(IMAGES[3]))
    try:
        server.wait_line(r"session \w+: 1 image\(s\)", 60)
        workers = eventually(server.children, 10, "the server's session worker")
        start = time.monotonic()
        assert server.terminate(30) == 0
        assert time.monotonic() - start < 20
        assert not any(map(alive, workers))
        assert server.err == []  # no traceback
        assert victim.p.wait(60) == 2 and victim.err == ["error: the server is shutting down"]
        eventually(lambda: not dealer.children(), 30, "the dealer's worker stopping")
    finally:
        victim.terminate()
        server.terminate()
        assert dealer.terminate() == 0
