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
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port, subprocess_env
from secure.control import auth, protocol

ROOT = Path(__file__).resolve().parent.parent
IMAGES = sorted((ROOT / "demo" / "images").glob("*.png"))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FAST = ["--read-timeout", "10", "--session-timeout", "240"]
SERVER_FAST = FAST + ["--rendezvous-timeout", "60", "--dealer-timeout", "5"]
CLIENT_FAST = ["--connect-timeout", "10", "--timeout", "240"]
TOKEN = "test-token-" + "0123456789abcdef" * 2


def security(identity: str = "client", token: str = TOKEN) -> auth.Security:
    """What a test process uses to talk to the roles (the token the roles get in role_env)."""
    return auth.Security(auth.Credentials(identity, {auth.SHARED: token.encode()}))


def role_env(**extra) -> dict:
    """The environment of a role or client process: the shared token unless `extra` says otherwise
    (DEEPREDUCE_TOKEN="" removes it)."""
    env = subprocess_env(**{"DEEPREDUCE_TOKEN": TOKEN, **extra})
    if not env["DEEPREDUCE_TOKEN"]:
        del env["DEEPREDUCE_TOKEN"]
    return env


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


# -- process helpers ---------------------------------------------------------------------------------

class Proc:
    """A role started as `python -m MODULE ...`; stdout/stderr are collected line by line."""

    def __init__(self, module: str, *args: str, env: dict | None = None):
        self.p = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env or role_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._pump, args=(s, l), daemon=True)
                         for s, l in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._readers:
            t.start()

    def _pump(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float, stream: str = "out", start: int = 0) -> re.Match:
        """The first line (from line `start` on) that matches, waiting up to `timeout` seconds for it."""
        lines, deadline = (self.out if stream == "out" else self.err), time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines[start:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.p.poll() is not None and all(not t.is_alive() for t in self._readers)):
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; "
                                         f"stdout={self.out[-5:]} stderr={self.err[-5:]}")
                self._cond.wait(min(remaining, 0.2))

    def address(self, timeout: float = 30.0) -> str:
        return self.wait_line(r"^listening on (\S+)$", timeout).group(1)

    def children(self) -> set[int]:
        return worker_children(self.p.pid)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
            for t in self._readers:
                t.join(5)


def worker_children(pid: int) -> set[int]:
    """Party processes of the role `pid`: its children, except multiprocessing's resource tracker (one
    per role, not per session), and the children of its fork server (which itself is not counted)."""
    kids = set()
    for kid in _children(pid):
        command = _cmdline(kid)
        if "resource_tracker" in command:
            continue
        if "forkserver" in command:
            kids |= _children(kid)
        else:
            kids.add(kid)
    return kids


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def listening_ports() -> set[int]:
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def eventually(check, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.2)


def assert_port_free(port: int) -> None:
    eventually(lambda: port not in listening_ports(), 20, f"rendezvous port {port} closed")
    with socket.socket() as s:  # what a fresh c10d store would do
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))


