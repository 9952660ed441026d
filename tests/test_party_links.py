"""The roles' party links under attack: a man in the middle on each of the three channels, a dealer
the client does not trust, and a recording of a whole session.

One pi-dealer and one pi-server (single-operator trust) run for the module. Each channel passes a
proxy of this test that forwards TCP both ways and, when armed, tampers with the party connections
(those that start with the transport's preface; control connections pass untouched):

    client -> server   pi-client --server SERVER_PROXY   (its party link goes to the same address)
    client -> dealer   pi-client --dealer CLIENT_DEALER_PROXY
    server -> dealer   pi-server --dealer SERVER_DEALER_PROXY

Every tampered session must end with one `error:` line at the client and no prediction printed; the
server keeps serving.
"""

from __future__ import annotations

import json
import re
import socket
import threading

import pytest

from secure.transport.preface import MAGIC
from support.roles import (CLIENT_FAST, IMAGES, SERVER_FAST, Proc, assert_matches_plaintext, assert_one_line_error,
                           client, plaintext)

BLOCK = 64  # bytes dropped, replayed or swapped


class TamperingProxy:
    """Forwards connections to `target`; when armed, alters one direction of each party connection at a
    byte offset: flip one bit, drop BLOCK bytes, replay the BLOCK bytes before, or swap two blocks."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.mode: str | None = None
        self.direction = "up"  # "up": connector -> listener; "down": the answers
        self.offset = 0
        self.captured: list[tuple[int, str, str, bytes]] = []  # (connection, control/party, direction, bytes)
        self.connections = 0
        self.record = False
        self.tampered = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str | None, direction: str = "up", offset: int = 0) -> None:
        self.mode, self.direction, self.offset = mode, direction, offset
        if mode is not None:
            self.tampered = 0

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            conn.close()
            return
        conn.settimeout(5)
        upstream.settimeout(None)
        head = b""
        try:
            for _ in range(50):  # the preface's first 11 bytes say control (1) or party (2)
                head = conn.recv(11, socket.MSG_PEEK)
                if len(head) >= 11 or not head:
                    break
        except OSError:
            pass
        conn.settimeout(None)
        kind = {1: "control", 2: "party"}.get(head[10], "other") if head[:8] == MAGIC and len(head) >= 11 else "other"
        with self._lock:
            self.connections += 1
            number = self.connections
        for src, dst, direction in ((conn, upstream, "up"), (upstream, conn, "down")):
            threading.Thread(target=self._pump, args=(src, dst, direction, kind, number), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, kind: str, number: int) -> None:
        mode = self.mode if kind == "party" and direction == self.direction else None
        passed, held = 0, bytearray()  # bytes forwarded unchanged; bytes held from the offset on
        try:
            while True:
                chunk = src.recv(1 << 16)
                if self.record:
                    with self._lock:
                        self.captured.append((number, kind, direction, bytes(chunk)))
                if mode is not None:  # forward up to the offset at once, hold the two blocks after it
                    free = max(0, self.offset - passed)
                    dst.sendall(chunk[:free])
                    passed += len(chunk[:free])
                    held += chunk[free:]
                    if len(held) < 2 * BLOCK and chunk:
                        continue
                    chunk, mode = self._alter(bytes(held), mode), None
                if not chunk:
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _alter(self, data: bytes, mode: str) -> bytes:
        """`data` starts at the offset; shorter than two blocks means the stream ended before it."""
        if len(data) < 2 * BLOCK:
            return data
        self.tampered += 1
        a, b = data[:BLOCK], data[BLOCK:2 * BLOCK]
        if mode == "flip":
            return bytes([data[0] ^ 1]) + data[1:]
        if mode == "drop":
            return data[BLOCK:]
        if mode == "replay":  # the first block twice
            return a + data
        if mode == "reorder":
            return b + a + data[2 * BLOCK:]
        raise ValueError(mode)


def _addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="module")
def links(plan_file):
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--read-timeout", "10",
                  "--session-timeout", "120")
    dealer_address = dealer.address()
    proxies = {"server-dealer": TamperingProxy(_addr(dealer_address)),
               "client-dealer": TamperingProxy(_addr(dealer_address))}
    server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", *SERVER_FAST[:-4],
                  "--rendezvous-timeout", "10", "--dealer", proxies["server-dealer"].address, "--dealer-timeout", "5")
    try:
        proxies["client-server"] = TamperingProxy(_addr(server.address()))
        server.wait_line("serving plan", 120)
        yield {"server": server, "dealer": dealer, "proxies": proxies, "dealer_address": dealer_address}
    finally:
        assert server.terminate() == 0
        assert dealer.terminate() == 0


def infer(links, *args):
    p = links["proxies"]
    return client("infer", "--server", p["client-server"].address, "--dealer", p["client-dealer"].address,
                  *CLIENT_FAST[:2], "--timeout", "60", *args)


# Where each channel carries enough bytes to alter after the TLS handshake (offsets in that direction's
# stream): the client's shares to the server, the dealer's correlations to the server; the client-dealer
# channel carries little more than the handshake and the client's seed, so it is altered in the handshake.
CHANNELS = {"client-server": ("up", 20_000), "server-dealer": ("down", 20_000), "client-dealer": ("down", 0)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["flip", "drop", "replay", "reorder"])
def test_a_man_in_the_middle_on_each_channel_ends_the_session(links, plan, mode):
    for channel, (direction, offset) in CHANNELS.items():
        proxy = links["proxies"][channel]
        proxy.arm(mode, direction, offset)
        try:
            done = infer(links, "--json", str(IMAGES[4]))
        finally:
            proxy.arm(None)
        assert proxy.tampered >= 1, (channel, mode, done.stderr)
        assert done.stdout == "", (channel, mode, done.stdout)  # no prediction, right or wrong
        assert_one_line_error(done, r"secure computation failed|links of session|link|handshake")
    # the server and the dealer keep serving
    ok = infer(links, "--json", str(IMAGES[4]))
    assert ok.returncode == 0, ok.stderr
    assert_matches_plaintext(json.loads(ok.stdout)["images"], plaintext(plan, [IMAGES[4]]))


class FakeDealer:
    """Speaks the transport like a dealer (preface, TLS 1.3, READY) but holds another secret's dealer
    key: what a server operator could put at the dealer address it hands the client."""

    def __init__(self):
        from secure.transport.credentials import RoleCredential, Trust, new_secret, server_context
        from support.roles import TOKEN
        own = RoleCredential.derive(new_secret(), "dealer")
        trust = Trust.single_operator(bytes.fromhex(TOKEN)).only("client", "server")  # it knows the real peers
        self.context, self.trust = server_context(own, trust), trust
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.errors: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        from secure.transport import TransportError
        from secure.transport.link import Link
        from secure.transport.preface import read_preface
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                got = read_preface(conn, 5)
                Link.accept(conn, self.context, self.trust, ("client", "server"), 5, preface=got).close()
            except (TransportError, OSError) as exc:
                self.errors.append(str(exc))


@pytest.mark.slow
def test_a_dealer_without_the_dealers_credential_is_refused_by_the_client(links):
    """The client's party refuses the fake dealer at the TLS handshake, before it sends anything derived
    from the image; the fake dealer sees the client refuse its certificate."""
    fake = FakeDealer()
    done = client("infer", "--server", links["proxies"]["client-server"].address, "--dealer", fake.address,
                  *CLIENT_FAST[:2], "--timeout", "60", str(IMAGES[4]))
    assert done.stdout == ""
    assert_one_line_error(done, r"the dealer at 127\.0\.0\.1:\d+'s certificate is not trusted")
    assert fake.errors and all("refused" in e or "certificate" in e or "closed" in e for e in fake.errors), fake.errors
    fake.listener.close()


def _tls_records(stream: bytes) -> list[int]:
    """The content types of a byte stream that must consist of TLS records only (raises otherwise)."""
    types, at = [], 0
    while at < len(stream):
        kind, version, length = stream[at], stream[at + 1:at + 3], int.from_bytes(stream[at + 3:at + 5], "big")
        assert kind in (20, 21, 22, 23) and version in (b"\x03\x01", b"\x03\x03") and at + 5 + length <= len(stream), \
            (at, stream[at:at + 8])
        types.append(kind)
        at += 5 + length
    return types


@pytest.mark.slow
def test_a_recording_of_a_whole_session_holds_only_tls_records(links, plan):
    """After each party connection's 32-byte preface, every byte in both directions is a TLS 1.3 record;
    after the handshake all are encrypted application records (type 23), so no seed, share, description
    or logit crosses any of the three channels in the clear."""
    proxies = links["proxies"].values()
    for proxy in proxies:
        proxy.captured.clear()
        proxy.record = True
    try:
        done = infer(links, "--json", str(IMAGES[7]))
    finally:
        for proxy in proxies:
            proxy.record = False
    assert done.returncode == 0, done.stderr
    assert_matches_plaintext(json.loads(done.stdout)["images"], plaintext(plan, [IMAGES[7]]))
    plan_text = json.dumps(plan.public_info().to_dict()["ops"][0])[:40].encode()
    kinds = {}
    for name, proxy in links["proxies"].items():
        streams: dict[tuple[int, str], bytes] = {}
        for number, kind, direction, data in proxy.captured:
            kinds[(name, number)] = kind
            streams[(number, direction)] = streams.get((number, direction), b"") + data
        for (number, direction), stream in streams.items():
            if direction == "up":
                assert stream[:8] == MAGIC, (name, number)  # every connection: the preface, then TLS
                stream = stream[32:]
            types = _tls_records(stream)
            # TLS 1.3: ClientHello/ServerHello in the clear (22), the change-cipher-spec compatibility
            # record (20) at most, then nothing but encrypted records (23)
            assert types[0] == 22 and set(types[1:]) <= {20, 23} and types.count(23) >= 2, (name, number, types)
            assert plan_text not in stream and b'"ops"' not in stream and b'"type"' not in stream, (name, number)
    per_channel = {name: sorted(k for (n, _), k in kinds.items() if n == name) for name in links["proxies"]}
    # the client's info and session requests and the server's join are control connections; each
    # channel carries exactly one party connection for the session
    assert per_channel == {"client-server": ["control", "control", "party"], "client-dealer": ["party"],
                           "server-dealer": ["control", "party"]}, per_channel
    total = sum(len(d) for p in proxies for *_, d in p.captured)
    print(f"\ncapture: {total:,} bytes on three channels ({sum(map(len, per_channel.values()))} connections), "
          "all TLS records after the prefaces")


def test_role_credential_flags_name_their_mistakes(tmp_path):
    """--key without --cert, a trust list without a credential, a certificate of another role."""
    from secure.transport.credentials import RoleCredential
    RoleCredential.generate("client", "c1").save(tmp_path / "c.key", tmp_path / "c.crt")
    base = ["info", "--server", "127.0.0.1:9", "--connect-timeout", "1"]
    assert_one_line_error(client(*base, "--key", str(tmp_path / "c.key")), r"--key and --cert go together")
    assert_one_line_error(client(*base, "--trust-dealer", str(tmp_path / "c.crt")), r"--trust-\* .*--key and --cert")
    RoleCredential.generate("server", "s1").save(tmp_path / "s.key", tmp_path / "s.crt")
    done = client(*base, "--key", str(tmp_path / "s.key"), "--cert", str(tmp_path / "s.crt"))
    assert_one_line_error(done, r"is a server certificate, not a client one")
    assert re.search("credentials new client", done.stderr)


@pytest.mark.slow
def test_the_dealer_says_no_to_an_oversized_description_with_its_reason(plan_file):
    """A dealer started with a small --max-description-kb: the session is refused before any seed is
    handed out, and the client hears the dealer's reason in one line."""
    dealer = Proc("secure.control.dealer", "--host", "127.0.0.1", "--port", "0", "--max-description-kb", "1")
    server = None
    try:
        server = Proc("server", "--plan", str(plan_file), "--host", "127.0.0.1", "--port", "0", *SERVER_FAST[:-4],
                      "--rendezvous-timeout", "10", "--dealer", dealer.address(), "--dealer-timeout", "5")
        address = server.address()
        server.wait_line("serving plan", 120)
        done = client("infer", "--server", address, *CLIENT_FAST[:2], "--timeout", "60", str(IMAGES[4]))
        assert done.stdout == ""
        assert_one_line_error(done, r"description has [\d,]+ bytes, the dealer accepts at most 1,000 "
                                    r"\(pi-dealer --max-description-kb\)")
    finally:
        if server is not None:
            assert server.terminate() == 0
        assert dealer.terminate() == 0
