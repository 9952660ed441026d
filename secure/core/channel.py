"""Point-to-point tensor messages between the fast engine's parties, with byte and round counts.

`Channel` is the interface the engine talks to and does the counting; a transport subclass moves the
bytes. `GlooChannel` runs over torch.distributed's gloo backend (the server hosts the c10d store,
`GLOO_SOCKET_IFNAME` pins the interface: what the roles use today); `LinkChannel` over
authenticated, encrypted TLS links, one per peer (`secure.transport.link`); `InProcessHub` connects
parties that run as threads of one process, for the engine's unit tests. Every message's size follows from the public plan, so a
receiver always knows what to expect; the tensors of one message travel as one byte buffer. Each
send and receive waits at most `timeout_s` (callers pass a longer bound where the peer is known to be
busy with offline work).
"""

from __future__ import annotations

import queue
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from secure.transport import LinkError, LinkTimeout


class ChannelTimeout(RuntimeError):
    """Nothing arrived from the peer within the timeout (a RuntimeError, like every channel failure)."""


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    rounds: int = 0


@dataclass
class Channel:
    """One party's end: `send`, `recv` and `exchange` tensors with the peer of rank `dst`/`src`/`peer`.
    Bytes and rounds are counted per `phase` (the engine sets it: setup, offline, online).

    A round is one flight of messages between this party and a peer: a point where one of them must
    wait for the other's message before it can go on. Messages one party sends the other in one step
    (several sends with no receive between them) travel together and are one round; so are several
    receives in a row; an exchange (both send, then both receive) is one round."""
    rank: int
    timeout_s: float
    phases: dict[str, Traffic] = field(default_factory=dict)
    phase: str = "setup"
    _last: dict = field(default_factory=dict)  # peer -> "send" | "recv" | "exchange": the previous step

    @property
    def traffic(self) -> Traffic:
        return self.phases.setdefault(self.phase, Traffic())

    def _step(self, peer: int, kind: str) -> None:
        """Count a round unless this step continues the previous flight in the same direction."""
        if kind == "exchange" or self._last.get(peer) != kind:
            self.traffic.rounds += 1
        self._last[peer] = kind

    def send(self, dst: int, tensors: list[torch.Tensor], timeout_s: float | None = None,
             handoff: bool = False) -> None:
        """Returns once the message is on its way (a transport may queue it; a busy peer may take up to
        `timeout_s` to take it). `handoff`: the caller never touches the one contiguous uint8 tensor it
        passes again, so it goes as it is, without the copy that otherwise protects it from later
        writes while a transport still holds it (the dealer's large messages)."""
        buf = tensors[0] if handoff and _whole_bytes(tensors) else _to_bytes(tensors)
        if buf.numel():
            self._send(dst, buf, timeout_s or self.timeout_s)
        self.traffic.sent += buf.numel()
        self._step(dst, "send")

    def recv(self, src: int, specs: list[tuple[torch.dtype, int]],
             timeout_s: float | None = None) -> list[torch.Tensor]:
        n = _nbytes(specs)
        buf = self._recv(src, n, timeout_s or self.timeout_s) if n else torch.zeros(0, dtype=torch.uint8)
        self.traffic.received += buf.numel()
        self._step(src, "recv")
        return _from_bytes(buf, specs)

    def exchange(self, peer: int, tensors: list[torch.Tensor], specs: list[tuple[torch.dtype, int]],
                 timeout_s: float | None = None) -> list[torch.Tensor]:
        """Send ours and receive theirs at the same time: one round."""
        out, n = _to_bytes(tensors), _nbytes(specs)
        buf = self._exchange(peer, out, n, timeout_s or self.timeout_s)
        self.traffic.sent += out.numel()
        self.traffic.received += buf.numel()
        self._step(peer, "exchange")
        return _from_bytes(buf, specs)

    def flush(self, peer: int, timeout_s: float | None = None) -> None:
        """Wait until what was sent to `peer` has left this process (a transport that queues sends
        overrides this): the dealer's backpressure, so that it holds one query's keys at a time."""

    def close(self) -> None:
        """Leave the session (idempotent)."""

    def sibling(self, peer: int) -> "Channel":
        """A second channel to `peer` over the same transport, with counts of its own: for a thread that
        talks to that peer only while this channel talks to the others (a warm session's preparation,
        `secure.core.stream`). Closing it leaves the transport open."""
        raise NotImplementedError(f"{type(self).__name__} has no sibling channels (warm sessions run over "
                                  "TLS links or in one process)")

    # -- the transport: subclasses move whole byte buffers -----------------------------------------
    def _send(self, dst: int, buf: torch.Tensor, timeout_s: float) -> None:
        raise NotImplementedError

    def _recv(self, src: int, nbytes: int, timeout_s: float) -> torch.Tensor:
        raise NotImplementedError

    def _exchange(self, peer: int, out: torch.Tensor, nbytes: int, timeout_s: float) -> torch.Tensor:
        if out.numel():
            self._send(peer, out, timeout_s)
        return self._recv(peer, nbytes, timeout_s) if nbytes else torch.zeros(0, dtype=torch.uint8)


# -- gloo (torch.distributed) ------------------------------------------------------------------------

