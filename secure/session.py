"""Per-session party processes and the control-port service loop shared by server and dealer.

Every party of every session runs in its own `Worker` process (CrypTen keeps global state, so a
process runs exactly one party once). Workers are forked from a fork server that imported torch,
the runtime and CrypTen once (`secure._warm`), so a party starts in milliseconds; set
DEEPREDUCE_WORKER_START=spawn for a fresh interpreter per party instead. Each worker reseeds every
random generator from os.urandom, so no two parties share a state inherited from the fork server.
The parent talks to a worker over a Pipe carrying plain pickles: one job, one reply. A worker dies
with its owner (it watches the pipe for the owner's end closing; PR_SET_PDEATHSIG covers its direct
parent), ignores Ctrl-C (its parent handles that) and is reaped when its session ends. A role's
temporary files (the fork server's socket) live in a private directory that is removed at exit;
one left by a killed role is removed by the next role that starts.

`Service` is the control port: TLS (optional) and the token handshake (`secure.auth`) on every
connection before its handler runs, connection limits in total and per address, `busy` answers.
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict, deque
from dataclasses import dataclass, field

from . import auth, protocol

_RUNTIME_MODULE = "secure.runtime"
_WARM_MODULE = "secure._warm"
_POLL_S = 0.2
START_ENV = "DEEPREDUCE_WORKER_START"
_context_lock = threading.Lock()
_context = None


def worker_context():
    """The multiprocessing context for party processes (fork server with the runtime preloaded)."""
    global _context
    with _context_lock:
        if _context is None:
            method = os.environ.get(START_ENV, "forkserver")
            if method not in ("forkserver", "spawn"):
                raise protocol.ControlError(f"${START_ENV}={method!r} must be forkserver or spawn")
            ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload([_WARM_MODULE])
            _context = ctx
        return _context


def start_fork_server() -> None:
    """Start the fork server now (it preloads in the background) so that the first session does not wait.
    If it cannot start (its socket path would be too long, ...), party processes are spawned instead."""
    global _context
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver
        try:
            forkserver.ensure_running()
        except OSError as exc:
            print(f"warning: no party fork server ({exc}): each party process starts a fresh interpreter",
                  file=sys.stderr, flush=True)
            with _context_lock:
                _context = multiprocessing.get_context("spawn")


# -- worker processes ---------------------------------------------------------------------------

class Worker:
    """One party process: it has the runtime loaded and runs one party when given a job."""

    def __init__(self, name: str):
        ctx = worker_context()
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, os.getpid()), name=name, daemon=False)
        self.process.start()
        self.pid = self.process.pid
        child.close()
        self._lock = threading.Lock()
        self._stopped = False

    def start_job(self, role: str, **kwargs) -> None:
        try:
            self.conn.send_bytes(pickle.dumps((role, kwargs)))
        except (OSError, ValueError):
            pass  # the worker already died: supervise() reports it

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self, grace: float = 3.0) -> None:
        """Terminate (then kill) if still running, reap, close the pipe. Idempotent, thread-safe."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(grace)
            if self.process.is_alive():
                self.process.kill()
            self.process.join()
            self.conn.close()
            self.process.close()


