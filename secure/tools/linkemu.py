"""Link emulation for the local harness: a relay that gives every party link a round-trip delay and a rate.

    --link rtt=20ms,rate=100mbit      # both directions of every link: 10 ms one way, 100 Mbit/s each way
    --link rtt=20ms                   # delay only;   --link rate=1gbit: rate only
    --link lan                        # (or no flag) no emulation: plain loopback

`secure.tools.local.run_local_parties(..., link=parse_link("rtt=20ms,rate=100mbit"))` puts a `Relay` between
each accepted party connection and the party process it is handed to (`secure.tools.local._Listeners`), so
every link of the fast engine (client-server, client-dealer, server-dealer) crosses it, TLS handshakes
included. The parties, their byte counts and their rounds are unchanged: only the timing is.

The model of one direction of one link (a point-to-point link per pair of parties, full duplex, each
direction independent of the other):

* **rate**: a serialisation clock. A chunk read at time t starts leaving at max(t, the end of the chunk
  before it) and takes ``len * 8 * WIRE_OVERHEAD / rate`` seconds: the rate is the link's Ethernet rate,
  each TCP payload byte charged 1514/1448 for the headers of full frames, as `tc tbf` and
  `secure.tools.netmodel` count. No burst allowance; the relay's queue is unbounded (nothing is dropped).
* **delay**: every chunk is released ``rtt / 2`` after its last byte left (propagation delay). A delay line,
  not a gate: chunks in flight do not wait for each other, so a stream keeps the full rate.

Both run on `time.monotonic()` in two threads per direction (a reader that stamps each chunk with its
release time and a writer that sends it then); Python's timers add some 0.1 ms. Chunks are read at most
`CHUNK` bytes at a time and cut to at most 0.5 ms of the rate, so a large message streams rather than
arriving in one lump. What is not modelled: loss, jitter, TCP's congestion window over a long path (a
real 20 ms link's slow start), and a rate shared by the links of one host (each pair of parties has its
own link; the fast engine's online phase uses the client-server link only).
"""

from __future__ import annotations

import collections
import math
import re
import socket
import threading
import time
from dataclasses import dataclass

from deepreduce.errors import UserError

__all__ = ["Link", "LAN", "LinkSpecError", "Relay", "parse_link", "tcp_pair", "WIRE_OVERHEAD", "CHUNK"]

# As secure.tools.netmodel.WIRE_OVERHEAD (kept here so that this module imports nothing heavy).
WIRE_OVERHEAD = 1514 / 1448
CHUNK = 1 << 16  # the most a reader takes from the socket at once
_SLICE_S = 0.5e-3  # the most one chunk may take to serialise at the rate
_MIN_SLICE = 1448  # ... but never smaller than one full frame's payload

_RTT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(s|ms|us)$", re.IGNORECASE)
_RATE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(k|m|g)?bit$", re.IGNORECASE)
_SYNTAX = ("expected `lan` or KEY=VALUE pairs separated by commas, like rtt=20ms,rate=100mbit "
           "(rtt in s, ms or us; rate in bit, kbit, mbit or gbit per second)")


class LinkSpecError(UserError):
    """A --link text that does not parse; one line, printed as `error: ...`."""


