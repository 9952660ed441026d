"""The plaintext preface, the version refusal, and handing an accepted connection to another process.

A listening role (pi-server, pi-dealer) accepts every connection in its main process but ends TLS in
the worker process of the session the connection belongs to, so a session's keys live in that worker
only. To route a connection before TLS, the connector first sends a fixed-size preface (32 bytes,
integers big-endian):

    offset  size  field
         0     8  magic b"\\x89DRPI\\r\\n\\x1a"  (high bit, CR LF, ^Z: catches 7-bit and line-ending mangling;
                  as a 4-byte length it is above 1 MiB, so a version-2 listener refuses it at once)
         8     2  protocol version (u16): magic and version keep this place in every future version
        10     1  purpose: 1 control (requests to the role), 2 party (a session's party traffic)
        11     1  claimed role of the connector (0 server, 1 client, 2 dealer: secure.core.party.Role)
        12     4  reserved, zero
        16    16  session id (routing only; all zero for a control connection that opens a session)

then starts the TLS handshake at once (no round trip waits for the preface). Nothing in the preface is
trusted: the worker authenticates the peer with TLS, requires the certificate to prove the claimed
role, and both ends compare the preface inside TLS (link.Link binds it), so a preface altered on the
path (other session, role or purpose) ends the handshake.

Version mismatch: a listener that reads another version's preface answers, before any TLS, the
16-byte refusal b"\\x89DRPI\\r\\n\\x15" + its version (u16) + the version it read (u16) + 4 zero bytes,
and closes; the connector finds it where it expected the TLS ServerHello (a TLS record starts with
0x14..0x17, never 0x89) and reports both versions, as the listener does. This answer is
unauthenticated, and that is safe: it can only make the connector give up, never make it accept or
send anything else, and anyone on the path can end a connection anyway by dropping its packets. A
forged "same version" cannot exist (silence means: go on to TLS), and ALPN inside the TLS handshake
binds the version again, so an altered version field cannot make two versions talk.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time
from dataclasses import dataclass

from secure.core.party import Role
from secure.transport import VERSION, PrefaceError, VersionMismatch

MAGIC = b"\x89DRPI\r\n\x1a"
REFUSAL_MAGIC = b"\x89DRPI\r\n\x15"
CONTROL, PARTY = 1, 2
PURPOSES = {CONTROL: "control", PARTY: "party"}
_HEAD = struct.Struct(">8sHBBI16s")  # magic, version, purpose, role, reserved, session id
_REFUSAL = struct.Struct(">8sHHI")
SIZE, REFUSAL_SIZE = _HEAD.size, _REFUSAL.size
NO_SESSION = bytes(16)


@dataclass(frozen=True)
class Preface:
    purpose: int
    role: str  # the connector's claimed role, proven later by its certificate
    session_id: bytes = NO_SESSION
    version: int = VERSION

    def pack(self) -> bytes:
        if self.purpose not in PURPOSES or len(self.session_id) != 16:
            raise ValueError(f"bad preface {self!r}")
        return _HEAD.pack(MAGIC, self.version, self.purpose, Role[self.role.upper()], 0, self.session_id)

    @classmethod
    def parse(cls, data: bytes, us: str = "this party") -> "Preface":
        """Strict: exactly SIZE bytes, our magic and version, a known purpose and role, zero reserved."""
        if len(data) != SIZE or data[:8] != MAGIC:
            raise PrefaceError(f"the peer does not speak the deepreduce-pi transport ({describe(data)})")
        _, version, purpose, role, reserved, session_id = _HEAD.unpack(data)
        if version != VERSION:
            raise VersionMismatch(f"a peer speaks protocol version {version}, {us} speaks {VERSION}: "
                                  "run matching versions", VERSION, version)
        if purpose not in PURPOSES or role not in set(Role) or reserved:
            raise PrefaceError(f"malformed preface (purpose {purpose}, role {role}, reserved {reserved:#x})")
        return cls(purpose, Role(role).label, session_id, version)


def read_preface(sock: socket.socket, timeout: float, us: str = "this party") -> Preface:
    """The listener's side: read exactly SIZE bytes (never a byte of the TLS handshake behind them) and
    parse. Another version is answered with the refusal before VersionMismatch is raised; an old
    (version 2) control client gets a version-2 error frame it can show. The caller closes `sock`."""
    deadline = time.monotonic() + timeout
    data = _recv_exact(sock, SIZE, deadline, short_ok=True)  # a version-2 request may be shorter
    try:
        return Preface.parse(data, us)
    except VersionMismatch as exc:
        _answer(sock, _REFUSAL.pack(REFUSAL_MAGIC, VERSION, exc.theirs, 0))
        raise
    except PrefaceError:
        length = int.from_bytes(data[:4], "big")
        if data[4:6] != b'{"' or length > 1 << 16:  # not a JSON control frame (versions 1 and 2)
            raise
        version = _v2_frame(data + _recv_exact(sock, max(0, 4 + length - SIZE), deadline))
        if version is None:
            raise
        _answer(sock, _v2_error(f"{us} speaks protocol version {VERSION}, this program speaks {version}: "
                                "run matching versions", version))
        raise VersionMismatch(f"a peer speaks protocol version {version}, {us} speaks {VERSION}: run matching "
                              "versions", VERSION, version) from None


def check_answer(data: bytes, peer: str = "the peer", us: str = "this party", ours: int = VERSION) -> bool:
    """The connector's side, on the first bytes received after the preface: True when they can start a
    TLS record, False when more bytes are needed to decide; raises VersionMismatch for a refusal and
    PrefaceError for anything else."""
    if data[:1] and 0x14 <= data[0] <= 0x17:
        return True
    if REFUSAL_MAGIC.startswith(data[:8]) and len(data) < REFUSAL_SIZE:
        return False
    if data[:8] == REFUSAL_MAGIC:
        theirs = _REFUSAL.unpack(data[:REFUSAL_SIZE])[1]
        raise VersionMismatch(f"{peer} speaks protocol version {theirs}, {us} speaks {ours}: run matching "
                              "versions", ours, theirs)
    if data[:1] == b"\x00" and (len(data) < 6 or (data[4:6] == b'{"' and len(data) < 4 + int.from_bytes(data[:4], "big")
                                                  <= 4 + (1 << 16))):
        return False  # the start of a control frame (a `busy` answer): wait for the rest
    busy = _busy_frame(data)
    if busy is not None:  # the listener is at its connection limit (secure.control.service)
        raise busy
    version = _v2_frame(data)
    if version is not None:
        raise VersionMismatch(f"{peer} speaks protocol version {version}, {us} speaks {ours}: run matching "
                              "versions", ours, version)
    raise PrefaceError(f"{peer} does not speak the deepreduce-pi transport ({describe(data)})")


def describe(data: bytes) -> str:
    return f"it sent {len(data)} bytes starting {data[:12]!r}" if data else "it sent nothing"


def _v2_frame(data: bytes) -> int | None:
    """The version of a version-2 control frame (4-byte length, JSON with "v") at the start of `data`."""
    if len(data) < 6 or data[4:6] != b'{"':
        return None
    body = data[4:4 + int.from_bytes(data[:4], "big")]
    try:
        version = json.loads(body.decode("utf-8")).get("v")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _busy_frame(data: bytes):
    """A listener at its connection limit answers a plain `busy` control frame before any TLS, so that a
    connector can wait and retry instead of failing (unauthenticated like the version refusal, and as
    harmless: it can only make the connector give up for now)."""
    if len(data) < 6 or data[4:6] != b'{"' or len(data) < 4 + int.from_bytes(data[:4], "big"):
        return None
    try:
        msg = json.loads(data[4:4 + int.from_bytes(data[:4], "big")].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(msg, dict) or msg.get("type") != "busy":
        return None
    from secure.control.protocol import BusyError, one_line
    after = msg.get("retry_after_s")
    after = float(after) if isinstance(after, (int, float)) and not isinstance(after, bool) and 0 <= after < 1e6 else 5.0
    return BusyError(one_line(str(msg.get("message", "the peer is busy")), 300), after)


def _v2_error(message: str, version: int) -> bytes:
    body = json.dumps({"message": message, "type": "error", "v": version}, sort_keys=True,
                      separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


def _answer(sock: socket.socket, data: bytes, linger: float = 1.0) -> None:
    """Send the answer, then read (and drop) what the connector sent after its preface until it closes,
    for at most `linger` s: closing with unread bytes would reset the connection, and a reset can
    destroy the answer before the connector reads it. Best effort: otherwise the connection just ends."""
    deadline = time.monotonic() + linger
    try:
        sock.settimeout(linger)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        for _ in range(64):  # at most 4 MiB
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            if not sock.recv(1 << 16):
                break
    except OSError:
        pass


def _recv_exact(sock: socket.socket, n: int, deadline: float, short_ok: bool = False) -> bytes:
    """Exactly n bytes; with `short_ok`, fewer when the peer ends its stream after a whole JSON frame."""
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PrefaceError(f"timed out waiting for the preface ({describe(data)})")
        try:
            sock.settimeout(remaining)
            chunk = sock.recv(n - len(data))
        except socket.timeout:
            continue
        except OSError as exc:
            raise PrefaceError(f"connection lost before the preface ({exc.strerror or exc})") from None
        if not chunk:
            if short_ok and _v2_frame(data) is not None:
                return data
            raise PrefaceError(f"the peer closed the connection before its preface ended ({describe(data)})")
        data += chunk
    return data


# -- handing a connection to another process ------------------------------------------------------------

def send_connection(unix_sock: socket.socket, conn: socket.socket, preface: Preface) -> None:
    """Pass `conn` (an accepted TCP socket, its preface read) and the preface over an AF_UNIX socket
    (SOCK_SEQPACKET keeps one hand-over per message), then close this process's copy: from now on the
    receiving process owns the connection."""
    try:
        socket.send_fds(unix_sock, [preface.pack()], [conn.fileno()])
    finally:
        conn.close()


def receive_connection(unix_sock: socket.socket, timeout: float | None = None) -> tuple[socket.socket, Preface]:
    """The other end of send_connection: the TCP socket (blocking) and its preface."""
    if timeout is not None and not select.select([unix_sock], [], [], timeout)[0]:
        raise PrefaceError(f"no connection was handed over within {timeout:g} s")
    data, fds, flags, _ = socket.recv_fds(unix_sock, SIZE + 1, 2)
    socks = [socket.socket(fileno=fd) for fd in fds]  # own every descriptor received, even unwanted ones
    if not data and not socks:
        raise PrefaceError("the hand-over socket was closed by the other process")
    if len(socks) != 1 or len(data) != SIZE or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for s in socks:
            s.close()
        raise PrefaceError(f"a bad hand-over: {len(data)} bytes and {len(fds)} descriptors (flags {flags:#x})")
    socks[0].setblocking(True)
    return socks[0], Preface.parse(data)