def _worker_main(conn, owner_pid: int) -> None:
    _die_with_parent(owner_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _reseed()
    try:
        failure = importlib.import_module(_WARM_MODULE).FAILURE
        runtime = None if failure else importlib.import_module(_RUNTIME_MODULE)
    except Exception as exc:  # reported when the job arrives
        runtime, failure = None, f"cannot load the secure runtime ({type(exc).__name__}: {exc})"
    try:
        role, kwargs = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return  # the parent gave up before the job
    threading.Thread(target=_watch_owner, args=(conn,), daemon=True).start()
    try:
        if failure:
            raise RuntimeError(failure)
        reply = ("ok", _run_party(runtime, role, kwargs))
    except BaseException as exc:
        reply = ("error", _describe(exc))
    try:
        conn.send_bytes(pickle.dumps(reply))
    except OSError:
        pass  # the parent stopped listening


def _watch_owner(conn) -> None:
    """The owner sends one job and nothing more: the pipe turns readable only when the owner is gone
    (a fork server's children outlive their owner otherwise, as they keep the server's alive pipe)."""
    try:
        multiprocessing.connection.wait([conn])
    except (OSError, ValueError):
        pass
    os._exit(1)


def _reseed() -> None:
    """Fresh randomness per party: a forked process would otherwise share its generators' state with
    every other fork of the same server (and torch's default seed is a constant anyway)."""
    import random
    random.seed(os.urandom(32))
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(int.from_bytes(os.urandom(4), "little"))
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _run_party(runtime, role: str, kwargs: dict) -> dict:
    rdv_args = kwargs.pop("rdv")
    _pin_interface(rdv_args["host"], rdv_args["port"])
    rdv = runtime.Rendezvous(**rdv_args)
    if role == "dealer":
        runtime.run_dealer(rdv)
        return {"role": role}
    run = runtime.run_server if role == "server" else runtime.run_client
    result = run(rdv=rdv, **kwargs)
    logits = getattr(result, "logits", None)
    profile = getattr(result, "profile", None)
    return {"role": role, "logits": None if logits is None else logits.double().tolist(),
            "profile": None if profile is None else profile.to_dict(),
            "insecure_tfp": bool(getattr(result, "insecure_tfp", False))}


def _pin_interface(host: str, port: int) -> None:
    """GLOO_SOCKET_IFNAME = the interface that carries the rendezvous address (unless already set),
    so that gloo's sockets listen there and not on whatever the host name resolves to."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))  # no packet is sent: this only picks the route
            local = s.getsockname()[0]
        name = _interface_of(local)
    except OSError:
        return
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name


def _interface_of(address: str) -> str | None:
    import fcntl
    import struct
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
        if socket.inet_ntoa(raw[20:24]) == address:
            return name
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc) if protocol.is_user_error(exc) else f"{type(exc).__name__}: {exc}"
    return protocol.one_line(text)


def _die_with_parent(owner_pid: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    try:
        os.kill(owner_pid, 0)
    except OSError:
        os._exit(1)
    if os.getppid() == 1:
        os._exit(1)


# -- private temporary directory -----------------------------------------------------------------

def private_tempdir(role: str) -> str:
    """A directory for this process's temporary files (and its children's), removed at exit;
    directories of roles that were killed are removed here."""
    base = os.path.join(tempfile.gettempdir(), f"deepreduce-pi-{os.getuid()}")
    if len(base) > 48 and os.path.isdir("/tmp"):  # the fork server's socket path must stay under 108 bytes
        base = f"/tmp/deepreduce-pi-{os.getuid()}"
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        for entry in os.listdir(base):
            parts = entry.rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit() and _start_time(int(parts[1])) != parts[2]:
                shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
        mine = os.path.join(base, f"{role}-{os.getpid()}-{_start_time(os.getpid())}")
        os.makedirs(mine, mode=0o700, exist_ok=True)
    except OSError:
        return tempfile.gettempdir()
    tempfile.tempdir = mine
    os.environ["TMPDIR"] = mine
    # After multiprocessing's own clean-up of its pymp-* directory in here (exit priority -100).
    multiprocessing.util.Finalize(None, shutil.rmtree, args=(mine, True), exitpriority=-200)
    return mine


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "gone"


# -- supervising a running party ------------------------------------------------------------------

@dataclass
class Outcome:
    kind: str  # "ok" | "failed" | "died" | "peer_error" | "peer_closed" | "stopped" | "timeout"
    result: dict | None = None
    message: str = ""
    peer: str = ""
    done_peers: set = field(default_factory=set)
    retry_after: float | None = None  # a peer's error said that trying again later may work


def supervise(worker: Worker, peers: dict, deadline: float, stop: threading.Event | None = None,
              read_timeout: float = protocol.DEFAULT_READ_TIMEOUT) -> Outcome:
    """Wait until the worker reports, a peer reports an error or hangs up, `stop` is set or time is up.

    `peers` maps a name to its Channel. A peer's {"type": "done"} is remembered and that peer is no
    longer watched."""
    watching, done = dict(peers), set()
    while True:
        if stop is not None and stop.is_set():
            return Outcome("stopped", message="shutting down", done_peers=done)
        try:
            outcome = _worker_outcome(worker)
            if outcome:
                outcome.done_peers = done
                return outcome
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Outcome("timeout", message="the session ran past its time limit", done_peers=done)
            buffered = [ch for ch in watching.values() if getattr(ch, "pending", lambda: False)()]
            ready = buffered or multiprocessing.connection.wait(
                [worker.conn, worker.process.sentinel, *watching.values()], timeout=min(_POLL_S, remaining))
        except (ValueError, OSError):
            if worker.stopped:  # stopped from another thread (shutdown)
                return Outcome("stopped", message="shutting down", done_peers=done)
            raise
        for name, ch in list(watching.items()):
            if ch in ready:
                msg, outcome = _peer_message(name, ch, read_timeout)
                if outcome:
                    outcome.done_peers = done
                    return outcome
                done.add(name)
                del watching[name]


def _worker_outcome(worker: Worker) -> Outcome | None:
    alive = worker.process.is_alive()  # checked first: a worker reports, then exits
    try:
        if worker.conn.poll():
            status, payload = pickle.loads(worker.conn.recv_bytes())
            return Outcome("ok", result=payload) if status == "ok" else Outcome("failed", message=payload)
    except (EOFError, OSError):
        alive = False
    if alive:
        return None
    worker.process.join(1.0)
    return Outcome("died", message=f"the party process exited unexpectedly (exit code {worker.process.exitcode})")


def _peer_message(name: str, ch, read_timeout: float):
    try:
        msg = protocol.recv(ch, read_timeout)
    except protocol.PeerClosed:
        return None, Outcome("peer_closed", peer=name, message=f"the {name} closed the connection")
    except protocol.ProtocolError as exc:
        return None, Outcome("peer_error", peer=name, message=str(exc))
    if msg["type"] == "done":
        return msg, None
    if msg["type"] == "error":
        after = msg.get("retry_after_s")
        after = float(after) if isinstance(after, (int, float)) and not isinstance(after, bool) and 0 <= after < 1e6 else None
        return msg, Outcome("peer_error", peer=name, message=protocol.one_line(str(msg.get("message"))),
                            retry_after=after)
    return msg, Outcome("peer_error", peer=name, message=f"unexpected {msg['type'][:40]!r} message from the {name}")


def wait_done(ch, timeout: float) -> bool:
    """Wait up to `timeout` s for a peer's {"type": "done"}; False on anything else."""
    try:
        return protocol.recv(ch, timeout)["type"] == "done"
    except protocol.ProtocolError:
        return False


