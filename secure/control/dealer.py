"""pi-dealer: the dealer (rank 2) that hands out correlated randomness: the seeds and correlations of this
project's dealer-assisted engine (`secure.core.engine`; the roles run only that engine today).

It listens on one port. Control connections are accepted from servers only, each proving its role
with a certificate the dealer trusts (secure.control.auth). A server sends {"type": "join",
"session_id", "timeout_s", "engine"} per session and keeps that connection open for the session's
lifetime. The dealer runs its party in a fresh worker process, routes the session's party connections
(from the server and from the client, to this same port) to it, answers {"type": "joined",
"session_id", "dealer_id"}, and {"type": "done"} or {"type": "error"} when the party ends. The client
connects to the dealer itself and authenticates it: its seed comes straight from here. A closed
connection cancels the session. The dealer never sees images, weights or results; its main process
never imports torch.

    DEEPREDUCE_TOKEN=... pi-dealer --host 127.0.0.1 --port 7001            # single-operator trust
    pi-dealer --key dealer.key --cert dealer.crt --trust-server server.crt --trust-client client.crt
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from secure.control import auth, protocol
from secure.control.service import Service, add_limit_arguments, limits_from_args, run_main
from secure.control.workers import PartyJob, Worker, private_tempdir, start_fork_server, supervise
from secure.core.party import DEFAULT_ENGINE, ENGINES, DealerLimits, Rendezvous
from secure.transport.meeting import Meeting


class Dealer:
    def __init__(self, service: Service, read_timeout: float, session_timeout: float, max_sessions: int,
                 engine: str = DEFAULT_ENGINE, limits: DealerLimits | None = None):
        self.service, self.engine = service, engine
        self.limits = limits or DealerLimits()
        self.read_timeout = read_timeout
        self.session_timeout = session_timeout
        self.slots = threading.BoundedSemaphore(max_sessions)
        self.dealer_id = service.security.identity

    def handle(self, ch) -> None:
        msg = ch.recv(self.read_timeout)
        if msg["type"] == "ping":
            ch.send("pong", role="dealer", dealer_id=self.dealer_id, engine=self.engine)
        elif msg["type"] == "join":
            if ch.peer_role != "server":
                raise protocol.ControlError(f"only a pi-server may ask the dealer to join a session, not a {ch.peer_role}")
            self.join(ch, msg)
        else:
            raise protocol.ProtocolError(f"the dealer does not answer {msg['type'][:40]!r} messages "
                                         "(a pi-client must talk to pi-server, not pi-dealer)")

    def join(self, ch, msg: dict) -> None:
        sid = protocol.field(msg, "session_id", str, lambda s: protocol.is_hex(s, 32), "32 lowercase hex digits")
        timeout_s = float(protocol.field(msg, "timeout_s", (int, float), lambda t: 0 < t <= 3600, "seconds in (0, 3600]"))
        engine = protocol.field(msg, "engine", str, lambda e: 0 < len(e) <= 32, "an engine name") \
            if "engine" in msg else DEFAULT_ENGINE
        if engine != self.engine:
            raise protocol.ControlError(f"this dealer serves the {self.engine} engine, not {engine[:32]!r}: start both "
                                        "with the same --engine")
        if engine == "fast":  # TLS links: the server and the client connect to this dealer's port
            rdv = Meeting("dealer", bytes.fromhex(sid), self.service.security.party, accept=("server", "client"),
                          timeout_s=timeout_s)
        else:  # crypten: gloo at the server's rendezvous
            rdv = Rendezvous(protocol.field(msg, "host", str, lambda s: 0 < len(s) <= 255, "a host name"),
                             protocol.field(msg, "port", int, lambda p: 0 < p < 65536, "a TCP port"), timeout_s)
        if not self.slots.acquire(blocking=False):
            protocol.send_busy(ch, "the dealer is busy (all its session slots are taken): try again later", 5.0)
            return
        worker = None
        try:
            worker = Worker(f"pi-dealer-{sid[:12]}")
            self.service.track(worker)
            if engine == "fast":
                self.service.route(rdv.session_id, worker)
            worker.start_job(PartyJob("dealer", rdv, engine=self.engine, limits=self.limits))
            ch.send("joined", session_id=sid, dealer_id=self.dealer_id)
            self.service.log(f"session {sid[:12]}: joined"
                             + (f" rendezvous {protocol.format_address(rdv.host, rdv.port)}"
                                if isinstance(rdv, Rendezvous) else ""))
            self.finish(ch, sid, worker)
        finally:
            self.service.unroute(bytes.fromhex(sid))
            if worker is not None:
                self.service.untrack(worker)
            self.slots.release()

    def finish(self, ch, sid: str, worker: Worker) -> None:
        outcome = supervise(worker, {"server": ch}, time.monotonic() + self.session_timeout,
                            self.service.stop, self.read_timeout)
        if outcome.kind == "ok":
            made = outcome.result or {}
            rate = made.get("refill_queries_per_s")  # a warm session: queries made as the server asked
            ch.send("done", session_id=sid, **({"queries": made.get("queries"), "refill_queries_per_s": rate}
                                               if rate else {}))
            self.service.log(f"session {sid[:12]}: done" + (
                f": {made['queries']} queries preprocessed, {made.get('bytes_sent', 0) / 1e6:,.1f} MB sent, "
                f"refill rate {rate:,.1f} queries/s of dealer compute" if rate else ""))
        else:
            self.service.log(f"session {sid[:12]}: ended ({outcome.kind}): {outcome.message}")
            protocol.send_error(ch, f"dealer: {outcome.message}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi-dealer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # `--token` must not pass for --token-file
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7001, help="control port (0 picks a free one; default 7001)")
    p.add_argument("--max-sessions", type=int, default=4, help="concurrent sessions (default 4)")
    p.add_argument("--session-timeout", type=float, default=900.0,
                   help="seconds a session may run before it is stopped (default 900)")
    p.add_argument("--read-timeout", type=float, default=protocol.DEFAULT_READ_TIMEOUT,
                   help="seconds to wait for a control message (default 30)")
    d = DealerLimits()
    g = p.add_argument_group("what one session may ask of the dealer (it precomputes a session in memory)")
    g.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"images in all of a session's queries (default {d.max_images})")
    g.add_argument("--max-queries", type=int, default=d.max_queries, help=f"queries a session (default {d.max_queries})")
    g.add_argument("--max-session-mb", type=float, default=d.max_session_bytes / 1e6,
                   help=f"correlations held for one session, MB (default {d.max_session_bytes / 1e6:g})")
    g.add_argument("--max-description-kb", type=float, default=d.max_description_bytes / 1e3,
                   help=f"the server's session description, kB (default {d.max_description_bytes / 1e3:g})")
    p.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                   help="the engine whose randomness this dealer serves: fast (default) or crypten (CrypTen's TTP, "
                        "over gloo, unencrypted: opt-in, for comparisons on a trusted network)")
    auth.add_arguments(p, listener=True, connector=False, default_id="dealer")
    add_limit_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_sessions < 1 or args.session_timeout <= 0 or args.read_timeout <= 0:
        raise protocol.ControlError("--max-sessions, --session-timeout and --read-timeout must be positive")
    if min(args.max_images, args.max_queries) < 1 or min(args.max_session_mb, args.max_description_kb) <= 0:
        raise protocol.ControlError("--max-images, --max-queries, --max-session-mb and --max-description-kb must be "
                                    "positive")
    limits_per_session = DealerLimits(max_description_bytes=int(args.max_description_kb * 1e3),
                                      max_images=args.max_images, max_queries=args.max_queries,
                                      max_session_bytes=int(args.max_session_mb * 1e6))
    security = auth.security_from_args(args, listen_host=args.host, role="dealer")
    limits = limits_from_args(args)
    private_tempdir("pi-dealer")
    service = Service("pi-dealer", args.host, args.port, security, limits)
    service.install_signal_handlers()
    service.announce()
    start_fork_server()
    dealer = Dealer(service, args.read_timeout, args.session_timeout, args.max_sessions, args.engine,
                    limits_per_session)
    service.log(f"dealer {dealer.dealer_id!r}: TLS 1.3, {security.party.trust_mode}"
                + (", crypten engine (CrypTen's TTP over gloo, unencrypted)" if args.engine == "crypten" else ""))
    service.serve(dealer.handle)
    service.log("stopped")
    return 0


def cli() -> int:
    return run_main(main)


if __name__ == "__main__":
    sys.exit(cli())
