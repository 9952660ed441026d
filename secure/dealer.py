"""pi-dealer: the CrypTen trusted third party (rank 2) that hands out correlated randomness.

It listens on a control port; a server sends {"type": "join", "session_id", "host", "port",
"timeout_s"} per session and keeps that connection open for the session's lifetime. The dealer
runs its party in a fresh worker process, answers {"type": "joined"}, and {"type": "done"} or
{"type": "error"} when the party ends. A closed connection cancels the session. The dealer never
sees images, weights or results; its main process never imports torch.

    pi-dealer --host 127.0.0.1 --port 7001
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from . import protocol
from .session import Service, Worker, run_main, supervise


class Dealer:
    def __init__(self, service: Service, read_timeout: float, session_timeout: float, max_sessions: int):
        self.service = service
        self.read_timeout = read_timeout
        self.session_timeout = session_timeout
        self.slots = threading.BoundedSemaphore(max_sessions)

    def handle(self, sock) -> None:
        msg = protocol.recv(sock, self.read_timeout)
        if msg["type"] == "ping":
            protocol.send(sock, "pong", role="dealer")
        elif msg["type"] == "join":
            self.join(sock, msg)
        else:
            raise protocol.ProtocolError(f"the dealer does not answer {msg['type']!r} messages "
                                         "(a pi-client must talk to pi-server, not pi-dealer)")

    def join(self, sock, msg: dict) -> None:
        sid = protocol.field(msg, "session_id", str, lambda s: 0 < len(s) <= 64, "a session id")
        rdv = {"host": protocol.field(msg, "host", str, lambda s: 0 < len(s) <= 255, "a host name"),
               "port": protocol.field(msg, "port", int, lambda p: 0 < p < 65536, "a TCP port"),
               "timeout_s": float(protocol.field(msg, "timeout_s", (int, float), lambda t: 0 < t <= 3600,
                                                 "seconds in (0, 3600]"))}
        if not self.slots.acquire(blocking=False):
            raise protocol.ControlError("the dealer is busy (all its session slots are taken): try again later")
        worker = None
        try:
            worker = Worker(f"pi-dealer-{sid}")
            self.service.track(worker)
            worker.start_job("dealer", rdv=rdv)
            protocol.send(sock, "joined", session_id=sid)
            self.service.log(f"session {sid}: joined rendezvous {protocol.format_address(rdv['host'], rdv['port'])}")
            self.finish(sock, sid, worker)
        finally:
            if worker is not None:
                self.service.untrack(worker)
            self.slots.release()

    def finish(self, sock, sid: str, worker: Worker) -> None:
        outcome = supervise(worker, {"server": sock}, time.monotonic() + self.session_timeout,
                            self.service.stop, self.read_timeout)
        if outcome.kind == "ok":
            protocol.send(sock, "done", session_id=sid)
            self.service.log(f"session {sid}: done")
        else:
            self.service.log(f"session {sid}: ended ({outcome.kind}): {outcome.message}")
            protocol.send_error(sock, f"dealer: {outcome.message}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi-dealer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7001, help="control port (0 picks a free one; default 7001)")
    p.add_argument("--max-sessions", type=int, default=4, help="concurrent sessions (default 4)")
    p.add_argument("--session-timeout", type=float, default=900.0,
                   help="seconds a session may run before it is stopped (default 900)")
    p.add_argument("--read-timeout", type=float, default=protocol.DEFAULT_READ_TIMEOUT,
                   help="seconds to wait for a control message (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_sessions < 1 or args.session_timeout <= 0 or args.read_timeout <= 0:
        raise protocol.ControlError("--max-sessions, --session-timeout and --read-timeout must be positive")
    service = Service("pi-dealer", args.host, args.port)
    service.install_signal_handlers()
    service.announce()
    dealer = Dealer(service, args.read_timeout, args.session_timeout, args.max_sessions)
    service.serve(dealer.handle)
    service.log("stopped")
    return 0


def cli() -> int:
    return run_main(main)


if __name__ == "__main__":
    sys.exit(cli())