class GlooChannel(Channel):
    def _send(self, dst, buf, timeout_s):
        dist.isend(buf, dst).wait(timedelta(seconds=timeout_s))

    def _recv(self, src, nbytes, timeout_s):
        buf = torch.empty(nbytes, dtype=torch.uint8)
        dist.irecv(buf, src).wait(timedelta(seconds=timeout_s))
        return buf

    def _exchange(self, peer, out, nbytes, timeout_s):
        buf = torch.empty(nbytes, dtype=torch.uint8)
        wait = timedelta(seconds=timeout_s)
        pending = dist.isend(out, peer) if out.numel() else None
        if nbytes:
            dist.irecv(buf, peer).wait(wait)
        if pending is not None:
            pending.wait(wait)
        return buf

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def gloo_channel(rank: int, host: str, port: int, timeout_s: float, world: int) -> GlooChannel:
    """Join the session's process group (rank 0 hosts the c10d store). The server binds the store's
    socket to the session's address only: torch's own store would listen on every interface."""
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=16)
        store = dist.TCPStore(host, port, world, is_master=True, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=listener.detach(), use_libuv=False)
    else:  # retries until the server's store is up or the timeout passes
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout, use_libuv=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    return GlooChannel(rank, timeout_s)


# -- TLS links (secure.transport) ------------------------------------------------------------------

@dataclass
class LinkChannel(Channel):
    """One established `secure.transport.link.Link` per peer rank. A link error (tampering, truncation,
    a peer gone, a timeout) surfaces as RuntimeError, like a gloo failure, and ends the session."""
    links: dict = field(default_factory=dict)  # peer rank -> Link

    def _send(self, dst, buf, timeout_s):
        try:
            self.links[dst].send(buf.numpy(), owned=True)  # buf is this send's own (`Channel.send`)
        except LinkError as exc:
            raise RuntimeError(f"rank {self.rank}: link to rank {dst} failed: {exc}") from exc

    def _recv(self, src, nbytes, timeout_s):
        try:
            data = self.links[src].recv(max_bytes=nbytes, timeout=timeout_s)
        except LinkTimeout as exc:
            raise ChannelTimeout(f"rank {self.rank}: link from rank {src} failed: {exc}") from exc
        except LinkError as exc:
            raise RuntimeError(f"rank {self.rank}: link from rank {src} failed: {exc}") from exc
        if len(data) != nbytes:
            raise RuntimeError(f"rank {self.rank}: expected {nbytes} bytes from rank {src}, got {len(data)}")
        return torch.frombuffer(data, dtype=torch.uint8)

    def flush(self, peer, timeout_s=None):
        try:
            self.links[peer].flush(timeout_s or self.timeout_s)
        except LinkError as exc:
            raise RuntimeError(f"rank {self.rank}: link to rank {peer} failed: {exc}") from exc

    def wire_counts(self, flush_timeout_s: float = 10.0) -> tuple[int, int]:
        """(sent, received) on the wire over every link: TLS records, frame headers and handshakes.
        Sends are queued (a writer thread per link), so the queues are flushed first: otherwise the
        session's last message could still be on its way and missing from the count."""
        for link in self.links.values():
            try:
                link.flush(flush_timeout_s)
            except LinkError:
                pass  # the count is then what reached the wire
        return (sum(link.wire_sent for link in self.links.values()),
                sum(link.wire_received for link in self.links.values()))

    def close(self) -> None:
        for link in self.links.values():
            link.close()

    def sibling(self, peer: int) -> "LinkChannel":
        return _LinkSibling(self.rank, self.timeout_s, links={peer: self.links[peer]})


@dataclass
class _LinkSibling(LinkChannel):
    def close(self) -> None:
        """The links belong to the channel this one is a sibling of."""


# -- in one process (engine unit tests) ---------------------------------------------------------------

class InProcessHub:
    """Queues between parties that run as threads of one process: `hub.channel(rank)` per party.
    A receive that waits past its timeout, or finds a message of another size than the plan says,
    raises RuntimeError, as a gloo timeout does."""

    def __init__(self, ranks=(0, 1, 2)):
        self._queues = {(a, b): queue.Queue() for a in ranks for b in ranks if a != b}

    def channel(self, rank: int, timeout_s: float = 30.0) -> "InProcessChannel":
        return InProcessChannel(rank, timeout_s, hub=self)

    def pending(self) -> int:
        """Messages sent and not yet received (0 after a clean session)."""
        return sum(q.qsize() for q in self._queues.values())


@dataclass
class InProcessChannel(Channel):
    hub: InProcessHub | None = None

    def _send(self, dst, buf, timeout_s):
        self.hub._queues[(self.rank, dst)].put(buf.clone())

    def _recv(self, src, nbytes, timeout_s):
        try:
            buf = self.hub._queues[(src, self.rank)].get(timeout=timeout_s)
        except queue.Empty:
            raise ChannelTimeout(f"rank {self.rank}: no message from rank {src} within {timeout_s:g} s") from None
        if buf.numel() != nbytes:
            raise RuntimeError(f"rank {self.rank}: expected {nbytes} bytes from rank {src}, got {buf.numel()}")
        return buf

    def sibling(self, peer: int) -> "InProcessChannel":
        return InProcessChannel(self.rank, self.timeout_s, hub=self.hub)


def like(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, int]]:
    """The receive spec of a message shaped like `tensors` (both parties send alike)."""
    return [(t.dtype, t.numel()) for t in tensors]


def _whole_bytes(tensors: list[torch.Tensor]) -> bool:
    return len(tensors) == 1 and tensors[0].dtype == torch.uint8 and tensors[0].dim() == 1 and tensors[0].is_contiguous()


def _to_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _nbytes(specs) -> int:
    return sum(_itemsize(dtype) * n for dtype, n in specs)


def _from_bytes(buf: torch.Tensor, specs) -> list[torch.Tensor]:
    out, offset = [], 0
    for dtype, n in specs:
        size = _itemsize(dtype) * n
        out.append(buf[offset: offset + size].clone().view(dtype))
        offset += size
    return out
