"""The authenticated control channel (secure/control/auth.py, secure/control/protocol.py), TLS, dealer attestation and
the model-stealing limits (secure/control/limits.py): unit tests on socket pairs, then the roles as processes."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from secure.control import auth, protocol
from secure.control.limits import QueryLimiter, QuotaExceeded, label_only_plan, labels_from_head
from support.env import ROOT
from support.roles import (CLIENT_FAST, FAST, IMAGES, SERVER_FAST, Proc, assert_one_line_error, client, eventually,
                           plaintext, role_credentials, role_env)

SECRET = "a1b2c3d4" * 8  # a hex token (256 bits)


# -- unit: the handshake on socket pairs ------------------------------------------------------------

class Recorder:
    """A socket that records every byte sent through it."""

    def __init__(self, sock):
        self.sock, self.sent = sock, bytearray()

    def sendall(self, data):
        self.sent += data
        return self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def creds(identity="client", token=SECRET, keyring=None, no_auth=False) -> auth.Credentials:
    return auth.Credentials(identity, keyring if keyring is not None else ({} if no_auth else {auth.SHARED: token.encode()}),
                            no_auth=no_auth)


def handshake(i_creds, r_creds, i_role="client", r_role="server"):
    """(initiator result, responder result, sockets): each result is a Channel or the exception raised."""
    a, b = socket.socketpair()
    a, b = Recorder(a), Recorder(b)
    out = {}

    def responder():
        try:
            out["r"] = auth.respond(b, r_creds, r_role, 5.0, "127.0.0.1:5555")
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            out["r"] = exc
            protocol.send_error(b, str(exc))
    t = threading.Thread(target=responder)
    t.start()
    try:
        out["i"] = auth.initiate(a, i_creds, i_role, r_role, 5.0, "server at test")
    except Exception as exc:  # noqa: BLE001
        out["i"] = exc
        a.close()
    t.join(10)
    return out["i"], out["r"], (a, b)


def test_handshake_authenticates_both_sides_and_the_token_never_crosses_the_wire():
    ci, cr, (a, b) = handshake(creds(), creds("server"))
    assert isinstance(ci, protocol.ControlChannel) and isinstance(cr, protocol.ControlChannel), (ci, cr)
    assert ci.key == cr.key and len(ci.key) == 32 and ci.peer_role == "server" and cr.peer_id == "client"
    ci.send("info", n=1)
    assert cr.recv(2.0)["n"] == 1
    cr.send("info", plan={"x": [1.5, "é"]})
    assert ci.recv(2.0)["plan"] == {"x": [1.5, "é"]}
    wire = bytes(a.sent + b.sent)
    for secret in (SECRET.encode(), SECRET.encode().hex().encode(), ci.key, ci.key.hex().encode()):
        assert secret not in wire
    # a second handshake with the same token derives another key (fresh nonces)
    ci2, cr2, _ = handshake(creds(), creds("server"))
    assert ci2.key != ci.key


def test_wrong_token_fails_on_both_sides():
    ci, cr, _ = handshake(creds(token="w" * 32), creds("server"))
    assert isinstance(ci, protocol.AuthError) and "tokens differ" in str(ci)
    assert isinstance(cr, protocol.PeerClosed)  # the client stops before proving anything
    # a peer that answers the challenge with a made-up proof is refused by the responder
    a, b = socket.socketpair()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", _catch(auth.respond, b, creds("server"), "server", 5.0,
                                                                       "127.0.0.1:1")))
    t.start()
    protocol.send(a, "hello", role="client", id="client", nonce="0" * 64, auth=auth.SCHEME)
    assert protocol.recv(a, 2.0)["type"] == "challenge"
    protocol.send(a, "auth", proof="f" * 64)
    t.join(5)
    assert isinstance(result["r"], protocol.AuthError) and "wrong token" in str(result["r"])


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        return exc


def test_altered_replayed_and_reflected_messages_are_refused():
    ci, cr, (a, b) = handshake(creds(), creds("server"))
    start = len(a.sent)
    ci.send("session", batch_size=1, plan_hash="ab")
    frame = bytes(a.sent[start:])
    assert cr.recv(2.0)["batch_size"] == 1
    a.sock.sendall(frame)  # replay: the same bytes again
    with pytest.raises(protocol.ProtocolError, match="out of sequence"):
        cr.recv(2.0)
    ci2, cr2, (a2, b2) = handshake(creds(), creds("server"))
    start = len(a2.sent)
    ci2.send("session", batch_size=1, plan_hash="ab")
    assert cr2.recv(2.0)["batch_size"] == 1
    altered = bytes(a2.sent[start:]).replace(b'"batch_size":1', b'"batch_size":9')
    assert altered != bytes(a2.sent[start:])
    a2.sock.sendall(altered)
    with pytest.raises(protocol.ProtocolError, match="failed authentication"):
        cr2.recv(2.0)
    ci3, cr3, (a3, b3) = handshake(creds(), creds("server"))
    start = len(b3.sent)
    cr3.send("pong", role="server")
    reflected = bytes(b3.sent[start:])
    assert ci3.recv(2.0)["type"] == "pong"
    a3.sock.sendall(reflected)  # the server's own message sent back to it
    with pytest.raises(protocol.ProtocolError, match="failed authentication"):
        cr3.recv(2.0)
    # a message from another connection (another key) is refused too
    a4_frame = protocol.encode({"type": "ping", "seq": 0, "mac": "0" * 64})
    b.sock.sendall(a4_frame)  # noise into the first connection's client side
    with pytest.raises(protocol.ProtocolError, match="failed authentication"):
        ci.recv(2.0)


def test_authentication_mismatches_are_clear():
    ci, cr, _ = handshake(creds(), creds("server", no_auth=True))
    assert isinstance(ci, protocol.AuthError) and "without authentication" in str(ci)
    ci, cr, _ = handshake(creds(no_auth=True), creds("server"))
    assert isinstance(cr, protocol.AuthError) and "requires authentication" in str(cr)
    assert isinstance(ci, protocol.AuthError) and "requires authentication" in str(ci)
    ci, cr, _ = handshake(creds(no_auth=True), creds("server", no_auth=True))
    assert isinstance(ci, protocol.ControlChannel) and ci.key is None and cr.limit_key == "ip:127.0.0.1"
    ci, cr, _ = handshake(creds(), creds("dealer"), r_role="dealer")
    assert isinstance(ci, protocol.ControlChannel)
    a, b = socket.socketpair()
    t = threading.Thread(target=lambda: _catch(auth.respond, b, creds("dealer"), "dealer", 5.0, "127.0.0.1:1"))
    t.start()
    with pytest.raises(protocol.ControlError, match="is a pi-dealer, not a pi-server"):
        auth.initiate(a, creds(), "client", "server", 5.0, "server at x")
    a.close()
    t.join(5)


def test_named_tokens_identify_clients():
    keyring = {"alice": b"alice-token-0123456789", "bob": b"bob-token-0123456789ab"}
    ci, cr, _ = handshake(creds("alice", keyring={auth.SHARED: keyring["alice"]}), creds("server", keyring=keyring))
    assert isinstance(cr, protocol.ControlChannel) and cr.limit_key == "id:alice" and cr.peer_id == "alice"
    ci, cr, _ = handshake(creds("alice", keyring={auth.SHARED: keyring["bob"]}), creds("server", keyring=keyring))
    assert isinstance(ci, protocol.AuthError)  # bob's token does not make you alice
    ci, cr, _ = handshake(creds("carol", keyring={auth.SHARED: keyring["bob"]}), creds("server", keyring=keyring))
    assert isinstance(ci, protocol.AuthError) and "tokens differ" in str(ci)  # unknown id: like a wrong token
    ci, cr, _ = handshake(creds("anyone"), creds("server"))
    assert cr.limit_key == "ip:127.0.0.1"  # a shared token does not prove an identity


def test_token_sources_and_mistakes(tmp_path, monkeypatch):
    from client.app import build_parser as client_parser
    from secure.control.dealer import build_parser as dealer_parser
    from server.app import build_parser as server_parser
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    shared = tmp_path / "shared"
    shared.write_text(f"# a comment\n{SECRET}\n")
    shared.chmod(0o600)
    assert auth.read_token_file(str(shared)) == {auth.SHARED: SECRET.encode()}
    named = tmp_path / "named"
    named.write_text(f"alice {SECRET}\nserver {SECRET[::-1]}  # the server's own\n")
    named.chmod(0o600)
    assert set(auth.read_token_file(str(named))) == {"alice", "server"}
    for text, match in ((f"a b {SECRET}\n", "is not `TOKEN`"), ("short\n", "not a hex secret of at least 128 bits"),
                        ("ab" * 15 + "\n", "at least 128 bits"),  # 120 bits
                        ("correct-horse-battery-staple-passphrase\n", "not a hex secret"), ("# nothing\n", "holds no token"),
                        (f"{SECRET}\n{SECRET}\n", "two tokens")):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(protocol.ControlError, match=match):
            auth.read_token_file(str(bad))
    p = server_parser()
    args = p.parse_args(["--plan", "x", "--dealer", "h:1"])
    with pytest.raises(protocol.ControlError, match=r"no token: .*--token-file FILE, or set \$DEEPREDUCE_TOKEN; .*--no-auth"):
        auth.security_from_args(args, "127.0.0.1")
    monkeypatch.setenv(auth.TOKEN_ENV, SECRET)
    sec = auth.security_from_args(args, "127.0.0.1")
    assert sec.creds.keyring == {auth.SHARED: SECRET.encode()} and sec.creds.identity == "server"
    with pytest.raises(protocol.ControlError, match="only listens on a loopback"):
        auth.security_from_args(p.parse_args(["--plan", "x", "--no-auth"]), "0.0.0.0")
    assert auth.security_from_args(p.parse_args(["--plan", "x", "--no-auth"]), "127.0.0.1").creds.no_auth
    with pytest.raises(protocol.ControlError, match="exclude each other"):
        auth.security_from_args(p.parse_args(["--plan", "x", "--no-auth", "--token-file", str(shared)]), "::1")
    with pytest.raises(protocol.ControlError, match="go together"):
        auth.security_from_args(p.parse_args(["--plan", "x", "--tls-cert", "c.pem"]), "127.0.0.1")
    # no role takes a token on its command line (it would show in process lists)
    for parser, base in ((server_parser(), ["--plan", "x"]), (dealer_parser(), []),
                         (client_parser(), ["info", "--server", "h:1"])):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--token", SECRET])


def test_new_token_command(tmp_path):
    path = tmp_path / "token"
    done = subprocess.run([sys.executable, "-m", "secure.control.auth", "new-token", str(path)], cwd=ROOT, env=role_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and re.fullmatch(r"[0-9a-f]{64}\n", path.read_text())
    again = subprocess.run([sys.executable, "-m", "secure.control.auth", "new-token", str(path)], cwd=ROOT, env=role_env(),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "exists" in again.stderr


def test_dealer_attestation():
    key, nonce = b"dealer-token-0123456789", "ab" * 32
    a = auth.attest(key, "dealer-a", "sid1", 4000, nonce)
    assert auth.verify_attestation(key, "dealer-a", "sid1", 4000, nonce, a)
    for changed in (("dealer-b", "sid1", 4000, nonce), ("dealer-a", "sid2", 4000, nonce),
                    ("dealer-a", "sid1", 4001, nonce), ("dealer-a", "sid1", 4000, "cd" * 32)):
        assert not auth.verify_attestation(key, *changed, a)
    assert not auth.verify_attestation(b"other-token-0123456789", "dealer-a", "sid1", 4000, nonce, a)
    assert not auth.verify_attestation(key, "dealer-a", "sid1", 4000, nonce, None)


# -- unit: model-stealing limits -----------------------------------------------------------------------

@pytest.mark.parametrize("classes", [1, 2, 3, 10, 17])
def test_label_only_head_reveals_only_the_argmax(classes):
    from deepreduce.graph import Op
    from secure.core.plaintext import run_plaintext
    from secure.core.plan import SecurePlan
    g = torch.Generator().manual_seed(classes)
    weight, bias = torch.randn(classes, 6, generator=g), torch.randn(classes, generator=g)
    ops = [{"id": 0, "op": "input", "name": "input", "inputs": [], "shape": [6, 1, 1]},
           {"id": 1, "op": "avgpool", "name": "pool", "inputs": [0], "shape": [6]},
           {"id": 2, "op": "linear", "name": "fc", "inputs": [1], "shape": [classes], "weight": "w", "bias": "b"}]
    base = SecurePlan([Op.from_dict(op) for op in ops], {"w": weight, "b": bias}, (6, 1, 1), [str(i) for i in range(classes)], [0.5] * 6,
                      [0.25] * 6, {}, 0)
    head = label_only_plan(base)
    assert head.plan_hash != base.plan_hash and head.relu_count == max(0, classes - 1) + classes
    assert head.ops[-1].kind == "linear"  # the fast engine reveals a linear layer's output
    x = torch.randn(500, 6, 1, 1, generator=g)
    logits, y = run_plaintext(base, x), run_plaintext(head, x)
    assert torch.equal(y.argmax(1), logits.argmax(1))
    top2 = logits.topk(min(2, classes), dim=1).values
    near_tie = (top2[:, 0] - top2[:, -1] < 2.0 ** -12) if classes > 1 else torch.zeros(500, dtype=torch.bool)
    assert ((y > 0).sum(1)[~near_tie] == 1).all()  # one non-zero entry, the label, unless two logits are within eps
    assert torch.allclose(y.max(1).values, torch.full((500,), 2.0 ** -6, dtype=y.dtype))  # and no margin
    assert [r["class_index"] for r in labels_from_head(y.tolist())] == logits.argmax(1).tolist()


def test_query_limiter_sliding_window():
    now = [0.0]
    q = QueryLimiter(5, 100.0, clock=lambda: now[0])
    t1 = q.reserve("a", 3)
    q.reserve("b", 5)  # another client has its own quota
    with pytest.raises(QuotaExceeded, match=r"3 of 5 images .* retry after 100 s") as info:
        q.reserve("a", 3)
    assert info.value.retry_after == 100
    q.refund(t1)  # a session that failed on the server's side does not count
    q.reserve("a", 5)
    now[0] = 100.5
    assert q.left("a") == 5 and q.left("b") == 5
    assert QueryLimiter(None, 1.0).reserve("a", 10 ** 9) is None


# -- processes --------------------------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.slow
def test_unauthenticated_peers_are_refused_before_any_session(plan_file, tmp_path):
    token = write(tmp_path / "token", SECRET + "\n")
    server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--insecure-tfp",
                  "--token-file", str(token), "--handshake-timeout", "2", *SERVER_FAST, env=role_env(DEEPREDUCE_TOKEN=""))
    try:
        address = server.address()
        server.wait_line("serving plan", 120)
        host, port = protocol.parse_address(address)
        assert SECRET not in Path(f"/proc/{server.p.pid}/cmdline").read_text()
        tried = 0
        # a v1-style request without the handshake
        with socket.create_connection((host, port), 5) as s:
            protocol.send(s, "session", batch_size=1, plan_hash="x")
            reply = protocol.recv(s, 5)
            tried += 1
        assert reply["type"] == "error" and "'hello' first" in reply["message"]
        # a hello without a token
        with socket.create_connection((host, port), 5) as s:
            protocol.send(s, "hello", role="client", id="c", nonce="0" * 64, auth="none")
            reply = protocol.recv(s, 5)
            tried += 1
        assert reply["type"] == "error" and "requires authentication" in reply["message"]
        # a forged proof
        with socket.create_connection((host, port), 5) as s:
            protocol.send(s, "hello", role="client", id="c", nonce="0" * 64, auth=auth.SCHEME)
            assert protocol.recv(s, 5)["type"] == "challenge"
            protocol.send(s, "auth", proof="0" * 64)
            reply = protocol.recv(s, 5)
            tried += 1
        assert reply["type"] == "error" and "wrong token" in reply["message"]
        # the real client with the wrong token, and with none
        assert_one_line_error(client("info", "--server", address, *CLIENT_FAST,
                                     env=role_env(DEEPREDUCE_TOKEN="f" * 32)), "tokens differ")
        assert_one_line_error(client("infer", "--server", address, *CLIENT_FAST, str(IMAGES[0]),
                                     env=role_env(DEEPREDUCE_TOKEN="")), "no token: .*--token-file")
        assert_one_line_error(client("infer", "--server", address, "--no-auth", *CLIENT_FAST, str(IMAGES[0])),
                              "requires authentication")
        tried += 3
        server.wait_line(r"refused 127\.0\.0\.1:\d+: authentication failed", 10)
        assert not any("session" in line for line in server.out), server.out  # no session, no rendezvous port
        assert not server.children()
        ok = client("info", "--server", address, "--json", "--token-file", str(token), *CLIENT_FAST,
                    env=role_env(DEEPREDUCE_TOKEN=""))
        assert ok.returncode == 0, ok.stderr
        print(f"\nauthentication figures: {tried} unauthenticated attempts refused, 0 sessions created, "
              f"0 party processes started")
    finally:
        assert server.terminate() == 0
    assert [line for line in server.err if "INSECURE" not in line] == []  # no traceback


@pytest.mark.slow
def test_label_only_dealer_attestation_and_query_limit(plan_file, plan, tmp_path):
    tokens = {name: secrets.token_hex(16) for name in ("server", "alice", "mallory")}
    server_tokens = write(tmp_path / "server.tokens", "".join(f"{n} {t}\n" for n, t in tokens.items()))
    dealer_tokens = write(tmp_path / "dealer.tokens", f"server {tokens['server']}\n")
    dealer_secret = write(tmp_path / "dealer.secret", secrets.token_hex(16) + "\n")
    other_secret = write(tmp_path / "other.secret", secrets.token_hex(16) + "\n")
    alice = write(tmp_path / "alice.token", tokens["alice"] + "\n")
    mallory = write(tmp_path / "mallory.token", tokens["mallory"] + "\n")
    # Named tokens leave no shared secret: the party links use role credentials (one client credential
    # for every client of this open service; quotas go by the named token).
    cred = role_credentials(tmp_path)
    env = role_env(DEEPREDUCE_TOKEN="")
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--id", "dealer-a", "--token-file",
                  str(dealer_tokens), "--dealer-token-file", str(dealer_secret), *cred["dealer"], *FAST, env=env)
    server = None
    try:
        dealer_addr = dealer.address()
        server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--dealer", dealer_addr,
                      "--token-file", str(server_tokens), "--label-only", "--max-queries", "5", *cred["server"],
                      *SERVER_FAST, env=env)
        address = server.address()
        server.wait_line("serving plan .*label-only", 120)

        def pi(*args, token=alice):
            return client(*args, "--server", address, "--id", "alice" if token == alice else "mallory",
                          "--token-file", str(token), *cred["client"], *CLIENT_FAST, env=env)
        info = pi("info", "--json")
        assert info.returncode == 0, info.stderr
        doc = json.loads(info.stdout)
        assert doc["label_only"] is True and doc["dealer_id"] == "dealer-a" and doc["queries_left"] == 5
        assert doc["relu_count"] > plan.relu_count  # the label head runs under encryption too
        # a dealer the client does not trust, or cannot verify: refused before the images are shared
        assert_one_line_error(pi("infer", "--dealer-id", "dealer-b", "--dealer-token-file", str(dealer_secret),
                                 str(IMAGES[0])), "is 'dealer-a', not 'dealer-b'")
        assert_one_line_error(pi("infer", "--dealer-id", "dealer-a", "--dealer-token-file", str(other_secret),
                                 str(IMAGES[0])), "no valid attestation")
        assert_one_line_error(pi("infer", "--dealer-id", "dealer-a", str(IMAGES[0])), "needs the dealer token")
        images = [IMAGES[0], IMAGES[10]]
        done = pi("infer", "--json", "--dealer-id", "dealer-a", "--dealer-token-file", str(dealer_secret),
                  *map(str, images))
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        expected = plaintext(plan, images)
        assert result["label_only"] is True and all(s["dealer_verified"] for s in result["sessions"])
        assert [r["class_index"] for r in result["images"]] == [e["class_index"] for e in expected]
        assert all(r["probability"] is None for r in result["images"])
        # alice has used 4 of her 5 images (two refused sessions count: the server cannot know why she left)
        assert_one_line_error(pi("infer", *map(str, images)), r"query limit reached: 4 of 5 images")
        assert json.loads(pi("info", "--json").stdout)["queries_left"] == 1
        assert json.loads(pi("info", "--json", token=mallory).stdout)["queries_left"] == 5  # her own quota
        eventually(lambda: not server.children() and not dealer.children(), 20, "workers reaped")
        print(f"\nmodel-stealing figures: label-only session revealed {len(images)} labels and 0 logits; "
              f"query limit 5 images: refused the request for 2 more after 4; untrusted dealers refused: 3")
    finally:
        if server is not None:
            assert server.terminate() == 0
        assert dealer.terminate() == 0


def _openssl_cert(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    done = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                           "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out",
                           str(cert)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"openssl could not make a self-signed certificate: {done.stderr.strip()[-200:]}")
    return cert, key


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a self-signed "
                                                            "certificate (the cryptography package is not installed)")
def test_tls_control_channel(plan_file, plan, tmp_path):
    cert, key = _openssl_cert(tmp_path, "pi")
    other, _ = _openssl_cert(tmp_path, "other")
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key),
                  *FAST)
    server = None
    try:
        dealer_addr = dealer.address()
        server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--dealer", dealer_addr,
                      "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(cert), *SERVER_FAST)
        address = server.address()
        server.wait_line("serving plan.*TLS", 120)
        done = client("infer", "--server", address, "--tls-ca", str(cert), "--json", *CLIENT_FAST, str(IMAGES[5]))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["images"][0]["class_index"] == plaintext(plan, [IMAGES[5]])[0]["class_index"]
        assert_one_line_error(client("info", "--server", address, *CLIENT_FAST), "pass --tls-ca")
        assert_one_line_error(client("info", "--server", address, "--tls-ca", str(other), *CLIENT_FAST),
                              "certificate that --tls-ca does not vouch for")
        with socket.create_connection(protocol.parse_address(address), 5) as s:  # plaintext garbage at a TLS port
            s.sendall(b"\x00\x00\x00\x05hello")
            s.settimeout(10)
            try:
                assert s.recv(100) == b""  # the TLS handshake fails and the server hangs up
            except ConnectionResetError:
                pass
        assert client("info", "--server", address, "--tls-ca", str(cert), *CLIENT_FAST).returncode == 0
    finally:
        if server is not None:
            assert server.terminate() == 0
        assert dealer.terminate() == 0