@dataclass(frozen=True)
class Link:
    """An emulated link: round-trip time in seconds (each direction gets half) and rate in bits/s per
    direction (None: no limit). `Link()` (= `LAN`) is no emulation at all: plain loopback."""
    rtt_s: float = 0.0
    rate_bps: float | None = None

    def __post_init__(self):
        if not (isinstance(self.rtt_s, (int, float)) and math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise LinkSpecError(f"the link's rtt must be a finite number of seconds >= 0, got {self.rtt_s!r}")
        if self.rate_bps is not None and not (isinstance(self.rate_bps, (int, float))
                                              and math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise LinkSpecError(f"the link's rate must be a positive number of bits/s, got {self.rate_bps!r}")

    @property
    def emulated(self) -> bool:
        return self.rtt_s > 0 or self.rate_bps is not None

    @property
    def one_way_s(self) -> float:
        return self.rtt_s / 2

    @property
    def spec(self) -> str:
        """The flag text that gives this link back (`parse_link(link.spec) == link`)."""
        if not self.emulated:
            return "lan"
        parts = []
        if self.rtt_s > 0:
            parts.append(f"rtt={_g(self.rtt_s * 1e3)}ms")
        if self.rate_bps is not None:
            parts.append(f"rate={_g(self.rate_bps / 1e6)}mbit")
        return ",".join(parts)

    def describe(self) -> str:
        if not self.emulated:
            return "loopback 127.0.0.1, no link emulation"
        rtt = f"{_g(self.rtt_s * 1e3)} ms round trip" if self.rtt_s > 0 else "no added delay"
        rate = f"{_g(self.rate_bps / 1e6)} Mbit/s each way" if self.rate_bps is not None else "no rate limit"
        return f"EMULATED link ({rtt}, {rate}; secure.tools.linkemu relay on 127.0.0.1)"

    def to_dict(self) -> dict:
        """What every report records about the link."""
        d = {"emulated": self.emulated, "spec": self.spec, "rtt_s": self.rtt_s, "rate_bps": self.rate_bps,
             "description": self.describe()}
        if self.emulated:
            d["emulator"] = ("secure.tools.linkemu: a relay on 127.0.0.1 per party link; each direction delays "
                             "every chunk by rtt/2 and paces it at the rate (payload bytes x 1514/1448), "
                             "no loss, no jitter")
        return d


LAN = Link()


def _g(x: float) -> str:
    return f"{x:.6g}"


def parse_link(text: str | None) -> Link:
    """'rtt=20ms,rate=100mbit' -> Link(0.02, 1e8); None, '', 'lan' or 'none' -> LAN (no emulation).
    LinkSpecError (a UserError: one `error:` line) for anything else."""
    if text is None or text.strip().lower() in ("", "lan", "none"):
        return LAN
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key or not value:
            raise LinkSpecError(f"--link {text!r}: {part.strip()!r} is not KEY=VALUE; {_SYNTAX}")
        if key not in ("rtt", "rate"):
            raise LinkSpecError(f"--link {text!r}: unknown key {key!r} (rtt or rate); {_SYNTAX}")
        if key in fields:
            raise LinkSpecError(f"--link {text!r}: {key} given twice; {_SYNTAX}")
        fields[key] = value
    rtt_s, rate_bps = 0.0, None
    if "rtt" in fields:
        m = _RTT.match(fields["rtt"])
        if not m:
            raise LinkSpecError(f"--link {text!r}: rtt {fields['rtt']!r} needs a unit, like 20ms, 0.5s or 200us")
        rtt_s = float(m.group(1)) / {"s": 1.0, "ms": 1e3, "us": 1e6}[m.group(2).lower()]
        if rtt_s > 10:
            raise LinkSpecError(f"--link {text!r}: rtt {fields['rtt']} is above 10 s")
    if "rate" in fields:
        m = _RATE.match(fields["rate"])
        if not m:
            raise LinkSpecError(f"--link {text!r}: rate {fields['rate']!r} is not like 100mbit, 1gbit or 512kbit "
                                "(bits per second; not bytes)")
        rate_bps = float(m.group(1)) * {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}[(m.group(2) or "").lower()]
        if rate_bps < 1e3:
            raise LinkSpecError(f"--link {text!r}: rate {fields['rate']} is below 1 kbit/s")
    return Link(rtt_s, rate_bps)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on 127.0.0.1 (the party's end must be TCP: TLS, TCP_NODELAY and peer
    names work on it as on an accepted connection)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname()[:2])
        b, _ = srv.accept()
    return a, b


@dataclass
class DirectionStats:
    """One direction's accounting (times on time.monotonic())."""
    name: str
    bytes: int = 0
    chunks: int = 0
    first_read: float | None = None  # when the first byte was read from the source
    last_read: float | None = None
    last_release: float | None = None  # the release time the clock gave the last chunk
    last_sent: float | None = None  # when the writer finished sending the last chunk
    max_late_s: float = 0.0  # how far behind its release time the writer sent a chunk, at most
    serialise_s: float = 0.0  # sum of the chunks' serialisation times at the rate

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Direction:
    """src -> dst through a delay line paced at the rate: a reader thread stamps, a writer thread sends."""

    def __init__(self, src: socket.socket, dst: socket.socket, link: Link, name: str, relay: "Relay"):
        self.src, self.dst, self.link, self.relay = src, dst, link, relay
        self.stats = DirectionStats(name)
        self._queue: collections.deque = collections.deque()  # (release time, bytes or None for EOF)
        self._cv = threading.Condition()
        self._clock = 0.0  # when the serialiser is free again
        slice_bytes = CHUNK if link.rate_bps is None else int(link.rate_bps / 8 / WIRE_OVERHEAD * _SLICE_S)
        self._slice = max(_MIN_SLICE, min(CHUNK, slice_bytes))
        self.threads = [threading.Thread(target=self._read, name=f"linkemu-read-{name}", daemon=True),
                        threading.Thread(target=self._write, name=f"linkemu-write-{name}", daemon=True)]

    def release_time(self, nbytes: int, now: float) -> float:
        """The clock: when a chunk of `nbytes` read at `now` reaches the other end."""
        if self.link.rate_bps is not None:
            tx = nbytes * 8 * WIRE_OVERHEAD / self.link.rate_bps
            self._clock = max(now, self._clock) + tx
            self.stats.serialise_s += tx
            return self._clock + self.link.one_way_s
        return now + self.link.one_way_s

    def _read(self) -> None:
        try:
            while not self.relay.closed:
                data = self.src.recv(CHUNK)
                now = time.monotonic()
                if not data:
                    break
                s = self.stats
                s.first_read = s.first_read if s.first_read is not None else now
                s.last_read = now
                items = [(self.release_time(len(piece), now), piece)
                         for piece in (data[i:i + self._slice] for i in range(0, len(data), self._slice))]
                with self._cv:
                    self._queue.extend(items)
                    self._cv.notify()
        except OSError:
            pass  # reset or closed by Relay.close: end this direction like an end of stream
        with self._cv:  # the end of stream is delayed like data
            self._queue.append((max(time.monotonic(), self._clock) + self.link.one_way_s, None))
            self._cv.notify()

    def _write(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._queue:
                        self._cv.wait()
                    release = self._queue[0][0]
                wait = release - time.monotonic()
                if wait > 0 and self.relay.stopping.wait(wait):
                    return
                with self._cv:  # everything already due goes in one send
                    batch, now = [], time.monotonic()
                    while self._queue and self._queue[0][0] <= now and self._queue[0][1] is not None:
                        batch.append(self._queue.popleft())
                    eof = not batch and self._queue[0][1] is None and self._queue[0][0] <= now
                    if eof:
                        self._queue.popleft()
                if not batch and not eof:
                    continue  # woke a little early
                if eof:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                payload = b"".join(piece for _, piece in batch)
                s = self.stats  # counted before the send: a reader that got the bytes sees them counted
                s.last_release = batch[-1][0]
                s.max_late_s = max(s.max_late_s, now - batch[0][0])
                s.bytes += len(payload)
                s.chunks += len(batch)
                self.dst.sendall(payload)
                s.last_sent = time.monotonic()
        except OSError:
            self.relay.close()  # the receiving end is gone: end the link at both ends
        finally:
            self.relay._direction_done()


class Relay:
    """Forward bytes between connected sockets `a` and `b`, both ways, through `link`. Owns both
    sockets: closes them when both directions have ended (or on `close`)."""

    def __init__(self, a: socket.socket, b: socket.socket, link: Link, name: str = "link"):
        for sock in (a, b):
            sock.setblocking(True)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.a, self.b, self.link, self.name = a, b, link, name
        self.stopping = threading.Event()
        self.closed = False
        self._lock = threading.Lock()
        self._running = 0
        self.forward = _Direction(a, b, link, f"{name}:a->b", self)
        self.backward = _Direction(b, a, link, f"{name}:b->a", self)
        self.done = threading.Event()

    def start(self) -> "Relay":
        self._running = 2
        for d in (self.forward, self.backward):
            for t in d.threads:
                t.start()
        return self

    def _direction_done(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.close()

    def close(self) -> None:
        """Stop both directions (data still in the delay line is dropped) and close both sockets."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.stopping.set()
        for sock in (self.a, self.b):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv
            except OSError:
                pass
            sock.close()
        for d in (self.forward, self.backward):
            with d._cv:
                d._queue.append((0.0, None))
                d._cv.notify()
        self.done.set()

    def join(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def stats(self) -> dict:
        return {"forward": self.forward.stats.to_dict(), "backward": self.backward.stats.to_dict()}

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

