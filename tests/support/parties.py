"""The fast engine's three parties as threads of the test process, over `InProcessHub` channels:
`run_party` / `serve_dealer` called directly, no processes, no sockets."""

from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import dataclass

import torch

from secure.core.channel import InProcessChannel, InProcessHub, LinkChannel
from secure.core.engine import EngineConfig, run_party, serve_dealer, session_timeout
from secure.core.party import Role
from secure.core.plan import PublicPlan
from secure.transport.credentials import RoleCredential, Trust, client_context, new_secret, server_context
from secure.transport.link import Link
from secure.transport.preface import PARTY, Preface, read_preface

# A party waits at most `session_timeout` for any one message; once one party fails, the others give
# up in turn (server, client, dealer): three such waits at most.
JOIN_WAITS = 3


class _CountingQueue(queue.Queue):
    """Tallies the bytes it hands to the receiver: what the hub delivered, counted apart from `Channel`."""

    def __init__(self):
        super().__init__()
        self.delivered = 0

    def _get(self):  # called with the queue's lock held
        buf = super()._get()
        self.delivered += buf.numel()
        return buf


class CountingHub(InProcessHub):
    def __init__(self, ranks=(0, 1, 2)):
        super().__init__(ranks)
        self._queues = {pair: _CountingQueue() for pair in self._queues}

    def delivered(self, src: int, dst: int) -> int:
        return self._queues[(src, dst)].delivered


@dataclass
class Session:
    hub: CountingHub
    channels: dict[Role, InProcessChannel]
    results: dict[Role, object]  # run_party's (logits, profile); serve_dealer's dict
    errors: dict[Role, BaseException]

    def ok(self) -> "Session":
        """This session, once every party finished without an exception."""
        assert not self.errors, {role.label: repr(exc) for role, exc in self.errors.items()}
        return self


def run_session(plan, images: list[torch.Tensor], timeout_s: float = 10.0, client_public: PublicPlan | None = None,
                client_batches: list[int] | None = None, config: EngineConfig | None = None,
                channels: dict | None = None, dealer_limits=None) -> Session:
    """One session of len(images) queries: server with `plan`, client with `images` (and the public
    plan, or `client_public`, and batch sizes, or `client_batches`), dealer. Every party runs to its
    end or its exception; a party still running after the bound derived from `timeout_s` fails the test."""
    config = config or EngineConfig(server_threads=1)  # torch's thread count is per process, not per thread
    batches = [len(x) for x in images]
    hub = CountingHub()
    channels = channels or {role: hub.channel(role, timeout_s) for role in Role}
    jobs = {
        Role.SERVER: lambda ch: run_party(Role.SERVER, ch, plan.public_info(), batches, config, False, plan=plan),
        Role.CLIENT: lambda ch: run_party(Role.CLIENT, ch, client_public or plan.public_info(),
                                          client_batches or batches, config, False, images=images),
        Role.DEALER: lambda ch: serve_dealer(ch, dealer_limits),
    }
    results, errors = {}, {}

    def run(role):
        try:
            results[role] = jobs[role](channels[role])
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors[role] = exc

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each party process does (`secure.core.engine._run`)
    workers = {role: threading.Thread(target=run, args=(role,), name=f"party-{role.label}", daemon=True)
               for role in Role}
    for t in workers.values():
        t.start()
    bound = JOIN_WAITS * session_timeout(timeout_s, len(batches))
    end = time.monotonic() + bound
    for t in workers.values():
        t.join(max(0.0, end - time.monotonic()))
    torch.set_num_threads(threads)
    hung = [role.label for role, t in workers.items() if t.is_alive()]
    assert not hung, f"parties {hung} still running {bound:g} s after the start"
    return Session(hub, channels, results, errors)


def tls_channels(timeout_s: float = 10.0) -> dict[Role, LinkChannel]:
    """The three parties' channels over real TLS 1.3 links on 127.0.0.1, as the roles will connect them:
    the client connects to the server's and the dealer's listening sockets, the server to the dealer's
    (single-operator credentials derived from a fresh secret; each end checks the other's role)."""
    secret = new_secret()
    trust = Trust.single_operator(secret)
    own = {role: RoleCredential.derive(secret, role.label) for role in Role}
    listeners = {Role.SERVER: socket.create_server(("127.0.0.1", 0)), Role.DEALER: socket.create_server(("127.0.0.1", 0))}
    pairs = [(Role.CLIENT, Role.SERVER), (Role.CLIENT, Role.DEALER), (Role.SERVER, Role.DEALER)]  # connector, listener
    links: dict[Role, dict[int, Link]] = {role: {} for role in Role}
    session = bytes(range(16))

    def accept(listener: Role, connector: Role) -> None:
        conn, _ = listeners[listener].accept()
        got = read_preface(conn, timeout_s)
        peers = trust.only(connector.label)
        links[listener][int(connector)] = Link.accept(conn, server_context(own[listener], peers), peers,
                                                      (connector.label,), timeout_s, preface=got)

    for connector, listener in pairs:  # one at a time: each accept meets its own connect
        thread = threading.Thread(target=accept, args=(listener, connector), daemon=True)
        thread.start()
        peers = trust.only(listener.label)
        sock = socket.create_connection(listeners[listener].getsockname(), timeout=timeout_s)
        links[connector][int(listener)] = Link.connect(sock, client_context(own[connector], peers), peers,
                                                       (listener.label,), timeout_s,
                                                       preface=Preface(PARTY, connector.label, session))
        thread.join(timeout_s)
        assert int(connector) in links[listener], f"{listener.label} did not accept the {connector.label}"
    for sock in listeners.values():
        sock.close()
    return {role: LinkChannel(int(role), timeout_s, links=links[role]) for role in Role}
