"""pi-server: holds the secure plan (the weights) and runs the server party (rank 0) of each session.

    pi-server --plan MODEL.plan --host 127.0.0.1 --port 7000 --dealer 127.0.0.1:7001
    pi-server --plan MODEL.plan --insecure-tfp        # INSECURE benchmark mode: no dealer

Per session the server picks a fresh free rendezvous port, asks the dealer to join (a control
connection that lives as long as the session), runs its party in a fresh worker process and tells
the client where to meet: the address of the interface the client connected to. The server keeps
serving whatever happens to a session; workers are reaped and ports freed when it ends.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from secure import protocol
from secure.session import PortPicker, Service, Worker, run_main, supervise, wait_done

INSECURE_WARNING = ("INSECURE: --insecure-tfp runs CrypTen's trusted-first-party mode without a dealer; "
                    "the server party generates all correlated randomness and could learn the client's "
                    "inputs. For benchmarking only.")


@dataclass
class Settings:
    dealer: tuple[str, int] | None
    insecure_tfp: bool
    max_batch: int
    max_sessions: int
    read_timeout: float
    rendezvous_timeout: float
    session_timeout: float
    dealer_timeout: float
    queue_timeout: float


class PiServer:
    def __init__(self, service: Service, plan, settings: Settings):
        self.service, self.plan, self.s = service, plan, settings
        self.public = plan.public_info()
        self.slots = threading.BoundedSemaphore(settings.max_sessions)
        self.ports = PortPicker()

    # -- requests -----------------------------------------------------------------------------
    def handle(self, sock) -> None:
        msg = protocol.recv(sock, self.s.read_timeout)
        kind = msg["type"]
        if kind == "ping":
            protocol.send(sock, "pong", role="server")
        elif kind == "info":
            protocol.send(sock, "info", plan=self.public, insecure_tfp=self.s.insecure_tfp,
                          max_batch=self.s.max_batch)
        elif kind == "session":
            self.session(sock, msg)
        else:
            raise protocol.ProtocolError(f"the server does not answer {kind!r} messages")

    def session(self, sock, msg: dict) -> None:
        n = protocol.field(msg, "batch_size", int, lambda b: 1 <= b <= self.s.max_batch,
                           f"an image count in 1..{self.s.max_batch} (the server's --max-batch)")
        wanted = msg.get("plan_hash")
        if wanted is not None and wanted != self.plan.plan_hash:
            raise protocol.ControlError(f"the server now serves plan {self.plan.plan_hash[:12]}, not {str(wanted)[:12]} "
                                     "from the client's info request: run the client again")
        self._acquire_slot(sock)
        try:
            self._run(sock, n)
        finally:
            self.slots.release()

    def _acquire_slot(self, sock) -> None:
        deadline = time.monotonic() + self.s.queue_timeout
        while not self.slots.acquire(timeout=0.2):
            if self.service.stop.is_set():
                raise protocol.ControlError("the server is shutting down")
            if _hung_up(sock):
                raise protocol.PeerClosed("the client left while waiting for a session slot")
            if time.monotonic() > deadline:
                raise protocol.ControlError(f"the server is busy ({self.s.max_sessions} session(s) running) "
                                         "for longer than its --queue-timeout: try again later")

    # -- one session -----------------------------------------------------------------------------
    def _run(self, sock, n: int) -> None:
        sid, port, host = uuid.uuid4().hex[:12], self.ports.fresh(), sock.getsockname()[0]
        started = time.monotonic()
        dealer = None if self.s.insecure_tfp else self._join_dealer(sid, port)
        worker = None
        try:
            worker = Worker(f"pi-server-{sid}")
            self.service.track(worker)
            worker.start_job("server", plan=self.plan, batch_size=n, insecure_tfp=self.s.insecure_tfp,
                             rdv={"host": host, "port": port, "timeout_s": self.s.rendezvous_timeout})
            protocol.send(sock, "session", session_id=sid, host=host, port=port, timeout_s=self.s.rendezvous_timeout,
                          insecure_tfp=self.s.insecure_tfp, plan_hash=self.plan.plan_hash)
            self.service.log(f"session {sid}: {n} image(s), rendezvous {protocol.format_address(host, port)}"
                             + (" (INSECURE TFP)" if self.s.insecure_tfp else ""))
            peers = {"client": sock} if dealer is None else {"client": sock, "dealer": dealer}
            outcome = supervise(worker, peers, started + self.s.session_timeout, self.service.stop,
                                self.s.read_timeout)
            self._conclude(sock, dealer, sid, outcome, time.monotonic() - started)
        finally:
            if worker is not None:
                self.service.untrack(worker)
            if dealer is not None:
                dealer.close()

    def _join_dealer(self, sid: str, port: int) -> socket.socket:
        host, dport = self.s.dealer
        dealer = protocol.connect(host, dport, self.s.dealer_timeout, "dealer")
        try:
            # The dealer reaches the rendezvous store at this server's address on the dealer's network.
            protocol.send(dealer, "join", session_id=sid, host=dealer.getsockname()[0], port=port,
                          timeout_s=self.s.rendezvous_timeout)
            protocol.expect(protocol.recv(dealer, self.s.dealer_timeout), "joined")
        except protocol.RemoteError as exc:
            dealer.close()
            raise protocol.ControlError(f"the dealer refused the session: {exc}") from None
        except protocol.ProtocolError as exc:
            dealer.close()
            raise protocol.ControlError(f"the dealer at {protocol.format_address(host, dport)} did not join: {exc}") from None
        return dealer

    def _conclude(self, sock, dealer, sid: str, outcome, elapsed: float) -> None:
        if outcome.kind == "ok":
            if dealer is not None and "dealer" not in outcome.done_peers:
                wait_done(dealer, self.s.read_timeout)  # let the dealer's party end on its own
            protocol.send(sock, "done", session_id=sid, elapsed_s=round(elapsed, 3))
            self.service.log(f"session {sid}: done in {elapsed:.1f} s")
            return
        message = _describe(outcome)
        self.service.log(f"session {sid}: ended ({outcome.kind}) after {elapsed:.1f} s: {message}")
        if outcome.peer != "client":
            protocol.send_error(sock, message)


def _describe(outcome) -> str:
    if outcome.kind == "failed":
        return f"the server party failed: {outcome.message}"
    if outcome.kind == "died":
        return f"the server party process died: {outcome.message}"
    if outcome.kind == "stopped":
        return "the server is shutting down"
    if outcome.kind == "timeout":
        return "the session ran past the server's --session-timeout"
    if outcome.peer == "dealer":
        return ("the dealer closed the session connection (did it stop?)" if outcome.kind == "peer_closed"
                else outcome.message)
    return outcome.message


def _hung_up(sock) -> bool:
    """True if the peer closed (or sent something) while we were not reading."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


