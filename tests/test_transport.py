"""secure.transport: role credentials, TLS 1.3 links, the preface and the connection hand-over.

In-process and fast: every server binds 127.0.0.1, every wait is bounded. A man-in-the-middle proxy
(a relay thread that parses TLS records) alters, drops, replays, reorders and truncates the stream."""

from __future__ import annotations

import multiprocessing
import os
import socket
import ssl
import stat
import threading
import time

import pytest

from deepreduce.errors import UserError
from secure.control import protocol
from secure.transport import (VERSION, FrameTooLarge, HandshakeError, LinkClosed, LinkError, LinkTimeout,
                              LinkTLSError, LinkTruncated, PrefaceError, VersionMismatch)
from secure.transport import credentials
from secure.transport import preface as pf
from secure.transport.credentials import (RoleCredential, Trust, check_secret, client_context, fingerprint,
                                          new_secret, read_secret, server_context, write_secret)
from secure.transport.link import Link

T = 10.0  # the bound on every wait here
PATTERN = b"DEEPREDUCE-PLAINTEXT-PATTERN-32B"
assert len(PATTERN) == 32


@pytest.fixture(scope="module")
def creds():
    return {name: RoleCredential.generate(role, name) for name, role in
            [("s1", "server"), ("s2", "server"), ("c1", "client"), ("c2", "client"), ("d1", "dealer")]}


def trust(*pairs) -> Trust:
    t = Trust()
    for role, cred in pairs:
        t.add(role, cred)
    return t


# -- a man in the middle ------------------------------------------------------------------------------

