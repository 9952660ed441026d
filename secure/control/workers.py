"""Per-session party processes: one `Worker` process per party of every session, and its supervision.

CrypTen keeps global state and gloo's process group is per process, so a process runs exactly one
party once. Workers are forked from a fork server that imported torch, the runtime and CrypTen once
(`secure.control.warm`), so a party starts in milliseconds; set DEEPREDUCE_WORKER_START=spawn for a
fresh interpreter per party instead. Each worker reseeds every random generator from os.urandom, so no
two parties share a state inherited from the fork server. The parent hands a worker one `PartyJob`
over a Pipe and gets one reply. A worker dies with its owner (it watches the pipe for the owner's end
closing; PR_SET_PDEATHSIG covers its direct parent), ignores Ctrl-C (its parent handles that) and is
reaped when its session ends. A role's temporary files (the fork server's socket) live in a private
directory that is removed at exit; one left by a killed role is removed by the next role that starts.

Torch-free at import: the role processes print `listening on` before anything heavy loads.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from secure.control import protocol
from secure.core.party import DealerLimits, Rendezvous
from secure.transport.preface import send_connection

if TYPE_CHECKING:
    from secure.core.plan import SecurePlan
    from secure.transport.meeting import Meeting

_WARM_MODULE = "secure.control.warm"  # a module name: multiprocessing's preload takes names
_POLL_S = 0.2
START_ENV = "DEEPREDUCE_WORKER_START"
_context_lock = threading.Lock()
_context = None


@dataclass
class PartyJob:
    """What a worker runs: one role of one session. The server gives `plan` and `batch_sizes`, the
    client `public` and its `batches` (one normalised tensor per query), the dealer neither."""
    role: str  # "server" | "client" | "dealer"
    rdv: "Rendezvous | Meeting"  # gloo rendezvous (crypten engine) or TLS links (fast engine)
    insecure_tfp: bool = False
    engine: str = "fast"
    plan: "SecurePlan | None" = None
    batch_sizes: list[int] = field(default_factory=list)
    public: dict | None = None
    batches: list[Any] = field(default_factory=list)
    limits: DealerLimits | None = None  # the dealer's caps on a session
    relu_protocol: str = "gmw"  # the fast engine's ReLU protocol (server and client: the same, never "auto")
    # A warm session (`secure.core.stream.StreamSettings`): queries as they come instead of `batches`. The
    # client's worker then takes ("query", images) and ("status",) messages over its pipe and answers each
    # (`WarmChannel`); ("end",) ends the session.
    stream: Any = None


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
        # Connections the role's listener accepted for this worker's session come over this socket
        # (secure.transport.preface.send_connection): the worker ends TLS itself.
        self.handoff, child_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = ctx.Process(target=_worker_main, args=(child, os.getpid(), child_handoff), name=name,
                                   daemon=False)
        self.process.start()
        self.pid = self.process.pid
        child.close()
        child_handoff.close()
        self._lock = threading.Lock()
        self._stopped = False

    def hand_over(self, conn: socket.socket, preface) -> None:
        """Give the worker an accepted connection of its session (this process's copy is closed)."""
        with self._lock:
            if self._stopped:
                conn.close()
                return
            try:
                send_connection(self.handoff, conn, preface)
            except OSError:
                pass  # the worker is gone: its session ends anyway

    def start_job(self, job: PartyJob) -> None:
        try:
            self.conn.send_bytes(pickle.dumps(job))
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
            self.handoff.close()
            self.process.close()


def _worker_main(conn, owner_pid: int, handoff: socket.socket | None = None) -> None:
    _die_with_parent(owner_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _reseed()
    try:
        from secure.control.warm import FAILURE as failure
    except Exception as exc:  # reported when the job arrives
        failure = f"cannot load the secure runtime ({type(exc).__name__}: {exc})"
    try:
        job = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return  # the parent gave up before the job
    talks = job.stream is not None and job.role == "client"  # the owner keeps sending (queries)
    if not talks:
        threading.Thread(target=_watch_owner, args=(conn,), daemon=True).start()
    try:
        if failure:
            raise RuntimeError(failure)
        reply = ("ok", _run_warm(job, handoff, conn) if job.stream is not None else _run_party(job, handoff))
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


def _run_party(job: PartyJob, handoff: socket.socket | None) -> dict:
    from secure.core import runtime  # loaded by the fork server already (secure.control.warm)
    if isinstance(job.rdv, Rendezvous):  # gloo (the crypten engine)
        _pin_interface(job.rdv.host, job.rdv.port)
    else:  # a Meeting: TLS links, some of them handed over by the role's listener
        job.rdv.handoff = handoff
    if job.role == "dealer":
        return {"role": job.role, **(runtime.run_dealer(job.rdv, job.engine, job.limits) or {})}
    if job.role == "server":
        result = runtime.run_server(job.plan, job.rdv, job.batch_sizes, job.insecure_tfp, job.engine,
                                    job.relu_protocol)
    else:
        result = runtime.run_client(job.public, job.batches, job.rdv, job.insecure_tfp, job.engine,
                                    job.relu_protocol)
    return result.to_dict()


def _run_warm(job: PartyJob, handoff: socket.socket | None, conn) -> dict:
    """A warm session's party (server or client): the client reads its queries from the owner's pipe and
    answers each there; the owner's end of the pipe closing ends the process (the owner is gone)."""
    from secure.core import runtime
    job.rdv.handoff = handoff
    if job.role == "server":
        return runtime.run_warm("server", job.rdv, job.plan.public_info(), job.stream, job.relu_protocol,
                                plan=job.plan).to_dict()
    pools = []

    def next_images():
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                os._exit(1)
            if message[0] == "query":
                return message[1]
            if message[0] == "status":  # the pool's state, for a caller that waits until it is warm
                conn.send_bytes(pickle.dumps(("status", pools[0].status() if pools else {})))
                continue
            return None

    def answer(item) -> None:
        conn.send_bytes(pickle.dumps(("answer", {**item.to_dict(), "logits": item.logits.double().tolist()})))

    summary = runtime.run_warm("client", job.rdv, job.public, job.stream, job.relu_protocol, next_images=next_images,
                               answer=answer, pools=pools)
    return summary.to_dict()


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
    done_messages: dict = field(default_factory=dict)  # peer -> its {"type": "done", ...} message
    retry_after: float | None = None  # a peer's error said that trying again later may work


def supervise(worker: Worker, peers: dict, deadline: float, stop: threading.Event | None = None,
              read_timeout: float = protocol.DEFAULT_READ_TIMEOUT) -> Outcome:
    """Wait until the worker reports, a peer reports an error or hangs up, `stop` is set or time is up.

    `peers` maps a name to its ControlChannel. A peer's {"type": "done"} is remembered and that peer is no
    longer watched."""
    watching, done, done_messages = dict(peers), set(), {}
    while True:
        if stop is not None and stop.is_set():
            return Outcome("stopped", message="shutting down", done_peers=done)
        try:
            outcome = _worker_outcome(worker)
            if outcome:
                outcome.done_peers, outcome.done_messages = done, done_messages
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
                done_messages[name] = msg
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


def peer_reason(outcome: Outcome, name: str, ch, grace_s: float = 3.0) -> Outcome:
    """When this party failed because a peer ended its link (the dealer refused the session, another
    party failed), that peer's error on its control connection names the cause: prefer it, waiting up
    to `grace_s` for it."""
    if outcome.kind not in ("failed", "died") or ch is None:
        return outcome
    msg, theirs = _peer_message(name, ch, grace_s)
    return theirs if theirs is not None and theirs.kind == "peer_error" and msg is not None else outcome


def wait_done(ch, timeout: float) -> bool:
    """Wait up to `timeout` s for a peer's {"type": "done"}; False on anything else."""
    return recv_done(ch, timeout) is not None


def recv_done(ch, timeout: float) -> dict | None:
    """A peer's {"type": "done", ...} message within `timeout` s; None on anything else."""
    try:
        msg = protocol.recv(ch, timeout)
    except protocol.ProtocolError:
        return None
    return msg if msg["type"] == "done" else None
