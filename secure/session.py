"""Per-session worker processes and the control-port service loop shared by server and dealer.

Every party of every session runs in its own `Worker`: a fresh process from a 'spawn' context
(CrypTen keeps global state, so a process runs exactly one party once). The parent talks to it
over a Pipe carrying plain pickles (no Queue feeder threads, no torch shared-memory tensors).
A worker dies with its parent (PR_SET_PDEATHSIG), ignores Ctrl-C (its parent handles that) and
is reaped when its session ends. The only other child is multiprocessing's resource tracker,
started with the first spawn, one per parent process; it exits with its parent.
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from . import protocol

_RUNTIME_MODULE = "secure.runtime"
_POLL_S = 0.2


# -- worker processes ---------------------------------------------------------------------------

class Worker:
    """One spawned process that imports the runtime, then runs one party when given a job."""

    def __init__(self, name: str):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, os.getpid()), name=name)
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


def _worker_main(conn, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch
        torch.set_num_threads(1)
        runtime, failure = importlib.import_module(_RUNTIME_MODULE), None
        importlib.import_module("secure.crypten_compat").crypten_module()  # warm up before the job
    except Exception as exc:  # reported when the job arrives
        runtime, failure = None, f"cannot load the secure runtime ({type(exc).__name__}: {exc})"
    try:
        role, kwargs = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return  # the parent gave up before the job
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


def _run_party(runtime, role: str, kwargs: dict) -> dict:
    rdv = runtime.Rendezvous(**kwargs.pop("rdv"))
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


def _describe(exc: BaseException) -> str:
    text = str(exc) if protocol.is_user_error(exc) else f"{type(exc).__name__}: {exc}"
    return protocol.one_line(text)


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


# -- supervising a running party ------------------------------------------------------------------

@dataclass
class Outcome:
    kind: str  # "ok" | "failed" | "died" | "peer_error" | "peer_closed" | "stopped" | "timeout"
    result: dict | None = None
    message: str = ""
    peer: str = ""
    done_peers: set = field(default_factory=set)


def supervise(worker: Worker, peers: dict, deadline: float, stop: threading.Event | None = None,
              read_timeout: float = protocol.DEFAULT_READ_TIMEOUT) -> Outcome:
    """Wait until the worker reports, a peer reports an error or hangs up, `stop` is set or time is up.

    A peer's {"type": "done"} is remembered and that peer is no longer watched."""
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
            ready = multiprocessing.connection.wait([worker.conn, worker.process.sentinel, *watching.values()],
                                                    timeout=min(_POLL_S, remaining))
        except (ValueError, OSError):
            if worker.stopped:  # stopped from another thread (shutdown)
                return Outcome("stopped", message="shutting down", done_peers=done)
            raise
        for name, sock in list(watching.items()):
            if sock in ready:
                msg, outcome = _peer_message(name, sock, read_timeout)
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


def _peer_message(name: str, sock, read_timeout: float):
    try:
        msg = protocol.recv(sock, read_timeout)
    except protocol.PeerClosed:
        return None, Outcome("peer_closed", peer=name, message=f"the {name} closed the connection")
    except protocol.ProtocolError as exc:
        return None, Outcome("peer_error", peer=name, message=str(exc))
    if msg["type"] == "done":
        return msg, None
    if msg["type"] == "error":
        return msg, Outcome("peer_error", peer=name, message=protocol.one_line(str(msg.get("message"))))
    return msg, Outcome("peer_error", peer=name, message=f"unexpected {msg['type']!r} message from the {name}")


def wait_done(sock, timeout: float) -> bool:
    """Wait up to `timeout` s for a peer's {"type": "done"}; False on anything else."""
    try:
        return protocol.recv(sock, timeout)["type"] == "done"
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

class Service:
    """Accepts control connections on host:port and runs `handler(sock)` for each in a thread.

    `stop` ends the loop (SIGTERM/SIGINT set it); workers registered with `track` are stopped on
    shutdown even if their session thread is stuck."""

    def __init__(self, name: str, host: str, port: int, max_connections: int = 32):
        self.name = name
        self.stop = threading.Event()
        self._listener = _listen(host, port)
        self.host, self.port = self._listener.getsockname()[:2]
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._workers: set[Worker] = set()

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
                    sock, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self.stop.is_set():
                        break
                    raise
                self._start(handler, sock)
        finally:
            self.shutdown()

    def _start(self, handler, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self._slots.acquire(blocking=False):
            protocol.send_error(sock, f"{self.name} is busy (too many connections): try again later")
            sock.close()
            return
        thread = threading.Thread(target=self._run, args=(handler, sock), daemon=True)
        with self._lock:
            self._threads.add(thread)
            self._socks.add(sock)
        thread.start()

    def _run(self, handler, sock: socket.socket) -> None:
        try:
            handler(sock)
        except protocol.PeerClosed:
            pass
        except Exception as exc:  # a user error goes back to the peer; a bug must not stop the service
            if not protocol.is_user_error(exc):
                self.log(f"internal error: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                exc = f"internal {self.name} error ({type(exc).__name__}: {exc})"
            protocol.send_error(sock, str(exc))
        finally:
            sock.close()
            with self._lock:
                self._socks.discard(sock)
                self._threads.discard(threading.current_thread())
            self._slots.release()

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
    sock.listen(64)
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
