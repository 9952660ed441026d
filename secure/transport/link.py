"""Link: a framed, bounded message stream over TLS 1.3 on one TCP connection.

Frame: an 8-byte big-endian length, then the message. The receiver refuses a length above its limit
before reading a byte of the body (FrameTooLarge). TLS (Python's ssl over OpenSSL) encrypts and
authenticates every record with a per-connection key and a per-record sequence number: an altered,
replayed, reordered or dropped record fails its authentication tag, and an end of stream without
close_notify is a truncation; each surfaces as its own LinkError and ends the link.

Design: the TLS state machine is an ssl.SSLObject over two ssl.MemoryBIOs, and this module moves the
bytes between the BIOs and a non-blocking TCP socket itself. That gives
  * exact wire counters (`wire_sent`, `wire_received`: every TCP payload byte, TLS overhead, handshake
    and preface included), counted where the socket's send/recv return, and
  * safe concurrency: OpenSSL must not run a read and a write on one connection at the same time, so
    every SSLObject call holds one lock, while the slow socket I/O runs outside it.
`send` queues the message and returns; one writer thread per link encrypts and sends the queue in
order, and is the only thread that writes to the socket (TLS records must leave in the order they were
made). So two ends can each send a large message and then receive, as the engine's exchange does,
without deadlock. `recv` is for one thread at a time.

Establishing a link: TLS handshake (mutual certificates, ALPN = the protocol version), then each end
identifies the peer by its certificate (credentials.peer_role) and checks the role it expects, then
both send READY + the preface they sent or received (so a preface altered on the path is caught)
and wait for the other's. A refusing end sends REFUSED + its reason instead and closes; a certificate
refused by TLS itself is reported by TLS alert. So both ends see the same failure at `connect` or
`accept`, before any application byte.
"""

from __future__ import annotations

import collections
import select
import socket
import ssl
import struct
import threading
import time

from secure.transport import (ALPN, FrameTooLarge, HandshakeError, LinkClosed, LinkError, LinkTimeout,
                              LinkTLSError, LinkTruncated, TransportError)
from secure.transport import preface as _preface
from secure.transport.credentials import Peer, Trust, peer_role

MAX_FRAME = 1 << 30  # default hard cap on one message (1 GiB); recv(max_bytes) can lower it per call
CHUNK = 1 << 18  # plaintext handed to TLS at once (16 records of 16 KiB)
READ_SIZE = 1 << 18
_HEADER = struct.Struct(">Q")
_READY, _REFUSED = b"\x89DRPI-ready\n", b"\x89DRPI-refused\n"
_ALERT_HINT = "is this party's certificate among the peer's trusted certificates for its role?"