def client(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, env=env or role_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, pattern: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert re.search(pattern, lines[0]), lines[0]


def start_dealer() -> tuple[Proc, str]:
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", *FAST)
    return dealer, dealer.address()


def start_server(plan_file, *args: str) -> tuple[Proc, str]:
    server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", *SERVER_FAST, *args)
    address = server.address()
    server.wait_line(r"serving plan", 120)
    return server, address


# -- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    """A random-weight ResNet18 (alpha 0.25, culled, thinned) exported to a secure plan."""
    if len(IMAGES) < 4:
        pytest.skip("demo/images holds fewer than 4 CIFAR-10 images")
    import torch
    from deepreduce.checkpoint import Checkpoint
    from deepreduce.data import load_image_files, normalize
    from deepreduce.models import build_model
    from deepreduce.spec import ModelSpec
    from secure.core.export import export_plan
    torch.manual_seed(0)
    spec = ModelSpec(alpha=0.25, cull=(1, 4), thin="bottom", stem_relu=False)
    model = build_model(spec)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    x = normalize(load_image_files([str(p) for p in IMAGES], 3, 32), mean, std)
    for m in model.modules():  # batch-norm statistics from real images: well-scaled activations
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    folder = tmp_path_factory.mktemp("plan")
    Checkpoint(spec, model.eval().state_dict(), mean, std, CLASSES).save(str(folder / "model.pt"))
    export_plan(str(folder / "model.pt")).save(str(folder / "model.plan"))
    return folder / "model.plan"


@pytest.fixture(scope="module")
def plan(plan_file):
    from secure.core.plan import SecurePlan
    return SecurePlan.load(str(plan_file))


@pytest.fixture(scope="module")
def cluster(plan_file):
    """A dealer and a server shared by the tests that only need a running pair."""
    dealer, dealer_addr = start_dealer()
    try:
        server, server_addr = start_server(plan_file, "--dealer", dealer_addr)
    except BaseException:
        dealer.terminate()
        raise
    yield {"dealer": dealer, "server": server, "address": server_addr}
    assert server.terminate() == 0, server.err[-5:]
    assert dealer.terminate() == 0, dealer.err[-5:]


def plaintext(plan, paths):
    from secure.core.plan import predict_files
    return predict_files(plan, [str(p) for p in paths])


def assert_matches_plaintext(records: list[dict], expected: list[dict]) -> None:
    assert [r["image"] for r in records] == [e["image"] for e in expected]
    for r, e in zip(records, expected):
        assert r["class_index"] == e["class_index"] and r["class_name"] == e["class_name"], (r, e)
        assert abs(r["probability"] - e["probability"]) < 0.02, (r, e)


def session_ports(doc: dict) -> list[int]:
    return [int(s["rendezvous"].rsplit(":", 1)[1]) for s in doc["sessions"]]


# -- roles as processes ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_dealer_listens_answers_ping_refuses_clients_and_stops_on_sigterm():
    start = time.monotonic()
    dealer, address = start_dealer()
    try:
        assert time.monotonic() - start < 20  # printed before any slow import
        host, port = protocol.parse_address(address)
        sec = security()
        assert auth.request(host, port, {"type": "ping"}, 5, 5, "dealer", "pong", security=sec)["role"] == "dealer"
        with pytest.raises(protocol.RemoteError, match="pi-server"):
            auth.request(host, port, {"type": "info"}, 5, 5, "dealer", "info", security=sec)
        join = {"type": "join", "session_id": "x", "host": "127.0.0.1", "port": 0, "timeout_s": 5}
        with pytest.raises(protocol.RemoteError, match="only a pi-server"):
            auth.request(host, port, join, 5, 5, "dealer", "joined", security=sec)
        with pytest.raises(protocol.RemoteError, match="port"):
            auth.request(host, port, join, 5, 5, "dealer", "joined", security=security("server"), role="server")
        with pytest.raises(protocol.AuthError, match="tokens differ"):
            auth.request(host, port, {"type": "ping"}, 5, 5, "dealer", "pong", security=security(token="x" * 32))
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
    ports = session_ports(doc)
    assert len(set(ports)) == 2  # a fresh rendezvous port per session
    for role in ("server", "dealer"):
        eventually(lambda: not cluster[role].children(), 20, f"{role} workers reaped")
    for port in ports:
        assert_port_free(port)


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
        m = eventually(lambda: next((re.search(r"session (\w+): 1 image\(s\), rendezvous \S+:(\d+)", l)
                                     for l in server.out[before:] if "rendezvous" in l), None), 60,
                       "the victim's session starting")
        client_workers = victim.children()
        victim.p.kill()
        victim.p.wait(10)
    finally:
        victim.terminate()
    sid, port = m.group(1), int(m.group(2))
    server.wait_line(rf"session {sid}: ended", 60)
    eventually(lambda: not any(map(alive, client_workers)), 20, "the dead client's worker exiting")
    for role in ("server", "dealer"):
        eventually(lambda: not cluster[role].children(), 20, f"{role} workers reaped")
    assert_port_free(port)
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
        done = client("infer", "--server", f"127.0.0.1:{port}", "--json", *CLIENT_FAST, *map(str, IMAGES[:2]))
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