# -- rendezvous ports ---------------------------------------------------------------------------

class PortPicker:
    """Fresh free TCP ports: free on all interfaces now and not handed out recently."""

    def __init__(self, history: int = 256):
        self._recent: deque[int] = deque(maxlen=history)
        self._lock = threading.Lock()

    def fresh(self, attempts: int = 50) -> int:
        with self._lock:
            for _ in range(attempts):
                port = _free_port()
                if port not in self._recent:
                    self._recent.append(port)
                    return port
        raise RuntimeError("no fresh free TCP port found")


def _free_port() -> int:
    """A port free on every interface, IPv6 included where the host has it (as c10d's store binds)."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", 0)
    except OSError:
        s, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("", 0)
    with s:
        s.bind(address)
        return s.getsockname()[1]


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
    """Accepts control connections on host:port; for each, in a thread: TLS (if configured), the
    token handshake, then `handler(channel)`.

    Connections above the limits are refused with a `busy` answer before anything is read; a peer
    that fails the handshake never reaches the handler. `stop` ends the loop (SIGTERM/SIGINT set
    it); workers registered with `track` are stopped on shutdown even if their session thread is stuck."""

    def __init__(self, name: str, host: str, port: int, security: "auth.Security | None" = None,
                 limits: Limits | None = None):
        self.name = name
        self.role = name.removeprefix("pi-")
        self.security = security or auth.Security(auth.Credentials(self.role, no_auth=True))
        self.limits = limits or Limits()
        self.stop = threading.Event()
        self._listener = _listen(host, port)
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._workers: set[Worker] = set()
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
            if self.security.server_tls is None:  # a TLS peer could not read a plain answer
                sock.settimeout(0.5)
                protocol.send_busy(sock, f"{self.name} is busy ({reason}): retry after "
                                         f"{self.limits.busy_retry_s:g} s", self.limits.busy_retry_s)
            _close(sock)
            return
        self.counters["accepted"] += 1
        thread = threading.Thread(target=self._run, args=(handler, sock, addr), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, handler, sock: socket.socket, addr) -> None:
        peer = protocol.format_address(addr[0], addr[1])
        conn, ch = (sock if self.security.server_tls is None else None), None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.security.server_tls is not None:
                conn = self._tls(sock)
                with self._lock:
                    self._socks.add(conn)
            ch = auth.respond(conn, self.security.creds, self.role, self.security.handshake_timeout, peer)
            handler(ch)
        except protocol.PeerClosed:
            pass
        except protocol.AuthError as exc:
            self.counters["refused_auth"] += 1
            self._log_refusal(f"refused {peer}: {exc}")
            if conn is not None:
                protocol.send_error(ch or conn, str(exc))
        except Exception as exc:  # a user error goes back to the peer; a bug must not stop the service
            self.counters["errors"] += 1
            retry_after = getattr(exc, "retry_after", None)
            if not protocol.is_user_error(exc):
                self.log(f"internal error: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                exc = f"internal {self.name} error ({type(exc).__name__}: {exc})"
            if conn is not None:
                protocol.send_error(ch or conn, str(exc), retry_after)
        finally:
            _close_gracefully(conn)
            _close(sock)
            with self._lock:
                self._socks.discard(sock)
                self._socks.discard(conn)
                self._open -= 1
                self._per_ip[addr[0]] -= 1
                if self._per_ip[addr[0]] <= 0:
                    del self._per_ip[addr[0]]
                self._threads.discard(threading.current_thread())

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

    def _tls(self, sock):
        try:
            sock.settimeout(self.security.handshake_timeout)
            return self.security.server_tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise protocol.AuthError(f"TLS handshake failed ({getattr(exc, 'reason', None) or exc})") from None

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
                s.shutdown(socket.SHUT_RDWR)  # wakes threads blocked on a read
            except OSError:
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


def _close_gracefully(sock, linger: float = 0.5) -> None:
    """Send FIN, then read what the peer still sends (briefly) before closing: closing a socket with
    unread input makes the kernel send RST, which can destroy our last (error) message in flight."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline, total = time.monotonic() + linger, 0
        while total < (1 << 20):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            total += len(chunk)
    except (OSError, ValueError):
        pass
    _close(sock)


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
