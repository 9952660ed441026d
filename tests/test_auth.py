"""Control connections over the transport's TLS links with role certificates (secure/control/auth.py), the
shared token of single-operator mode, and the model-stealing limits (secure/control/limits.py): unit
tests on loopback sockets, then the roles as processes."""

from __future__ import annotations

import json
import re
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


# -- unit: control connections on loopback -----------------------------------------------------------

def identity(role: str, secret: str = SECRET) -> auth.Security:
    from secure.transport.credentials import PartyIdentity
    return auth.Security(PartyIdentity.from_secret(bytes.fromhex(secret), role), role)


def control(connector: auth.Security, listener: auth.Security, listener_role: str, as_role: str | None = None):
    """(connector's channel or exception, listener's channel or exception, bytes on the wire)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    out, wire = {}, bytearray()

    def accept():
        from secure.transport.preface import read_preface
        conn, addr = lsock.accept()
        try:
            got = read_preface(conn, 5)
            out["r"] = auth.accept_control(conn, got, listener, listener_role, "127.0.0.1:%d" % addr[1])
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            out["r"] = exc
    t = threading.Thread(target=accept)
    t.start()
    try:
        out["i"] = auth.open_channel(*lsock.getsockname()[:2], connector, 5, 5, listener_role,
                                     as_role or connector.party.role)
    except Exception as exc:  # noqa: BLE001
        out["i"] = exc
    t.join(10)
    lsock.close()
    return out["i"], out["r"], wire


def test_control_channel_proves_roles_by_certificate_and_carries_messages():
    ci, cr, _ = control(identity("client"), identity("server"), "server")
    assert isinstance(ci, auth.LinkControlChannel) and isinstance(cr, auth.LinkControlChannel), (ci, cr)
    assert ci.peer_role == "server" and cr.peer_role == "client" and cr.limit_key == "ip:127.0.0.1"
    ci.send("info", n=1)
    assert cr.recv(2.0)["n"] == 1
    cr.send("info", plan={"x": [1.5, "é"]})
    assert ci.recv(2.0)["plan"] == {"x": [1.5, "é"]}
    ci.close()
    with pytest.raises(protocol.PeerClosed):
        cr.recv(2.0)
    cr.close()


def test_wrong_token_and_no_auth_are_refused_at_the_handshake():
    ci, cr, _ = control(identity("client", "f" * 64), identity("server"), "server")
    assert isinstance(ci, protocol.AuthError) and "same token" in str(ci), ci
    assert isinstance(cr, Exception) and not isinstance(cr, auth.LinkControlChannel)
    from secure.transport.credentials import PartyIdentity
    ci, cr, _ = control(auth.Security(PartyIdentity.no_auth("client"), "client"), identity("server"), "server")
    assert isinstance(ci, protocol.AuthError) and isinstance(cr, Exception)


def test_roles_may_open_control_connections_only_where_they_belong():
    """A client cannot talk to a dealer's control port, nor pose as a server: its certificate proves
    the client role, whatever its preface claims."""
    for claim in ("client", "server"):
        ci, cr, _ = control(identity("client"), identity("dealer"), "dealer", as_role=claim)
        assert isinstance(cr, protocol.AuthError) and "authenticated as client 'shared'" in str(cr), cr
        assert isinstance(ci, protocol.AuthError) and "refused this party" in str(ci), ci  # told why
    ci, cr, _ = control(identity("server"), identity("dealer"), "dealer")
    assert isinstance(ci, auth.LinkControlChannel) and cr.peer_role == "server"
    ci.close()
    cr.close()


def test_role_credentials_quota_per_certificate(tmp_path):
    from secure.transport.credentials import PartyIdentity, RoleCredential
    for role, name in (("server", "s"), ("client", "alice"), ("client", "bob")):
        RoleCredential.generate(role, name).save(tmp_path / f"{name}.key", tmp_path / f"{name}.crt")
    clients = [str(tmp_path / "alice.crt"), str(tmp_path / "bob.crt")]
    server = auth.Security(PartyIdentity.from_files("server", tmp_path / "s.key", tmp_path / "s.crt",
                                                    {"client": clients}), "server")
    keys = set()
    for name in ("alice", "bob"):
        me = auth.Security(PartyIdentity.from_files("client", tmp_path / f"{name}.key", tmp_path / f"{name}.crt",
                                                    {"server": [str(tmp_path / "s.crt")]}), name)
        ci, cr, _ = control(me, server, "server")
        assert cr.peer_id == name and cr.limit_key.startswith("cert:")
        keys.add(cr.limit_key)
        ci.close()
        cr.close()
    assert len(keys) == 2  # each client certificate has its own quota


def test_token_sources_and_mistakes(tmp_path, monkeypatch):
    from client.app import build_parser as client_parser
    from secure.control.dealer import build_parser as dealer_parser
    from server.app import build_parser as server_parser
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    shared = tmp_path / "shared"
    shared.write_text(f"# a comment\n{SECRET}\n")
    shared.chmod(0o600)
    assert auth.read_token_file(str(shared)) == bytes.fromhex(SECRET)
    for text, match in ((f"alice {SECRET}\n", "more than one token"), ("short\n", "not a hex secret of at least 128 bits"),
                        ("ab" * 15 + "\n", "at least 128 bits"),  # 120 bits
                        ("correct-horse-battery-staple-passphrase\n", "not a hex secret"), ("# nothing\n", "holds no token"),
                        (f"{SECRET}\n{SECRET}\n", "more than one token")):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(protocol.ControlError, match=match):
            auth.read_token_file(str(bad))
    p = server_parser()
    args = p.parse_args(["--plan", "x", "--dealer", "h:1"])
    with pytest.raises(protocol.ControlError, match=r"no credentials: .*--token-file FILE or set \$DEEPREDUCE_TOKEN; .*--no-auth"):
        auth.security_from_args(args, "127.0.0.1", "server")
    monkeypatch.setenv(auth.TOKEN_ENV, SECRET)
    sec = auth.security_from_args(args, "127.0.0.1", "server")
    assert sec.party.trust_mode == "single-operator trust" and sec.identity == "server" and sec.party.role == "server"
    with pytest.raises(protocol.ControlError, match="only listens on a loopback"):
        auth.security_from_args(p.parse_args(["--plan", "x", "--no-auth"]), "0.0.0.0", "server")
    assert auth.security_from_args(p.parse_args(["--plan", "x", "--no-auth"]), "127.0.0.1", "server").no_auth
    with pytest.raises(protocol.ControlError, match="exclude each other"):
        auth.security_from_args(p.parse_args(["--plan", "x", "--no-auth", "--token-file", str(shared)]), "::1", "server")
    with pytest.raises(protocol.ControlError, match="go together"):
        auth.security_from_args(p.parse_args(["--plan", "x", "--cert", "c.pem"]), "127.0.0.1", "server")
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


def test_a_warm_sessions_reservation_is_settled_with_what_it_used():
    q = QueryLimiter(10, 100.0, clock=lambda: 0.0)
    t = q.reserve("a", 8)  # a warm session reserves its images up front
    assert q.left("a") == 2
    q.settle(t, 3)  # it classified 3: the other 5 come back
    assert q.left("a") == 7
    q.settle(q.reserve("a", 7), None)  # it failed: what it used is unknown, all of it stays used
    assert q.left("a") == 0
    q.settle(None, 5)  # no quota configured: nothing to settle


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
        # a version-2 control request (no preface, no TLS): answered with both versions, then closed
        with socket.create_connection((host, port), 5) as s:
            protocol.send(s, "session", batch_size=1, plan_hash="x")
            reply = protocol.recv(s, 5)
            tried += 1
        assert reply["type"] == "error" and "speaks protocol version 3" in reply["message"]
        # garbage where the preface belongs
        with socket.create_connection((host, port), 5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(8))
            s.settimeout(5)
            try:
                assert s.recv(100) == b""  # refused unanswered: it does not speak the transport
            except ConnectionResetError:
                pass
            tried += 1
        # the real client with the wrong token, with none, and without authentication
        assert_one_line_error(client("info", "--server", address, *CLIENT_FAST,
                                     env=role_env(DEEPREDUCE_TOKEN="f" * 32)), "same token")
        assert_one_line_error(client("infer", "--server", address, *CLIENT_FAST, str(IMAGES[0]),
                                     env=role_env(DEEPREDUCE_TOKEN="")), "no credentials: .*--token-file")
        assert_one_line_error(client("infer", "--server", address, "--no-auth", *CLIENT_FAST, str(IMAGES[0])),
                              "certificate is not trusted")
        tried += 3
        server.wait_line(r"refused 127\.0\.0\.1:\d+: .*(certificate|TLS)", 10)
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
def test_label_only_and_query_limits_per_client_credential(plan_file, plan, tmp_path):
    """Role credentials on all three roles (no shared token): alice and mallory hold their own client
    certificates, so each has her own quota."""
    from secure.transport.credentials import RoleCredential
    cred = role_credentials(tmp_path)
    RoleCredential.generate("client", "mallory").save(tmp_path / "mallory.key", tmp_path / "mallory.crt")
    for role in ("server", "dealer"):  # both accept either client
        cred[role] += ["--trust-client", str(tmp_path / "mallory.crt")]
    env = role_env(DEEPREDUCE_TOKEN="")
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--id", "dealer-a", *cred["dealer"],
                  *FAST, env=env)
    server = None
    try:
        dealer_addr = dealer.address()
        server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", "--dealer", dealer_addr,
                      "--label-only", "--max-queries", "5", *cred["server"], *SERVER_FAST, env=env)
        address = server.address()
        server.wait_line("serving plan .*label-only", 120)
        mallory = ["--key", str(tmp_path / "mallory.key"), "--cert", str(tmp_path / "mallory.crt"),
                   *cred["client"][4:]]  # her own key, the same trusted peers

        def pi(*args, who="alice"):
            return client(*args, "--server", address, *(cred["client"] if who == "alice" else mallory), *CLIENT_FAST,
                          env=env)
        info = pi("info", "--json")
        assert info.returncode == 0, info.stderr
        doc = json.loads(info.stdout)
        assert doc["label_only"] is True and doc["dealer_id"] == "dealer-a" and doc["queries_left"] == 5
        assert doc["relu_count"] > plan.relu_count  # the label head runs under encryption too
        images = [IMAGES[0], IMAGES[10]]
        done = pi("infer", "--json", *map(str, images))
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        expected = plaintext(plan, images)
        assert result["label_only"] is True and result["trust"] == ["role credentials"]
        assert [r["class_index"] for r in result["images"]] == [e["class_index"] for e in expected]
        assert all(r["probability"] is None for r in result["images"])
        done = pi("infer", "--json", *map(str, images[:1]))
        assert done.returncode == 0, done.stderr
        # alice has used 3 of her 5 images
        assert_one_line_error(pi("infer", *map(str, images + images)), r"query limit reached: 3 of 5 images")
        assert json.loads(pi("info", "--json").stdout)["queries_left"] == 2
        assert json.loads(pi("info", "--json", who="mallory").stdout)["queries_left"] == 5  # her own quota
        eventually(lambda: not server.children() and not dealer.children(), 20, "workers reaped")
        print("\nmodel-stealing figures: label-only sessions revealed 3 labels and 0 logits; query limit 5 images "
              "per client certificate: refused the request for 4 more after 3")
    finally:
        if server is not None:
            assert server.terminate() == 0
        assert dealer.terminate() == 0
