"""Control messages between pi-client, pi-server and pi-dealer: JSON objects inside the transport's links.

Every connection to a listening role is a preface and then TLS 1.3 with role certificates
(`secure.transport`, `secure.control.auth`); control messages travel inside it, one JSON object per
link frame: ``{"v": PROTOCOL_VERSION, "type": "...", ...}``, at most 1 MiB, a whole message within one
read timeout. TLS authenticates, orders and encrypts them, so they carry no MAC of their own.

    client -> server   {"type": "ping"}                          -> {"type": "pong", "role": "server"}
                       {"type": "info"}                          -> {"type": "info", "plan": <public plan>,
                                                                     "insecure_tfp", "max_batch", "label_only",
                                                                     "engine", "dealer_id", "queries_left"}
                       {"type": "session", "batch_sizes": [n..], -> {"type": "session", "session_id": 32 hex,
                        "plan_hash": h, "engine"}                   "timeout_s", "insecure_tfp", "plan_hash",
                                                                     "label_only", "engine", "dealer_id",
                                                                     "dealer": HOST:PORT}
                                                                     ... later {"type": "done", "session_id",
                                                                     "elapsed_s"}
    server -> dealer   {"type": "ping"}                          -> {"type": "pong", "role": "dealer"}
                       {"type": "join", "session_id",            -> {"type": "joined", "session_id",
                        "timeout_s", "engine"}                      "dealer_id"}
                                                                     ... later {"type": "done", "session_id"}
    any -> any         {"type": "error", "message": "..."}       (the request failed; the sender closes;
                        [, "retry_after_s": s]                     retry_after_s: trying again may work)
                       {"type": "busy", "message", "retry_after_s"}  (no capacity now: retry after s)

A session lives as long as its control connection: closing it (or a peer dying) cancels the session,
and the other sides stop their parties. The framing functions below (a 4-byte length, then the JSON)
remain for the one message sent outside TLS, the `busy` answer of a listener at its connection limit,
and for the version-2 peers the preface answers.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time

from deepreduce.errors import UserError

PROTOCOL_VERSION = 2
MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
_LENGTH = struct.Struct(">I")


class ControlError(UserError):
    """A user-facing error of the control plane: one line, exit code 2."""


def is_user_error(exc: BaseException) -> bool:
    """An error to print as one `error: ...` line (the project's UserError, ControlError included)."""
    return isinstance(exc, UserError)


class ProtocolError(ControlError):
    """A peer broke the framing, sent a malformed message, timed out or vanished."""


class PeerClosed(ProtocolError):
    """The peer closed the connection before (or instead of) a message."""


class Unreachable(ControlError):
    """Nothing accepted the connection within the connect timeout."""


class AuthError(ControlError):
    """The peer could not be authenticated, or its certificate proves a role that may not connect here."""


class RemoteError(ControlError):
    """The peer answered with {"type": "error"}: its message is the user's error. `retry_after`
    (seconds) is set when the peer said that trying again later may work."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class BusyError(RemoteError):
    """The peer answered {"type": "busy"}: no capacity now, retry after `retry_after` seconds."""


# -- framing ----------------------------------------------------------------------------------

def canonical(obj) -> bytes:
    """The one JSON serialisation that frames and MACs use (sorted keys, no spaces, ASCII)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def message_body(msg: dict, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """One message as it travels inside a link frame: canonical JSON with the version, within the limit."""
    body = canonical({"v": PROTOCOL_VERSION, **msg})
    if len(body) > max_bytes:
        raise ProtocolError(f"a {msg.get('type')!r} message of {len(body)} bytes exceeds the {max_bytes}-byte limit")
    return body


def encode(msg: dict, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """One message framed for a plain socket: a 4-byte length, then `message_body`."""
    body = message_body(msg, max_bytes)
    return _LENGTH.pack(len(body)) + body


def write_frame(sock, data: bytes, what: str = "message") -> None:
    try:
        sock.sendall(data)
    except (OSError, ValueError) as exc:
        raise PeerClosed(f"connection lost while sending {what} ({getattr(exc, 'strerror', None) or exc})") from None


def read_frame(sock, timeout: float, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """One frame's body; the header and the body together must arrive within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size, deadline, timeout, allow_eof=True))
    if length > max_bytes:
        raise ProtocolError(f"peer announced a {length}-byte message, above the {max_bytes}-byte limit")
    return _recv_exact(sock, length, deadline, timeout, allow_eof=False)


def decode(body: bytes) -> dict:
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"peer sent a message that is not UTF-8 JSON ({type(exc).__name__}: {exc})"[:300]) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("peer sent a message that is not a JSON object with a string \"type\"")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks control protocol version {repr(msg.get('v'))[:20]}, "
                            f"this program speaks {PROTOCOL_VERSION}: run matching versions")
    return msg


def _recv_exact(sock, n: int, deadline: float, timeout: float, allow_eof: bool) -> bytes:
    chunks, got = [], 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError(f"timed out after {timeout:g} s waiting for the peer")
        try:
            sock.settimeout(remaining)
            chunk = sock.recv(min(n - got, 1 << 16))
        except (socket.timeout, ssl.SSLWantReadError):
            raise ProtocolError(f"timed out after {timeout:g} s waiting for the peer") from None
        except ssl.SSLError as exc:
            raise ProtocolError(f"TLS error from the peer ({exc.reason or exc})") from None
        except (OSError, ValueError) as exc:
            raise PeerClosed(f"connection lost ({getattr(exc, 'strerror', None) or exc})") from None
        if not chunk:
            if got == 0 and allow_eof:
                raise PeerClosed("the peer closed the connection")
            raise ProtocolError("the peer closed the connection in the middle of a message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# -- channels -----------------------------------------------------------------------------------------

class ControlChannel:
    """A control connection: messages framed on a socket. The roles use its subclass over a TLS link
    (`secure.control.auth.LinkControlChannel`); this plain one frames on whatever socket it is given."""

    def __init__(self, sock, peer_id: str = "", peer_role: str = "", peer_addr: str = "", limit_key: str = ""):
        self.sock = sock
        self.peer_id, self.peer_role, self.peer_addr = peer_id, peer_role, peer_addr
        self.limit_key = limit_key or peer_addr

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> bool:
        """Input already buffered above the socket (select() does not see it)."""
        return False

    def getsockname(self):
        return self.sock.getsockname()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, type_: str, **fields) -> None:
        write_frame(self.sock, encode({"type": type_, **fields}), repr(type_))

    def recv(self, timeout: float, max_bytes: int = MAX_MESSAGE_BYTES) -> dict:
        return decode(read_frame(self.sock, timeout, max_bytes))


def send(conn, type_: str, **fields) -> None:
    """Send on a ControlChannel, or framed on a raw socket."""
    if isinstance(conn, ControlChannel):
        conn.send(type_, **fields)
    else:
        write_frame(conn, encode({"type": type_, **fields}), repr(type_))


def recv(conn, timeout: float, max_bytes: int = MAX_MESSAGE_BYTES) -> dict:
    """One message; ProtocolError on timeout, a bad frame or a bad version; PeerClosed on EOF."""
    if isinstance(conn, ControlChannel):
        return conn.recv(timeout, max_bytes)
    return decode(read_frame(conn, timeout, max_bytes))


def send_error(conn, message: str, retry_after: float | None = None) -> None:
    """Best effort: the peer may already be gone."""
    extra = {} if retry_after is None else {"retry_after_s": round(float(retry_after), 1)}
    try:
        send(conn, "error", message=one_line(message), **extra)
    except ProtocolError:
        pass


def send_busy(conn, message: str, retry_after: float) -> None:
    try:
        send(conn, "busy", message=one_line(message), retry_after_s=round(float(retry_after), 1))
    except ProtocolError:
        pass


# -- message helpers --------------------------------------------------------------------------

def _retry_after(msg: dict) -> float | None:
    value = msg.get("retry_after_s")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e6 else None


def expect(msg: dict, *types: str) -> dict:
    """msg if its type is one of `types`; a peer's error becomes RemoteError, busy BusyError."""
    if msg["type"] == "error":
        raise RemoteError(one_line(str(msg.get("message", "the peer reported an unspecified error"))),
                          _retry_after(msg))
    if msg["type"] == "busy":
        after = _retry_after(msg)
        raise BusyError(one_line(str(msg.get("message", "the peer is busy"))), 5.0 if after is None else after)
    if msg["type"] not in types:
        raise ProtocolError(f"expected {' or '.join(map(repr, types))} message, got {msg['type'][:40]!r}")
    return msg


def field(msg: dict, name: str, kind, check=None, what: str = "") -> object:
    """A required message field of the given JSON type (bool is not an int here)."""
    value = msg.get(name)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if ok and check is not None:
        try:
            ok = bool(check(value))
        except (TypeError, ValueError, OverflowError):
            ok = False
    if not ok:
        what = what or getattr(kind, "__name__", "a number")
        raise ProtocolError(one_line(f"bad {msg['type'][:40]!r} message: field {name!r} must be {what}, "
                                     f"got {str(value)[:60]!r}", 300))
    return value


def is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def one_line(text: str, limit: int = 800) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


# -- addresses and connections ------------------------------------------------------------------

def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ControlError(f"{what} {text!r} is not HOST:PORT (e.g. 127.0.0.1:7000)")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port() -> int:
    """A TCP port free on every interface now, IPv6 included where the host has it (as c10d's store
    binds); the one helper for tests and local runs that need a port."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", 0)
    except OSError:
        s, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("", 0)
    with s:
        s.bind(address)
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(host: str, port: int, timeout: float, what: str = "peer", retry_delay: float = 0.25) -> socket.socket:
    """Connect, retrying refused/unreachable attempts until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, min(remaining, 10.0)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            if time.monotonic() + retry_delay >= deadline:
                raise Unreachable(f"cannot reach the {what} at {format_address(host, port)} "
                                   f"({exc.strerror or exc}) after {timeout:g} s: is it running?") from None
            time.sleep(retry_delay)