# -- startup ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi-server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="the secure plan (MODEL.plan from `deepreduce export`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7000, help="control port (0 picks a free one; default 7000)")
    p.add_argument("--dealer", help="the pi-dealer's control address HOST:PORT")
    p.add_argument("--insecure-tfp", action="store_true",
                   help="INSECURE benchmark mode: no dealer, the server party makes the randomness")
    p.add_argument("--max-batch", type=int, default=64, help="most images in one session (default 64)")
    p.add_argument("--max-sessions", type=int, default=1, help="concurrent sessions (default 1; others queue)")
    p.add_argument("--queue-timeout", type=float, default=300.0,
                   help="seconds a session request waits for a free slot (default 300)")
    p.add_argument("--session-timeout", type=float, default=900.0,
                   help="seconds a session may run before it is stopped (default 900)")
    p.add_argument("--rendezvous-timeout", type=float, default=60.0,
                   help="seconds the parties wait for each other at the rendezvous (default 60)")
    p.add_argument("--dealer-timeout", type=float, default=30.0,
                   help="seconds to wait for the dealer, at startup and per session (default 30)")
    p.add_argument("--read-timeout", type=float, default=protocol.DEFAULT_READ_TIMEOUT,
                   help="seconds to wait for a control message (default 30)")
    return p


def _settings(args) -> Settings:
    if args.insecure_tfp and args.dealer:
        raise protocol.ControlError("--insecure-tfp runs without a dealer: drop --dealer (or drop --insecure-tfp)")
    if not args.insecure_tfp and not args.dealer:
        raise protocol.ControlError("pass --dealer HOST:PORT (the pi-dealer's control address), or --insecure-tfp "
                                 "for an INSECURE benchmark without a dealer")
    numbers = (args.max_batch, args.max_sessions, args.queue_timeout, args.session_timeout,
               args.rendezvous_timeout, args.dealer_timeout, args.read_timeout)
    if min(numbers) <= 0:
        raise protocol.ControlError("--max-batch, --max-sessions and every --*-timeout must be positive")
    return Settings(dealer=protocol.parse_address(args.dealer, "--dealer") if args.dealer else None,
                    insecure_tfp=args.insecure_tfp, max_batch=args.max_batch, max_sessions=args.max_sessions,
                    read_timeout=args.read_timeout, rendezvous_timeout=args.rendezvous_timeout,
                    session_timeout=args.session_timeout, dealer_timeout=args.dealer_timeout,
                    queue_timeout=args.queue_timeout)


def _check_dealer(settings: Settings) -> None:
    host, port = settings.dealer
    reply = protocol.request(host, port, {"type": "ping"}, settings.dealer_timeout, settings.read_timeout,
                             "dealer", "pong")
    if reply.get("role") != "dealer":
        raise protocol.ControlError(f"--dealer {protocol.format_address(host, port)} is a pi-{reply.get('role')}, "
                                 "not a pi-dealer")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    if not os.path.isfile(args.plan):
        raise protocol.ControlError(f"plan {args.plan} does not exist: pass the MODEL.plan written by `deepreduce export`")
    service = Service("pi-server", args.host, args.port)
    service.install_signal_handlers()
    service.announce()  # before the slow imports: clients queue in the listen backlog meanwhile
    from secure.plan import SecurePlan  # imports torch
    plan = SecurePlan.load(args.plan)
    if settings.insecure_tfp:
        print(f"WARNING: {INSECURE_WARNING}", file=sys.stderr, flush=True)
    if settings.dealer and not service.stop.is_set():
        _check_dealer(settings)
    service.log(f"serving plan {plan.plan_hash[:12]}: input {'x'.join(map(str, plan.input_shape))}, "
                f"{len(plan.classes)} classes, {plan.relu_count:,} ReLUs per image"
                + (" (INSECURE TFP mode)" if settings.insecure_tfp else ""))
    server = PiServer(service, plan, settings)
    service.serve(server.handle)
    service.log("stopped")
    return 0


def cli() -> int:
    return run_main(main)
