"""A session's party links: each party dials the listening roles it must reach and takes over the
connections its own listener accepted for the session, then runs TLS on every link itself.

Who connects where (only the server's and the dealer's ports are ever listened on):

    client -> server port   client-server link
    client -> dealer port   client-dealer link  (the client's seed comes straight from the dealer it trusts)
    server -> dealer port   server-dealer link

A listening role (pi-server, pi-dealer) reads each connection's preface in its main process and
hands the raw socket to the worker of the session it names (`secure.control.service`); the worker
receives it here (`Meeting.handoff`) and runs the TLS handshake, so the session's keys exist only in
that worker. The preface is a routing hint: the peer must prove the role it claims with a trusted
certificate, and a connection for another session, a role not expected here or a role already
linked is closed without an answer. A connection that fails its handshake does not end the meeting:
the genuine peer may still come before the deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from secure.control.protocol import format_address
from secure.core.party import ROLES
from secure.transport import HandshakeError, TransportError
from secure.transport.credentials import PartyIdentity, client_context, server_context
from secure.transport.link import Link
from secure.transport.preface import PARTY, Preface, receive_connection

_MAX_STRAY = 32  # connections handed over that are not (or not yet) a peer of this meeting


@dataclass
class Meeting:
    """Where and how one party of one session meets its peers (a picklable job description)."""
    role: str
    session_id: bytes  # 16 bytes, chosen by the server
    identity: PartyIdentity
    dial: dict[str, tuple[str, int]] = field(default_factory=dict)  # peer role -> its listening address
    accept: tuple[str, ...] = ()  # peer roles whose connections this party's listener hands over
    timeout_s: float = 60.0
    handoff: socket.socket | None = field(default=None, repr=False, compare=False)  # set in the worker

    def __getstate__(self):
        return {**self.__dict__, "handoff": None}  # a socket travels to a process only as a Process argument

    @property
    def where(self) -> str:
        return f"the links of session {self.session_id.hex()[:12]}"

    def channel(self, rank: int, world: int):
        """The engine's channel over this party's links (what `Rendezvous.channel` is for gloo)."""
        from secure.core.channel import LinkChannel
        links = self.links()
        if len(links) + 1 != world:
            for link in links.values():
                link.close()
            raise TransportError(f"{self.role}: {len(links) + 1} parties linked, the engine expects {world}")
        return LinkChannel(rank, self.timeout_s, links={ROLES[peer]: link for peer, link in links.items()})

    def links(self) -> dict[str, Link]:
        """Every link of this party, established and authenticated, or HandshakeError (none left open)."""
        deadline = time.monotonic() + self.timeout_s
        own, trust = self.identity.credential(), self.identity.trust()
        done: dict[str, Link] = {}
        errors: dict[str, str] = {}
        cv = threading.Condition()

        def finish(peer: str, make) -> None:
            try:
                link = make()
            except (TransportError, OSError) as exc:
                with cv:
                    errors[peer] = str(exc)
                    cv.notify_all()
                return
            with cv:
                done[peer] = link
                errors.pop(peer, None)
                cv.notify_all()

        def dial(peer: str, address: tuple[str, int]) -> None:
            peers = trust.only(peer)
            name = f"{peer} at {format_address(*address)}"

            def make():
                sock = _connect(address, deadline, name)
                return Link.connect(sock, client_context(own, peers), peers, (peer,), _left(deadline),
                                    preface=Preface(PARTY, self.role, self.session_id), peer=name)
            finish(peer, make)

        threads = [threading.Thread(target=dial, args=item, daemon=True) for item in self.dial.items()]
        for t in threads:
            t.start()
        try:
            self._take_over(deadline, done, errors, cv, finish, own, trust)
            for t in threads:
                t.join(_left(deadline) + 1.0)
            missing = [peer for peer in (*self.dial, *self.accept) if peer not in done]
            if missing:
                reasons = "; ".join(errors.get(p) or f"no link with the {p} within {self.timeout_s:g} s" for p in missing)
                raise HandshakeError(f"{self.role}: {reasons}")
            return dict(done)
        except BaseException:
            with cv:
                for link in done.values():
                    link.close(timeout=0.2)
            raise

    def _take_over(self, deadline, done, errors, cv, finish, own, trust) -> None:
        """Receive the connections our listener hands over until every expected peer is linked."""
        wanted, trying, stray = set(self.accept), {}, 0
        while True:
            with cv:
                if wanted <= set(done):
                    return
            if not wanted or self.handoff is None or _left(deadline) <= 0 or stray > _MAX_STRAY:
                with cv:  # wait for handshakes in flight
                    cv.wait_for(lambda: not any(t.is_alive() for t in trying.values()), _left(deadline))
                return
            try:
                conn, got = receive_connection(self.handoff, min(0.2, _left(deadline)))
            except TransportError:
                continue  # nothing handed over yet
            with cv:
                busy = got.role in done or (got.role in trying and trying[got.role].is_alive())
            if got.session_id != self.session_id or got.role not in wanted or busy:
                stray += 1
                conn.close()
                continue
            peers = trust.only(got.role)
            name = f"{got.role} at {_peer_name(conn)}"
            thread = threading.Thread(target=finish, daemon=True, args=(got.role, lambda c=conn, g=got, p=peers, n=name:
                                      Link.accept(c, server_context(own, p), p, (g.role,), _left(deadline),
                                                  preface=g, peer=n)))
            trying[got.role] = thread
            thread.start()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _peer_name(conn: socket.socket) -> str:
    try:
        return format_address(*conn.getpeername()[:2])
    except OSError:
        return "a closed connection"


def _connect(address: tuple[str, int], deadline: float, name: str) -> socket.socket:
    """TCP connect, retrying refusals until the deadline (a listener may be restarting)."""
    while True:
        try:
            return socket.create_connection(address, timeout=max(0.05, _left(deadline)))
        except OSError as exc:
            if _left(deadline) <= 0.25:
                raise HandshakeError(f"cannot reach the {name} ({exc.strerror or exc})") from None
            time.sleep(0.25)