class Proxy:
    """Relays one connection to 127.0.0.1:`port`, TLS record by TLS record (5-byte header + body), and
    keeps a capture and a count of the bytes it forwarded each way. arm(direction, action) tampers with
    the next record(s) of that direction; `edit_preface` rewrites the first 32 bytes client -> server."""

    def __init__(self, port: int, edit_preface=None):
        self.target, self.edit_preface = port, edit_preface
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(T)
        self.port = self.listener.getsockname()[1]
        self.capture = {"c2s": bytearray(), "s2c": bytearray()}
        self.count = {"c2s": 0, "s2c": 0}
        self.action: dict[str, str | None] = {"c2s": None, "s2c": None}
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._run, daemon=True)]
        self.threads[0].start()

    def arm(self, direction: str, action: str) -> None:
        self.action[direction] = action

    def _run(self) -> None:
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.target), timeout=T)
        self.socks += [a, b]
        for src, dst, d in ((a, b, "c2s"), (b, a, "s2c")):
            t = threading.Thread(target=self._relay, args=(src, dst, d), daemon=True)
            self.threads.append(t)
            t.start()

    def _relay(self, src: socket.socket, dst: socket.socket, d: str) -> None:
        buf, held, index = bytearray(), None, 0
        src.settimeout(2 * T)
        try:
            if d == "c2s" and self.edit_preface is not None:
                head = b""
                while len(head) < pf.SIZE:
                    head += src.recv(pf.SIZE - len(head))
                self.capture[d] += head
                self._forward(dst, d, self.edit_preface(head))
            while True:
                data = src.recv(1 << 16)
                if not data:
                    return
                self.capture[d] += data
                buf += data
                while len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big"):
                    n = 5 + int.from_bytes(buf[3:5], "big")
                    record = bytes(buf[:n])
                    del buf[:n]
                    action = self.action[d]
                    if action is None:
                        self._forward(dst, d, record)
                    elif action == "flip":
                        self.action[d] = None
                        flipped = bytearray(record)
                        flipped[5 + (n - 5) // 2] ^= 0x10
                        self._forward(dst, d, bytes(flipped))
                    elif action == "drop":
                        self.action[d] = None
                    elif action == "replay":
                        self.action[d] = None
                        self._forward(dst, d, record + record)
                    elif action == "reorder":
                        if held is None:
                            held = record
                        else:
                            self.action[d] = None
                            self._forward(dst, d, record + held)
                    elif action == "truncate":  # end the stream here, without close_notify
                        return
                    index += 1
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _forward(self, dst: socket.socket, d: str, data: bytes) -> None:
        dst.sendall(data)
        self.count[d] += len(data)

    def close(self) -> None:
        for s in self.socks + [self.listener]:
            s.close()
        for t in self.threads:
            t.join(T)


# -- opening links ---------------------------------------------------------------------------------------

def open_pair(server: RoleCredential, server_trust: Trust, client: RoleCredential, client_trust: Trust,
              accept=("client",), expect=("server",), preface: pf.Preface | None = None, proxy=False,
              edit_preface=None, timeout=5.0):
    """(client end, server end, proxy): each end a Link, or the exception its side raised."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(T)
    mitm = Proxy(lsock.getsockname()[1], edit_preface) if proxy or edit_preface else None
    result = {}

    def serve():
        try:
            conn, _ = lsock.accept()
            try:
                got = pf.read_preface(conn, timeout, "this server") if preface is not None else None
            except BaseException:
                conn.close()
                raise
            result["server"] = Link.accept(conn, server_context(server, server_trust), server_trust, accept,
                                           timeout, preface=got, peer="client")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["server"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        sock = socket.create_connection(("127.0.0.1", mitm.port if mitm else lsock.getsockname()[1]), timeout=T)
        result["client"] = Link.connect(sock, client_context(client, client_trust), client_trust, expect, timeout,
                                        preface=preface, peer="server")
    except Exception as exc:  # noqa: BLE001
        result["client"] = exc
    thread.join(T + timeout)
    assert not thread.is_alive()
    lsock.close()
    return result["client"], result["server"], mitm


def closed_after(*ends) -> None:
    """Close both ends at once, as parties do at the end of a session (a lone close waits up to its
    timeout for the peer's end of the stream)."""
    threads = [threading.Thread(target=end.close, daemon=True) for end in ends if isinstance(end, Link)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)


def assert_refused(client, server, *needles):
    """Both ends refused at the handshake: no Link on either side, one-line errors."""
    closed_after(client, server)
    assert isinstance(client, HandshakeError), repr(client)
    assert isinstance(server, HandshakeError), repr(server)
    for exc in (client, server):
        assert "\n" not in str(exc)
    text = f"{client} | {server}"
    for needle in needles:
        assert needle in text, text


def in_both_directions(a: Link, b: Link, payload: bytes) -> None:
    a.send(payload)
    assert b.recv(timeout=T) == payload
    b.send(payload[::-1])
    assert a.recv(timeout=T) == payload[::-1]


# -- credentials and mutual TLS --------------------------------------------------------------------------

def test_generated_credentials_mutual_tls_ed25519(creds):
    s1, c1 = creds["s1"], creds["c1"]
    client, server, _ = open_pair(s1, trust(("client", c1)), c1, trust(("server", s1)))
    try:
        assert client.peer.role == "server" and client.peer.id == "s1" and client.peer.fingerprint == s1.fingerprint
        assert server.peer.role == "client" and server.peer.id == "c1"
        assert client._tls.version() == "TLSv1.3" and client._tls.selected_alpn_protocol() == f"deepreduce-pi/{VERSION}"
        assert s1.key.__class__.__name__.startswith("Ed25519")
        in_both_directions(client, server, b"hello")
    finally:
        closed_after(client, server)


def test_derived_single_operator_credentials(creds):
    secret = new_secret()
    assert len(secret) == 32
    a, b = RoleCredential.derive(secret, "server"), RoleCredential.derive(secret, "server")
    assert a.certificate_pem() == b.certificate_pem() and a.key_pem() == b.key_pem()  # every holder builds the same
    assert len({RoleCredential.derive(secret, r).fingerprint for r in ("server", "client", "dealer")}) == 3
    everyone = Trust.single_operator(secret)
    client, server, _ = open_pair(RoleCredential.derive(secret, "server"), everyone.only("client", "server"),
                                  RoleCredential.derive(secret, "client"), everyone.only("server"))
    try:
        assert (client.peer.role, server.peer.role) == ("server", "client")
        in_both_directions(client, server, b"one secret, three roles")
    finally:
        closed_after(client, server)
    # a credential derived from another secret is refused
    other = RoleCredential.derive(new_secret(), "client")
    client, server, _ = open_pair(RoleCredential.derive(secret, "server"), everyone.only("client"), other,
                                  everyone.only("server"))
    assert_refused(client, server, "not trusted")


@pytest.mark.parametrize("who", ["wrong role", "unknown"])
def test_untrusted_client_is_refused_at_the_handshake(creds, who):
    s1 = creds["s1"]
    intruder = creds["d1"] if who == "wrong role" else RoleCredential.generate("client", "c1")  # same name, new key
    client, server, _ = open_pair(s1, trust(("client", creds["c1"])), intruder, trust(("server", s1)))
    assert_refused(client, server, "not trusted", "refused the TLS handshake")


def test_a_client_certificate_never_passes_for_a_server(creds):
    c1, c2 = creds["c1"], creds["c2"]
    # the "server" end holds a client's credential: the connecting client trusts servers only
    client, server, _ = open_pair(c2, trust(("client", c1)), c1, trust(("server", creds["s1"])))
    assert_refused(client, server)
    with pytest.raises(UserError, match="proves only the role it names"):
        Trust().add("server", c1)
    same_key_as_server = credentials._certificate(c1.key, "server", "c1", 7, c1.certificate.not_valid_before_utc,
                                                  c1.certificate.not_valid_after_utc)
    with pytest.raises(UserError, match="one key, one role"):
        Trust().add("client", c1).add("server", same_key_as_server)


def test_peer_role_tells_a_client_from_a_server_on_one_context(creds):
    s1, s2, c1 = creds["s1"], creds["s2"], creds["c1"]
    both = trust(("client", c1), ("server", s2))
    for cred, role in ((c1, "client"), (s2, "server")):
        client, server, _ = open_pair(s1, both, cred, trust(("server", s1)), accept=("client", "server"))
        try:
            assert server.peer.role == role and server.peer.id == cred.id
        finally:
            closed_after(client, server)
    # the preface claims a client, the certificate proves a server: refused inside TLS, both sides
    client, server, _ = open_pair(s1, both, s2, trust(("server", s1)), accept=("client", "server"),
                                  preface=pf.Preface(pf.PARTY, "client", os.urandom(16)))
    assert_refused(client, server, "authenticated as server 's2'", "refused this party")


def test_another_protocol_version_inside_tls_is_refused_by_alpn(creds, monkeypatch):
    """ALPN binds the version into the authenticated handshake, whatever the (plaintext) preface said."""
    s1, c1 = creds["s1"], creds["c1"]
    real = credentials._context

    def next_version(protocol_, own, peers):
        ctx = real(protocol_, own, peers)
        if protocol_ == ssl.PROTOCOL_TLS_CLIENT:
            ctx.set_alpn_protocols([f"deepreduce-pi/{VERSION + 1}"])
        return ctx

    monkeypatch.setattr(credentials, "_context", next_version)
    client, server, _ = open_pair(s1, trust(("client", c1)), c1, trust(("server", s1)))
    assert_refused(client, server, f"does not speak deepreduce-pi/{VERSION} (TLS ALPN None)")


def test_rotation_two_trusted_certificates_then_one_removed(creds):
    s1 = creds["s1"]
    old, new = RoleCredential.generate("client", "alice"), RoleCredential.generate("client", "alice")
    rotating = trust(("client", old), ("client", new))
    for cred in (old, new):
        client, server, _ = open_pair(s1, rotating, cred, trust(("server", s1)))
        try:
            assert server.peer.fingerprint == cred.fingerprint
        finally:
            closed_after(client, server)
    rotating.remove("client", old.fingerprint)
    client, server, _ = open_pair(s1, rotating, old, trust(("server", s1)))
    assert_refused(client, server, "not trusted")


def test_credential_files_secret_files_and_short_secrets(tmp_path, creds):
    cred = creds["d1"]
    key, cert = tmp_path / "d1.key", tmp_path / "d1.crt"
    cred.save(key, cert)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    loaded = RoleCredential.load(key, cert)
    assert (loaded.role, loaded.id, loaded.fingerprint) == ("dealer", "d1", cred.fingerprint)
    assert fingerprint(Trust().add_file("dealer", cert).only("dealer")._certs["dealer"][cred.fingerprint]) == \
        cred.fingerprint
    with pytest.raises(UserError, match="exists"):
        cred.save(key, cert)
    key.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600") as refused:
        RoleCredential.load(key, cert)
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="120 bits, fewer than the 128") as short:
        check_secret(b"x" * 15)
    assert "\n" not in str(short.value) and "new-secret" in str(short.value)
    secret = write_secret(tmp_path / "secret")
    assert len(secret) == 32 and read_secret(tmp_path / "secret") == secret
    (tmp_path / "phrase").write_text("correct horse battery staple\n")
    (tmp_path / "phrase").chmod(0o600)
    with pytest.raises(UserError, match="passphrase"):
        read_secret(tmp_path / "phrase")
    (tmp_path / "short").write_text("00" * 15)
    (tmp_path / "short").chmod(0o600)
    with pytest.raises(UserError, match="fewer than the 128"):
        read_secret(tmp_path / "short")
    # the operators' command line
    assert credentials.main(["new", "client", "c9", str(tmp_path / "c9.key"), str(tmp_path / "c9.crt")]) == 0
    assert RoleCredential.load(tmp_path / "c9.key", tmp_path / "c9.crt").id == "c9"
    assert credentials.main(["new-secret", str(tmp_path / "s9")]) == 0 and len(read_secret(tmp_path / "s9")) == 32
    assert credentials.main(["new-secret", str(tmp_path / "s9")]) == 2  # never overwritten


# -- the preface -------------------------------------------------------------------------------------------

def test_preface_round_trip_and_strict_parse():
    p = pf.Preface(pf.PARTY, "dealer", bytes(range(16)))
    raw = p.pack()
    assert len(raw) == pf.SIZE == 32 and pf.Preface.parse(raw) == p
    assert pf.Preface.parse(pf.Preface(pf.CONTROL, "client").pack()).session_id == pf.NO_SESSION
    bad = [raw[:31], raw + b"\0", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\0\0\0\0", raw[:10] + b"\x09" + raw[11:],
           raw[:11] + b"\x07" + raw[12:], raw[:12] + b"\0\0\0\1" + raw[16:], bytes(32)]
    for data in bad:
        with pytest.raises(PrefaceError) as refused:
            pf.Preface.parse(data)
        assert "\n" not in str(refused.value)


def listener_once(handler):
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(T)
    out = {}

    def run():
        conn, _ = lsock.accept()
        with conn:
            try:
                out["result"] = handler(conn)
            except Exception as exc:  # noqa: BLE001
                out["result"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return lsock, thread, out


def test_other_version_is_refused_with_both_versions_on_both_sides(creds):
    # a version-4 connector meets this (version-3) listener
    lsock, thread, out = listener_once(lambda conn: pf.read_preface(conn, T, "this server"))
    with socket.create_connection(lsock.getsockname(), timeout=T) as sock:
        sock.sendall(pf.Preface(pf.CONTROL, "client", version=VERSION + 1).pack())
        answer = sock.recv(64)
    thread.join(T)
    lsock.close()
    assert isinstance(out["result"], VersionMismatch)
    with pytest.raises(VersionMismatch) as connector:
        pf.check_answer(answer, "the server", "this client", ours=VERSION + 1)
    for line in (str(out["result"]), str(connector.value)):
        assert f"version {VERSION + 1}" in line and f"speaks {VERSION}" in line or \
            f"version {VERSION}" in line and f"speaks {VERSION + 1}" in line, line
        assert "\n" not in line
    # this connector meets a version-4 listener (through Link.connect, as the roles will)
    refusal = pf._REFUSAL.pack(pf.REFUSAL_MAGIC, VERSION + 1, VERSION, 0)
    lsock, thread, out = listener_once(lambda conn: (conn.recv(pf.SIZE), conn.sendall(refusal)))
    with pytest.raises(VersionMismatch, match=f"the server speaks protocol version {VERSION + 1}, this party "
                                              f"speaks {VERSION}"):
        Link.connect(socket.create_connection(lsock.getsockname(), timeout=T),
                     client_context(creds["c1"], trust(("server", creds["s1"]))), trust(("server", creds["s1"])),
                     ("server",), T, preface=pf.Preface(pf.CONTROL, "client"), peer="server")
    thread.join(T)
    lsock.close()


def test_version_2_peers_get_one_line_naming_both_versions(creds):
    # a version-2 (token) client meets this listener: it gets a version-2 error frame it can print
    lsock, thread, out = listener_once(lambda conn: pf.read_preface(conn, T, "this pi-server"))
    with socket.create_connection(lsock.getsockname(), timeout=T) as sock:
        protocol.send(sock, "hello", role="client", id="client", nonce="0" * 64, auth="hmac-sha256")
        with pytest.raises(protocol.RemoteError, match=f"speaks protocol version {VERSION}, this program speaks 2"):
            protocol.expect(protocol.recv(sock, T), "challenge")
    thread.join(T)
    lsock.close()
    assert isinstance(out["result"], VersionMismatch) and "version 2" in str(out["result"])
    # this client meets a version-2 listener, which answers our preface with a version-2 error frame
    lsock, thread, out = listener_once(
        lambda conn: (conn.recv(pf.SIZE), protocol.send(conn, "error", message="peer announced a huge message")))
    with pytest.raises(VersionMismatch, match=f"speaks protocol version 2, this party speaks {VERSION}"):
        Link.connect(socket.create_connection(lsock.getsockname(), timeout=T),
                     client_context(creds["c1"], trust(("server", creds["s1"]))), trust(("server", creds["s1"])),
                     ("server",), T, preface=pf.Preface(pf.CONTROL, "client"), peer="server")
    thread.join(T)
    lsock.close()


def test_an_altered_preface_ends_the_handshake_on_both_sides(creds):
    s1, c1 = creds["s1"], creds["c1"]
    edit = lambda head: head[:16] + bytes(16)  # noqa: E731 - routes the connection to another session
    client, server, mitm = open_pair(s1, trust(("client", c1)), c1, trust(("server", s1)),
                                     preface=pf.Preface(pf.PARTY, "client", os.urandom(16)), edit_preface=edit)
    mitm.close()
    assert_refused(client, server, "another preface")


# -- handing a connection to a worker process --------------------------------------------------------------

def _worker(unix_sock, key, cert, client_cert) -> None:
    conn, got = pf.receive_connection(unix_sock, timeout=2 * T)
    own, peers = RoleCredential.load(key, cert), Trust().add_file("client", client_cert)
    with Link.accept(conn, server_context(own, peers), peers, ("client",), T, preface=got, peer="client") as link:
        link.send(b"worker " + bytes(link.recv(timeout=T)) + b" " + got.session_id.hex().encode())


def test_send_connection_hands_a_live_connection_to_a_worker_process(tmp_path, creds):
    s1, c1 = creds["s1"], creds["c1"]
    s1.save(tmp_path / "s.key", tmp_path / "s.crt")
    c1.save(tmp_path / "c.key", tmp_path / "c.crt")
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = multiprocessing.get_context("spawn").Process(
        target=_worker, args=(child_end, tmp_path / "s.key", tmp_path / "s.crt", tmp_path / "c.crt"))
    proc.start()
    child_end.close()
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(T)
    session = os.urandom(16)
    out = {}

    def client():
        try:
            sock = socket.create_connection(lsock.getsockname(), timeout=T)
            peers = trust(("server", s1))
            with Link.connect(sock, client_context(c1, peers), peers, ("server",), 3 * T,
                              preface=pf.Preface(pf.PARTY, "client", session), peer="server") as link:
                link.send(b"hello")
                out["reply"] = bytes(link.recv(timeout=3 * T))
        except Exception as exc:  # noqa: BLE001
            out["reply"] = exc

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        conn, _ = lsock.accept()
        pf.send_connection(parent_end, conn, pf.read_preface(conn, T))
        assert conn.fileno() == -1  # this process's copy is closed: the worker owns the connection
        thread.join(4 * T)
        proc.join(4 * T)
    finally:
        if proc.is_alive():
            proc.kill()
        parent_end.close()
        lsock.close()
    assert out["reply"] == b"worker hello " + session.hex().encode()
    assert proc.exitcode == 0


# -- links: tampering, truncation, confidentiality, counters ---------------------------------------------------

@pytest.fixture
def proxied(creds):
    s1, c1 = creds["s1"], creds["c1"]
    client, server, mitm = open_pair(s1, trust(("client", c1)), c1, trust(("server", s1)), proxy=True)
    assert isinstance(client, Link) and isinstance(server, Link), (client, server)
    yield client, server, mitm
    closed_after(client, server)
    mitm.close()


@pytest.mark.parametrize("action", ["flip", "drop", "replay", "reorder", "truncate"])
def test_tampered_stream_ends_the_link_on_both_sides(proxied, action):
    client, server, mitm = proxied
    in_both_directions(client, server, b"before")  # the handshake is over: every record now is application data
    mitm.arm("c2s", action)
    sent = [b"first " + PATTERN, b"second " + PATTERN, b"third " + PATTERN]
    for message in sent:
        client.send(message)
    got = []
    with pytest.raises(LinkError) as failure:
        for _ in range(len(sent) + 1):  # bounded: the last one must fail at the latest
            got.append(bytes(server.recv(timeout=T)))
    assert got == sent[:len(got)]  # only genuine messages, in order, before the failure
    expected = LinkTruncated if action == "truncate" else LinkTLSError
    assert isinstance(failure.value, expected) and not isinstance(failure.value, LinkTimeout), repr(failure.value)
    assert "\n" not in str(failure.value)
    with pytest.raises(LinkError) as other_end:  # the sender sees the link end, not a timeout
        client.recv(timeout=T)
    assert not isinstance(other_end.value, LinkTimeout), repr(other_end.value)
    with pytest.raises(LinkError):
        server.recv(timeout=T)  # an ended link stays ended


def test_capture_holds_no_plaintext_and_counters_match_the_wire(proxied):
    client, server, mitm = proxied
    large = PATTERN * (1 << 15)  # 1 MiB
    for message in (PATTERN, large):
        in_both_directions(client, server, message)
    closed_after(client, server)
    for t in mitm.threads:
        t.join(T)
    capture = bytes(mitm.capture["c2s"] + mitm.capture["s2c"])
    assert len(capture) > 2 * len(large)  # it went both ways
    assert PATTERN not in capture and PATTERN[:12] not in capture and PATTERN[::-1][:12] not in capture
    assert client.wire_sent == mitm.count["c2s"] == server.wire_received
    assert server.wire_sent == mitm.count["s2c"] == client.wire_received
    assert client.payload_sent == server.payload_received == len(PATTERN) + len(large)


def test_both_ends_send_8_mb_at_once_without_deadlock(creds):
    s1, c1 = creds["s1"], creds["c1"]
    client, server, _ = open_pair(s1, trust(("client", c1)), c1, trust(("server", s1)))
    blobs = {client: os.urandom(8 << 20), server: os.urandom(8 << 20)}
    got = {}

    def exchange(me: Link, other: Link):
        me.send(blobs[me])  # both send first, then receive: the engine's exchange
        got[me] = me.recv(timeout=3 * T)

    try:
        threads = [threading.Thread(target=exchange, args=pair, daemon=True)
                   for pair in ((client, server), (server, client))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(4 * T)
        assert not any(t.is_alive() for t in threads)
        assert got[client] == blobs[server] and got[server] == blobs[client]
    finally:
        closed_after(client, server)


def test_frame_limit_timeout_and_peer_close_are_distinct_errors(creds):
    s1, c1 = creds["s1"], creds["c1"]
    client, server, _ = open_pair(s1, trust(("client", c1)), c1, trust(("server", s1)))
    try:
        with pytest.raises(LinkTimeout):
            server.recv(timeout=0.2)
        with pytest.raises(LinkTimeout):  # a timeout ends the link too
            server.recv(timeout=T)
    finally:
        closed_after(client, server)
    client, server, _ = open_pair(s1, trust(("client", c1)), c1, trust(("server", s1)))
    try:
        client.send(bytes(2000))
        with pytest.raises(FrameTooLarge, match="2000-byte message, above the 1000-byte limit"):
            server.recv(max_bytes=1000, timeout=T)
        with pytest.raises(LinkError):
            client.recv(timeout=T)
    finally:
        closed_after(client, server)
    client, server, _ = open_pair(s1, trust(("client", c1)), c1, trust(("server", s1)))
    try:
        client.send(b"last words")
        closing = threading.Thread(target=client.close, daemon=True)  # waits for the server's end
        closing.start()
        assert server.recv(timeout=T) == b"last words"
        with pytest.raises(LinkClosed, match="the peer closed the link"):
            server.recv(timeout=T)
        closing.join(T)
        with pytest.raises(LinkClosed, match="this party closed"):
            client.send(b"after close")
    finally:
        closed_after(client, server)


def test_tls_throughput_on_loopback(creds, capsys):
    """Measured, not asserted: what TLS costs the engine (the ResNet18 online phase moves ~31.7 MB per image)."""
    s1, c1 = creds["s1"], creds["c1"]
    client, server, _ = open_pair(s1, trust(("client", c1)), c1, trust(("server", s1)))
    lines = []
    try:
        for size, count in ((1 << 20, 32), (32 << 20, 3)):
            message = os.urandom(size)
            start = time.perf_counter()
            for _ in range(count):
                client.send(message)
            for _ in range(count):
                assert len(server.recv(timeout=6 * T)) == size
            elapsed = time.perf_counter() - start
            overhead = client.wire_sent / max(1, client.payload_sent) - 1
            lines.append(f"TLS Link {size >> 20:>2} MB messages: {count * size / elapsed / 1e6:7.0f} MB/s "
                         f"(wire overhead so far {100 * overhead:.2f} %)")
    finally:
        closed_after(client, server)
    lines.append(f"plain TCP, same loopback, 32 MB messages: {plain_tcp_throughput(32 << 20, 3):7.0f} MB/s")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def plain_tcp_throughput(size: int, count: int) -> float:
    """The baseline: the same bytes over a bare TCP connection on loopback (MB/s)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(lsock.getsockname(), timeout=T)
    receiver, _ = lsock.accept()
    receiver.settimeout(T)
    message, buffer = os.urandom(size), bytearray(size)
    start = time.perf_counter()
    thread = threading.Thread(target=lambda: [sender.sendall(message) for _ in range(count)], daemon=True)
    thread.start()
    for _ in range(count):
        view, got = memoryview(buffer), 0
        while got < size:
            got += receiver.recv_into(view[got:])
    elapsed = time.perf_counter() - start
    thread.join(T)
    for s in (sender, receiver, lsock):
        s.close()
    return count * size / elapsed / 1e6


def test_ssl_is_tls13_capable():
    assert ssl.HAS_TLSv1_3