class Link:
    """One established link; made by Link.connect or Link.accept, which own the socket from then on (and
    close it if the handshake fails). `peer` is the authenticated Peer; the counters are public."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 max_frame: int, send_timeout: float | None):
        sock.setblocking(False)
        # Protocol messages are often small and each one ends a round: Nagle's algorithm would hold
        # them back waiting for the peer's ACK (delayed up to tens of ms), so send every write at once.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._tls, self._in, self._out = sock, tls, incoming, outgoing
        self.max_frame, self.send_timeout = max_frame, send_timeout
        self.peer: Peer | None = None
        self.wire_sent = self.wire_received = self.payload_sent = self.payload_received = 0
        self._lock = threading.Lock()  # every SSLObject / BIO call
        self._rlock = threading.Lock()  # one reader at a time
        self._cv = threading.Condition()  # the send queue and the link's state
        self._queue: collections.deque[bytes] = collections.deque()
        self.pending = 0  # bytes queued and not yet handed to TLS
        self._kick = self._stopping = self._closed = False
        self._error: LinkError | None = None
        self._writer: threading.Thread | None = None
        self._rpoll, self._wpoll = select.poll(), select.poll()
        self._rpoll.register(sock, select.POLLIN)
        self._wpoll.register(sock, select.POLLOUT)

    # -- establishing ------------------------------------------------------------------------------

    @classmethod
    def connect(cls, sock: socket.socket, context: ssl.SSLContext, trust: Trust, roles: tuple[str, ...],
                timeout: float, preface: _preface.Preface | None = None, peer: str = "peer",
                max_frame: int = MAX_FRAME, send_timeout: float | None = None) -> "Link":
        """The connecting end (TLS client) on a connected TCP socket: sends `preface` first if given
        (a listener's version refusal is recognised), then the handshake. `roles`: what the peer
        may be; `peer` names it in messages ("server at 10.0.0.2:7000")."""
        return cls._establish(sock, context, False, trust, roles, timeout, preface, peer, max_frame, send_timeout)

    @classmethod
    def accept(cls, sock: socket.socket, context: ssl.SSLContext, trust: Trust, roles: tuple[str, ...],
               timeout: float, preface: _preface.Preface | None = None, peer: str = "peer",
               max_frame: int = MAX_FRAME, send_timeout: float | None = None) -> "Link":
        """The listening end (TLS server) on an accepted socket whose `preface` was read: the peer must
        prove the role the preface claims, and one of `roles`."""
        if preface is not None:
            roles = tuple(r for r in roles if r == preface.role)
        return cls._establish(sock, context, True, trust, roles, timeout, preface, peer, max_frame, send_timeout)

    @classmethod
    def _establish(cls, sock, context, server_side, trust, roles, timeout, preface, peer, max_frame, send_timeout):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        link = cls(sock, context.wrap_bio(incoming, outgoing, server_side=server_side), incoming, outgoing,
                   max_frame, send_timeout)
        deadline = time.monotonic() + timeout
        bind = preface.pack() if preface is not None else b""
        try:
            if preface is not None and not server_side:
                link._send_raw(bind, deadline)
            link._handshake(deadline, peer, check_answer=preface is not None and not server_side)
            link._start_writer()
            link._confirm(trust, roles, bind, deadline, peer)
            return link
        except LinkError as exc:
            link._abort()
            raise HandshakeError(_handshake_message(exc, peer, timeout)) from None
        except BaseException:
            link._abort()
            raise

    def _handshake(self, deadline: float, peer: str, check_answer: bool) -> None:
        first = bytearray() if check_answer else None
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                self._flush_alert()  # tells the peer why (unknown CA): it fails too, not just times out
                raise HandshakeError(f"the {peer}'s certificate is not trusted ({exc.verify_message}): it must be "
                                     "listed among this party's trusted peers for its role") from None
            except ssl.SSLEOFError:
                raise HandshakeError(f"the {peer} closed the connection during the TLS handshake") from None
            except ssl.SSLError as exc:
                self._flush_alert()
                hint = f": {_ALERT_HINT}" if "ALERT" in str(exc.reason) else ""
                raise HandshakeError(f"TLS handshake with the {peer} failed ({exc.reason or exc}){hint}") from None
            self._send_raw(self._drain(), deadline)
            data = self._recv_raw(deadline)
            if first is not None:  # the first answer may be a version refusal instead of TLS
                first += data
                if not _preface.check_answer(bytes(first), f"the {peer}"):
                    if data:
                        continue
                    raise HandshakeError(f"the {peer} closed the connection " +
                                         ("in the middle of its answer" if first else "before the TLS handshake"))
                data, first = bytes(first), None
            with self._lock:
                self._in.write(data) if data else self._in.write_eof()
        self._send_raw(self._drain(), deadline)

    def _confirm(self, trust: Trust, roles, bind: bytes, deadline: float, peer: str) -> None:
        try:
            alpn = self._tls.selected_alpn_protocol()
            if alpn != ALPN:
                raise HandshakeError(f"the {peer} does not speak {ALPN} (TLS ALPN {alpn}): run matching versions")
            self.peer = peer_role(self._tls, trust)
            if self.peer.role not in roles:
                raise HandshakeError(f"the {peer} is authenticated as {self.peer.role} {self.peer.id!r}, which may "
                                     + (f"not connect here as a {' or '.join(roles)}" if roles else "not connect here"))
        except HandshakeError as exc:
            self._enqueue(_REFUSED + str(exc).encode())
            self.close()
            raise
        self._enqueue(_READY + bind)
        answer = self._recv_frame(1 << 12, max(0.0, deadline - time.monotonic()))
        if answer.startswith(_REFUSED):
            reason = answer[len(_REFUSED):].decode("utf-8", "replace")
            raise HandshakeError(f"the {peer} refused this party: {' '.join(reason.split())[:400]}")
        if answer != _READY + bind:
            raise HandshakeError(f"the {peer} saw another preface than this party: altered on the way" if
                                 answer.startswith(_READY) else f"the {peer} sent no handshake answer")

    # -- sending ----------------------------------------------------------------------------------------

    def send(self, data, owned: bool = False) -> None:
        """Queue one message and return (the writer thread sends it). `data` is copied unless it is
        bytes or `owned` (a buffer the caller hands over and never writes again: sent from where it is).
        FrameTooLarge (the link stays usable) above max_frame; the link's error if it ended."""
        payload = data if isinstance(data, bytes) else memoryview(data).cast("B") if owned else bytes(data)
        if len(payload) > self.max_frame:
            raise FrameTooLarge(f"a {len(payload)}-byte message is above this link's {self.max_frame}-byte limit")
        self._enqueue(payload)
        self.payload_sent += len(payload)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message is on the wire (in the kernel's send buffer); LinkTimeout
        if that takes longer than `timeout` (the link goes on: the peer may just be busy)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while (self._queue or self.pending) and self._error is None:
                if not self._cv.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                    raise LinkTimeout(f"{self.pending} bytes still queued after {timeout:g} s: the peer does not read")
            self._check()

    def _enqueue(self, payload: bytes) -> None:
        with self._cv:
            self._check()
            self._queue.append(payload)
            self.pending += len(payload)
            self._cv.notify_all()

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="link-writer", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._queue or self._kick or self._stopping or self._error):
                        self._cv.wait()
                    if self._error is not None or (self._stopping and not self._queue):
                        return
                    item = self._queue.popleft() if self._queue else None
                    self._kick = False
                if item is None:  # the reader left TLS output behind (e.g. a key update answer)
                    self._send_raw(self._drain())
                    continue
                view = memoryview(item)
                self._write_plain(_HEADER.pack(len(item)) + bytes(view[:CHUNK - _HEADER.size]))
                for offset in range(CHUNK - _HEADER.size, len(item), CHUNK):
                    self._write_plain(view[offset:offset + CHUNK])
                with self._cv:
                    self.pending -= len(item)
                    self._cv.notify_all()
        except LinkError as exc:
            self._fail(exc)
        except BaseException as exc:  # never die silently: the reader would wait forever
            self._fail(LinkError(f"the link's writer failed ({type(exc).__name__}: {exc})"))

    def _write_plain(self, data) -> None:
        with self._lock:
            try:
                self._tls.write(data)
            except ssl.SSLError as exc:
                raise LinkTLSError(f"TLS failed while sending ({exc.reason or exc})") from None
            out = self._out.read()
        self._send_raw(out)

    def _drain(self) -> bytes:
        with self._lock:
            return self._out.read()

    def _send_raw(self, data, deadline: float | None = None) -> None:
        view, sent = memoryview(data), 0
        while sent < len(view):
            try:
                n = self._sock.send(view[sent:])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                raise LinkClosed(f"the connection was lost while sending ({exc.strerror or exc})") from None
            if n:
                sent += n
                self.wire_sent += n
                continue
            wait = self.send_timeout if deadline is None else deadline - time.monotonic()
            if (wait is not None and wait <= 0) or not self._wpoll.poll(None if wait is None else wait * 1000):
                raise LinkTimeout("the peer stopped reading: could not send within "
                                  + ("the handshake timeout" if deadline is not None else f"{self.send_timeout:g} s"))

    # -- receiving -------------------------------------------------------------------------------------

    def recv(self, max_bytes: int | None = None, timeout: float | None = None) -> bytearray:
        """The next message (a bytearray: writable, so numpy/torch can view it without a copy). The whole
        message must arrive within `timeout` seconds (None: wait as long as the link lives); a message
        above `max_bytes` (default and ceiling: max_frame) is refused unread. Any error ends the link."""
        with self._rlock:
            with self._cv:
                self._check()
            try:
                limit = self.max_frame if max_bytes is None else min(max_bytes, self.max_frame)
                body = self._recv_frame(limit, timeout)
            except LinkError as exc:
                raise self._fail(exc) from None
            self.payload_received += len(body)
            return body

    def _recv_frame(self, limit: int, timeout: float | None) -> bytearray:
        deadline = None if timeout is None else time.monotonic() + timeout
        header = bytearray(_HEADER.size)
        self._read_plain(memoryview(header), deadline, timeout, start=True)
        (length,) = _HEADER.unpack(header)
        if length > limit:
            raise FrameTooLarge(f"the peer announced a {length}-byte message, above the {limit}-byte limit")
        body = bytearray(length)
        self._read_plain(memoryview(body), deadline, timeout, start=False)
        return body

    def _read_plain(self, view: memoryview, deadline, timeout, start: bool) -> None:
        got = 0
        while got < len(view):
            with self._lock:
                try:
                    n = self._tls.read(len(view) - got, view[got:])
                except ssl.SSLWantReadError:
                    n = None
                except ssl.SSLZeroReturnError:
                    raise LinkClosed("the peer closed the link" if start and not got else
                                     "the peer closed the link in the middle of a message") from None
                except ssl.SSLEOFError:
                    raise LinkTruncated("the connection ended without TLS close_notify: truncated on the way, "
                                        "or the peer died") from None
                except ssl.SSLError as exc:
                    raise LinkTLSError(f"TLS refused the incoming stream ({exc.reason or exc}): altered, replayed, "
                                       "reordered or dropped records, or the peer aborted") from None
                out_pending = self._out.pending
            if out_pending:
                with self._cv:
                    self._kick = True
                    self._cv.notify_all()
            if n:
                got += n
                continue
            if n == 0:  # what SSLObject.read returns after the peer's close_notify
                raise LinkClosed("the peer closed the link" if start and not got else
                                 "the peer closed the link in the middle of a message")
            data = self._recv_raw(deadline, timeout)
            with self._lock:
                self._in.write(data) if data else self._in.write_eof()

    def _recv_raw(self, deadline: float | None, timeout: float | None = None) -> bytes:
        while True:
            try:
                data = self._sock.recv(READ_SIZE)
                self.wire_received += len(data)
                return data
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise LinkTruncated("the connection was reset without TLS close_notify "
                                    f"({exc.strerror or exc})") from None
            wait = None if deadline is None else deadline - time.monotonic()
            if (wait is not None and wait <= 0) or not self._rpoll.poll(None if wait is None else wait * 1000):
                raise LinkTimeout(f"nothing arrived from the peer within {timeout if timeout is not None else 0:g} s")

    # -- for select() users (the control plane waits on several connections at once) -----------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def getsockname(self):
        return self._sock.getsockname()

    def buffered(self) -> bool:
        """Input already read from the socket but not yet returned by recv (select() does not see it)."""
        with self._lock:
            return self._tls.pending() > 0 or self._in.pending > 0

    # -- ending ------------------------------------------------------------------------------------------

    def _check(self) -> None:  # with self._cv held
        if self._error is not None:
            raise self._error

    def _fail(self, exc: LinkError) -> LinkError:
        """Record the first error and end the connection (the peer's reads see it end)."""
        with self._cv:
            if self._error is None:
                self._error = exc
            self._cv.notify_all()
            exc = self._error
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return exc

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, then TLS close_notify, then wait (up to `timeout`) for the peer's end of
        the TCP stream, so that neither side's last bytes are lost to a reset. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = self._stopping = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        if self._writer is not None:
            self._writer.join(timeout)
        if self._error is None and (self._writer is None or not self._writer.is_alive()):
            try:
                with self._lock:
                    try:
                        self._tls.unwrap()
                    except ssl.SSLError:
                        pass  # SSLWantReadError: close_notify is queued; the peer's is not awaited here
                    data = self._out.read()
                self._send_raw(data, deadline)
                self._sock.shutdown(socket.SHUT_WR)
                if self._rlock.acquire(blocking=False):  # a reader blocked in recv will see the end itself
                    try:
                        while self._recv_raw(deadline):
                            pass
                    finally:
                        self._rlock.release()
            except (TransportError, OSError):
                pass
        self._fail(LinkClosed("this party closed the link"))
        self._sock.close()

    def _abort(self) -> None:
        """End a link that never became ready (its refusal, if any, is already queued or sent)."""
        if not self._closed:
            self._fail(LinkClosed("the handshake failed"))
            self._closed = True
            if self._writer is not None:
                self._writer.join(1.0)
            self._sock.close()

    def _flush_alert(self) -> None:
        try:
            self.wire_sent += self._sock.send(self._drain())
        except OSError:
            pass

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _handshake_message(exc: LinkError, peer: str, timeout: float) -> str:
    if isinstance(exc, LinkTimeout):
        return f"no handshake from the {peer} within {timeout:g} s"
    if isinstance(exc, LinkTLSError) and "ALERT" in str(exc):
        return f"the {peer} refused the TLS handshake ({str(exc).split('(')[1].split(')')[0]}): {_ALERT_HINT}"
    if isinstance(exc, (LinkClosed, LinkTruncated)):
        return f"the {peer} closed the connection during the handshake"
    return f"handshake with the {peer} failed: {exc}"
