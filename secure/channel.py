"""Point-to-point tensor messages between the fast engine's processes, with byte and round counts.

Transport is torch.distributed's gloo backend (the same rendezvous and interface selection as the
CrypTen engine: `tcp://host:port` hosted by the server, `GLOO_SOCKET_IFNAME` to pin the interface).
Every message's size follows from the public plan, so a receiver always knows what to expect; the
tensors of one message travel as one byte buffer. Each send and receive waits at most `timeout_s`
(callers pass a longer bound where the peer is known to be busy with offline work).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    rounds: int = 0


@dataclass
class Channel:
    rank: int
    timeout_s: float
    phases: dict[str, Traffic] = field(default_factory=dict)
    phase: str = "setup"

    @property
    def traffic(self) -> Traffic:
        return self.phases.setdefault(self.phase, Traffic())

    def send(self, dst: int, tensors: list[torch.Tensor], rounds: int = 1, timeout_s: float | None = None) -> None:
        """Returns once the peer has taken the message (a busy peer may take up to `timeout_s`)."""
        buf = _to_bytes(tensors)
        if buf.numel():
            dist.isend(buf, dst).wait(timedelta(seconds=timeout_s or self.timeout_s))
        self.traffic.sent += buf.numel()
        self.traffic.rounds += rounds

    def recv(self, src: int, specs: list[tuple[torch.dtype, int]], rounds: int = 1,
             timeout_s: float | None = None) -> list[torch.Tensor]:
        buf = torch.empty(_nbytes(specs), dtype=torch.uint8)
        if buf.numel():
            dist.irecv(buf, src).wait(timedelta(seconds=timeout_s or self.timeout_s))
        self.traffic.received += buf.numel()
        self.traffic.rounds += rounds
        return _from_bytes(buf, specs)

    def exchange(self, peer: int, tensors: list[torch.Tensor], specs: list[tuple[torch.dtype, int]],
                 timeout_s: float | None = None) -> list[torch.Tensor]:
        """Send ours and receive theirs at the same time: one round."""
        out = _to_bytes(tensors)
        buf = torch.empty(_nbytes(specs), dtype=torch.uint8)
        wait = timedelta(seconds=timeout_s or self.timeout_s)
        pending = dist.isend(out, peer) if out.numel() else None
        if buf.numel():
            dist.irecv(buf, peer).wait(wait)
        if pending is not None:
            pending.wait(wait)
        self.traffic.sent += out.numel()
        self.traffic.received += buf.numel()
        self.traffic.rounds += 1
        return _from_bytes(buf, specs)


def like(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, int]]:
    """The receive spec of a message shaped like `tensors` (both parties send alike)."""
    return [(t.dtype, t.numel()) for t in tensors]


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

