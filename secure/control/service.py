"""The listening-port service loop shared by server and dealer, its connection limits and port picking.

`Service` is the role's one port: every connection starts with the transport's preface. A session's
party connection is handed to that session's worker process (`route`); a control connection runs the
TLS handshake here (`secure.control.auth.accept_control`) before its handler runs. Connection limits
in total and per address, `busy` answers.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
import traceback
from collections import defaultdict, deque
from dataclasses import dataclass

from secure.control import auth, protocol
from secure.control.workers import Worker
from secure.transport import TransportError, preface
from secure.transport.credentials import PartyIdentity

_POLL_S = 0.2


# -- rendezvous ports ---------------------------------------------------------------------------

class PortPicker:
    """Fresh free TCP ports: free on all interfaces now and not handed out recently."""

    def __init__(self, history: int = 256):
        self._recent: deque[int] = deque(maxlen=history)
        self._lock = threading.Lock()

    def fresh(self, attempts: int = 50) -> int:
        with self._lock:
            for _ in range(attempts):
                port = protocol.free_port()
                if port not in self._recent:
                    self._recent.append(port)
                    return port
        raise RuntimeError("no fresh free TCP port found")


# -- the control-port service loop ---------------------------------------------------------------

@dataclass
class Limits:
    max_connections: int = 64          # open control connections, all peers together
    max_connections_per_ip: int = 16   # open control connections from one address
    busy_retry_s: float = 2.0          # what a refused connection is told


def add_limit_arguments(p) -> None:
    g = p.add_argument_group("connection limits")
    g.add_argument("--max-connections", type=int, default=Limits.max_connections,
                   help=f"open control connections, all peers together (default {Limits.max_connections})")
    g.add_argument("--max-connections-per-ip", type=int, default=Limits.max_connections_per_ip,
                   help=f"open control connections from one address (default {Limits.max_connections_per_ip})")


def limits_from_args(args) -> Limits:
    if args.max_connections < 1 or args.max_connections_per_ip < 1:
        raise protocol.ControlError("--max-connections and --max-connections-per-ip must be at least 1")
    return Limits(args.max_connections, args.max_connections_per_ip)


class Service:
    """Accepts connections on host:port; for each, in a thread: the preface, then either the hand-over
    of a party connection to its session's worker (`route`) or, for a control connection, the TLS
    handshake and `handler(channel)`.

    Connections above the limits are refused with a `busy` answer before anything is read; a peer
    that fails the handshake never reaches the handler. `stop` ends the loop (SIGTERM/SIGINT set
    it); workers registered with `track` are stopped on shutdown even if their session thread is stuck."""

    def __init__(self, name: str, host: str, port: int, security: "auth.Security | None" = None,
                 limits: Limits | None = None):
        self.name = name
        self.role = name.removeprefix("pi-")
        self.security = security or auth.Security(PartyIdentity.no_auth(self.role), self.role)
        self.limits = limits or Limits()
        self.stop = threading.Event()
        self._listener = _listen(host, port)
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._workers: set[Worker] = set()
        self._sessions: dict[bytes, Worker] = {}  # session id -> the worker its party connections go to
        self._per_ip: dict[str, int] = defaultdict(int)
        self._open = 0
        self._refusals: deque[float] = deque()
        self._skipped = 0
        self.counters = defaultdict(int)  # accepted, refused_busy, refused_auth, errors

    def announce(self) -> None:
        print(f"listening on {protocol.format_address(self.host, self.port)}", flush=True)

    def log(self, text: str) -> None:
        print(f"[{self.name}] {text}", flush=True)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())

    def serve(self, handler) -> None:
        self._listener.settimeout(_POLL_S)
        try:
            while not self.stop.is_set():
                try:
                    sock, addr = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self.stop.is_set():
                        break
                    time.sleep(0.05)  # EMFILE and friends: do not spin
                    continue
                self._start(handler, sock, addr)
        finally:
            self.shutdown()

    def _start(self, handler, sock: socket.socket, addr) -> None:
        ip = addr[0]
        with self._lock:
            if self._open >= self.limits.max_connections:
                reason = f"{self.limits.max_connections} connections open"
            elif self._per_ip[ip] >= self.limits.max_connections_per_ip:
                reason = f"{self.limits.max_connections_per_ip} connections open from {ip}"
            else:
                reason = None
                self._open += 1
                self._socks.add(sock)
                self._per_ip[ip] += 1
        if reason:
            self.counters["refused_busy"] += 1
            # A plain frame before any TLS: the connector recognises it where it expects the ServerHello
            # (secure.transport.preface.check_answer) and may retry.
            sock.settimeout(0.5)
            protocol.send_busy(sock, f"{self.name} is busy ({reason}): retry after "
                                     f"{self.limits.busy_retry_s:g} s", self.limits.busy_retry_s)
            _discard_input(sock)
            _close(sock)
            return
        self.counters["accepted"] += 1
        thread = threading.Thread(target=self._run, args=(handler, sock, addr), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, handler, sock: socket.socket, addr) -> None:
        peer = protocol.format_address(addr[0], addr[1])
        ch = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            got = preface.read_preface(sock, self.security.handshake_timeout, f"this {self.name}")
            if got.purpose == preface.PARTY:
                self._route(sock, got, peer)
                return
            ch = auth.accept_control(sock, got, self.security, self.role, peer)
            with self._lock:
                self._socks.add(ch)
            handler(ch)
        except protocol.PeerClosed:
            pass
        except (protocol.AuthError, TransportError) as exc:  # refused before any session state exists
            self.counters["refused_auth"] += 1
            self._log_refusal(f"refused {peer}: {exc}")
        except Exception as exc:  # a user error goes back to the peer; a bug must not stop the service
            self.counters["errors"] += 1
            retry_after = getattr(exc, "retry_after", None)
            if not protocol.is_user_error(exc):
                self.log(f"internal error: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                exc = f"internal {self.name} error ({type(exc).__name__}: {exc})"
            if ch is not None:
                protocol.send_error(ch, str(exc), retry_after)
        finally:
            if ch is not None:
                ch.close()
            _close(sock)
            with self._lock:
                self._socks.discard(sock)
                self._socks.discard(ch)
                self._open -= 1
                self._per_ip[addr[0]] -= 1
                if self._per_ip[addr[0]] <= 0:
                    del self._per_ip[addr[0]]
                self._threads.discard(threading.current_thread())

    # -- party connections: routed to their session's worker --------------------------------------
    def route(self, session_id: bytes, worker: Worker) -> None:
        """From now on, party connections that name `session_id` go to `worker`."""
        with self._lock:
            self._sessions[session_id] = worker

    def unroute(self, session_id: bytes) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _route(self, sock: socket.socket, got: preface.Preface, peer: str) -> None:
        with self._lock:
            worker = self._sessions.get(got.session_id)
        if worker is None:
            self.counters["refused_auth"] += 1
            self._log_refusal(f"refused {peer}: a {got.role}'s party connection for no session here "
                              f"({got.session_id.hex()[:12]})")
            return
        worker.hand_over(sock, got)

    def _log_refusal(self, text: str, per_minute: int = 20) -> None:
        """Log refused peers, at most `per_minute` lines a minute (then one line with the count)."""
        now = time.monotonic()
        with self._lock:
            while self._refusals and self._refusals[0] < now - 60:
                self._refusals.popleft()
            quiet = len(self._refusals) >= per_minute
            if not quiet:
                self._refusals.append(now)
                skipped, self._skipped = self._skipped, 0
            else:
                self._skipped += 1
        if not quiet:
            self.log(text + (f" ({skipped} more refusals not logged)" if skipped else ""))

    def track(self, worker: Worker) -> None:
        with self._lock:
            self._workers.add(worker)

    def untrack(self, worker: Worker) -> None:
        worker.stop()
        with self._lock:
            self._workers.discard(worker)

    def shutdown(self, join_s: float = 10.0) -> None:
        """Session threads see `stop`, tell their peers and stop their workers; then idle
        connections are cut and whatever is left is stopped here."""
        self.stop.set()
        self._listener.close()
        self._join(join_s / 2)
        with self._lock:
            socks, workers = list(self._socks), list(self._workers)
        for s in socks:
            try:
                (s.link._sock if isinstance(s, auth.LinkControlChannel) else s).shutdown(socket.SHUT_RDWR)
            except OSError:  # wakes threads blocked on a read
                pass
        for w in workers:
            w.stop()
        self._join(join_s / 2)

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _discard_input(sock) -> None:
    """Read what the peer already sent (without waiting): closing a socket with unread input makes the
    kernel send RST, which can destroy our last answer before the peer reads it."""
    try:
        sock.setblocking(False)
        for _ in range(16):
            if not sock.recv(1 << 16):
                break
    except (OSError, ValueError):
        pass


def _close(sock) -> None:
    if sock is None:
        return
    try:
        sock.close()
    except OSError:
        pass


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise protocol.ControlError(f"cannot listen on {protocol.format_address(host, port)} "
                                    f"({exc.strerror or exc}): pick another --host/--port") from None
    sock.listen(128)
    return sock


def run_main(main, argv=None) -> int:
    """Entry-point wrapper: user errors are one `error: ...` line and exit code 2."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not protocol.is_user_error(exc):
            raise
        print(f"error: {protocol.one_line(str(exc))}", file=sys.stderr, flush=True)
        return 2
