"""Control messages between pi-client, pi-server and pi-dealer: length-prefixed JSON over TCP.

Frame: a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding one object
``{"v": PROTOCOL_VERSION, "type": "...", ...}``. A length above the limit (1 MiB by default) is
refused without reading the body; every read has a timeout. Messages (v1)::

    client -> server   {"type": "ping"}                          -> {"type": "pong", "role": "server"}
                       {"type": "info"}                          -> {"type": "info", "plan": <public plan>,
                                                                     "insecure_tfp", "max_batch"}
                       {"type": "session", "batch_size": n,      -> {"type": "session", "session_id", "host",
                        "plan_hash": h}                              "port", "timeout_s", "insecure_tfp", "plan_hash"}
                                                                     ... later {"type": "done", "session_id",
                                                                     "elapsed_s"}
    server -> dealer   {"type": "ping"}                          -> {"type": "pong", "role": "dealer"}
                       {"type": "join", "session_id", "host",    -> {"type": "joined", "session_id"}
                        "port", "timeout_s"}                         ... later {"type": "done", "session_id"}
    any -> any         {"type": "error", "message": "..."}       (the request failed; the sender closes)

A session lives as long as its connection: closing it (or a peer dying) cancels the session, and
the other side stops its party and frees the rendezvous port.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_READ_TIMEOUT = 30.0
_LENGTH = struct.Struct(">I")


class ControlError(Exception):
    """A user-facing error of the control plane: one line, exit code 2 (like deepreduce's UserError,
    which is not imported here because `deepreduce` imports torch, too slow before `listening on`)."""


def is_user_error(exc: BaseException) -> bool:
    """ControlError, or deepreduce's UserError once that module is loaded."""
    errors = sys.modules.get("deepreduce.errors")
    return isinstance(exc, ControlError) or (errors is not None and isinstance(exc, errors.UserError))


class ProtocolError(ControlError):
    """A peer broke the framing, sent a malformed message, timed out or vanished."""


class PeerClosed(ProtocolError):
    """The peer closed the connection before (or instead of) a message."""


class RemoteError(ControlError):
    """The peer answered with {"type": "error"}: its message is the user's error."""


# -- framing ----------------------------------------------------------------------------------

def encode(msg: dict, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    body = json.dumps({"v": PROTOCOL_VERSION, **msg}, separators=(",", ":")).encode()
    if len(body) > max_bytes:
        raise ProtocolError(f"a {msg.get('type')!r} message of {len(body)} bytes exceeds the {max_bytes}-byte limit")
    return _LENGTH.pack(len(body)) + body


def send(sock: socket.socket, type_: str, **fields) -> None:
    try:
        sock.sendall(encode({"type": type_, **fields}))
    except OSError as exc:
        raise PeerClosed(f"connection lost while sending {type_!r} ({exc.strerror or exc})") from None


def send_error(sock: socket.socket, message: str) -> None:
    """Best effort: the peer may already be gone."""
    try:
        send(sock, "error", message=one_line(message))
    except ProtocolError:
        pass


def recv(sock: socket.socket, timeout: float, max_bytes: int = MAX_MESSAGE_BYTES) -> dict:
    """One message; ProtocolError on timeout, a bad frame or a bad version; PeerClosed on EOF."""
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size, timeout, allow_eof=True))
    if length > max_bytes:
        raise ProtocolError(f"peer announced a {length}-byte message, above the {max_bytes}-byte limit")
    return decode(_recv_exact(sock, length, timeout, allow_eof=False))


def decode(body: bytes) -> dict:
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"peer sent a message that is not UTF-8 JSON ({exc})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("peer sent a message that is not a JSON object with a string \"type\"")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks control protocol version {msg.get('v')!r}, "
                            f"this program speaks {PROTOCOL_VERSION}: run matching versions")
    return msg


def _recv_exact(sock: socket.socket, n: int, timeout: float, allow_eof: bool) -> bytes:
    deadline = time.monotonic() + timeout
    chunks, got = [], 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError(f"timed out after {timeout:g} s waiting for the peer")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - got, 1 << 16))
        except socket.timeout:
            raise ProtocolError(f"timed out after {timeout:g} s waiting for the peer") from None
        except OSError as exc:
            raise PeerClosed(f"connection lost ({exc.strerror or exc})") from None
        if not chunk:
            if got == 0 and allow_eof:
                raise PeerClosed("the peer closed the connection")
            raise ProtocolError("the peer closed the connection in the middle of a message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# -- message helpers --------------------------------------------------------------------------

def expect(msg: dict, *types: str) -> dict:
    """msg if its type is one of `types`; a peer's error becomes RemoteError."""
    if msg["type"] == "error":
        raise RemoteError(one_line(str(msg.get("message", "the peer reported an unspecified error"))))
    if msg["type"] not in types:
        raise ProtocolError(f"expected {' or '.join(map(repr, types))} message, got {msg['type']!r}")
    return msg


def field(msg: dict, name: str, kind: type, check=None, what: str = "") -> object:
    """A required message field of the given JSON type (bool is not an int here)."""
    value = msg.get(name)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok or (check is not None and not check(value)):
        what = what or getattr(kind, "__name__", "a number")
        raise ProtocolError(f"bad {msg['type']!r} message: field {name!r} must be {what}, got {value!r}"[:300])
    return value


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
                raise ControlError(f"cannot reach the {what} at {format_address(host, port)} "
                                f"({exc.strerror or exc}) after {timeout:g} s: is it running?") from None
            time.sleep(retry_delay)


def request(host: str, port: int, msg: dict, connect_timeout: float, read_timeout: float, what: str,
            *reply_types: str) -> dict:
    """One request, one reply, on a fresh connection."""
    with connect(host, port, connect_timeout, what) as sock:
        send(sock, msg["type"], **{k: v for k, v in msg.items() if k != "type"})
        return expect(recv(sock, read_timeout), *reply_types)
