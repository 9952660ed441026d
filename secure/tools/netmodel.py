"""Latency of a secure inference on another network, projected from a profile measured on loopback.

    latency = compute_s + rounds * rtt_s / 2 + wire_bytes * 8 / bandwidth_bps
    wire_bytes = (max(sent, received) + OVERLAP_SHARE * min(sent, received)) * WIRE_OVERHEAD

* ``compute_s``: the profile's online time (``Profile.online_s``), measured with all parties on one
  machine, where the network costs next to nothing.
* ``rounds``: the profile's communication rounds. The fast engine counts a round per flight of
  messages (`secure.core.channel.Channel`: several messages one party sends in one step are one
  round, a simultaneous exchange is one round), so each costs one one-way delay, rtt / 2. CrypTen
  counts each send and each receive of its communicator as a round, which is no fewer flights.
  Checked against emulated delay (`--link rtt=..`, docs/RESULTS.md "Emulated WAN"): charging a whole
  rtt per round overestimated the shipped plan's 20 ms latency by 80 %.
* ``wire_bytes``: what crosses the busiest link, the server's: the server party's profile counts its
  traffic with the client and with the dealer. The link is full duplex, but the two directions overlap
  only partly (the parties open shares to each other at once, the dealer's triples flow one way, and
  much of the protocol waits for what it has just asked for): the larger direction counts in full,
  the smaller ``OVERLAP_SHARE`` (0.5, fitted to the tbf runs: 0.46 for the shipped model, 0.48 for
  the full ResNet18). TCP/IP and Ethernet headers add ``WIRE_OVERHEAD`` (1514-byte frames carrying
  1448 payload bytes).

Checked against rate-limited runs across network namespaces (``python -m secure.netns``, docs/RESULTS.md
"Deploying on real machines"); the round-trip term could not be checked there (no delay emulation).

API::

    from secure.tools.netmodel import predict_latency, project, PROJECTIONS
    predict_latency(profile, 100e6, 0.02)   # seconds, for the batch the profile measured
    project(profile)                        # {"LAN": s, "WAN": s}
    print(format_projections(profile))

``profile`` is a `secure.core.profiling.Profile`, its ``to_dict()``, or the dict of
``secure.tools.measure.measure_cost`` (per-image figures). Use the server party's profile (what
``run_local_parties(...).server.profile`` and ``python -m secure.tools.measure`` give): the client's lacks
the dealer's traffic.

    python -m secure.tools.netmodel PROFILE.json      # prints the LAN and WAN projections
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

__all__ = ["Link", "Cost", "PROJECTIONS", "WIRE_OVERHEAD", "OVERLAP_SHARE", "cost_of", "predict_latency", "project",
           "format_projections"]

# Ethernet frame (14-byte header) of a full 1500-byte IP packet over the TCP payload it carries
# (20 IP + 20 TCP + 12 timestamp option bytes): 1514 / 1448.
WIRE_OVERHEAD = 1514 / 1448
# Share of the smaller traffic direction that adds to the larger one on a full-duplex link: 0 would be
# perfect overlap, 1 none. Fitted to tbf-limited runs across network namespaces (docs/RESULTS.md).
OVERLAP_SHARE = 0.5


@dataclass(frozen=True)
class Link:
    bandwidth_bps: float
    rtt_s: float
    description: str


PROJECTIONS: dict[str, Link] = {
    "LAN": Link(1e9, 0.2e-3, "1 Gbit/s, 0.2 ms round trip (one data centre or office network)"),
    "WAN": Link(100e6, 20e-3, "100 Mbit/s, 20 ms round trip (across a country, good broadband)"),
}


@dataclass(frozen=True)
class Cost:
    """One secure computation (a batch) as the model sees it."""
    compute_s: float
    bytes_sent: float
    bytes_received: float
    rounds: int
    batch_size: int = 1

    @property
    def wire_bytes(self) -> float:
        big, small = max(self.bytes_sent, self.bytes_received), min(self.bytes_sent, self.bytes_received)
        return (big + OVERLAP_SHARE * small) * WIRE_OVERHEAD


def cost_of(profile) -> Cost:
    """A `Cost` from a Profile, a Profile dict or a `measure_cost` dict; ValueError for anything else."""
    d = profile if isinstance(profile, dict) else getattr(profile, "__dict__", None)
    if not isinstance(d, dict):
        raise ValueError(f"expected a Profile or a dict, got {type(profile).__name__}")
    try:
        if "online_s" in d:  # Profile / Profile.to_dict()
            return Cost(float(d["online_s"]), float(d["bytes_sent"]), float(d["bytes_received"]),
                        int(d["rounds"]), int(d.get("batch_size") or 1))
        if "online_s_per_image" in d:  # secure.tools.measure.measure_cost
            n = int(d.get("batch_size") or 1)
            return Cost(float(d["online_s_per_image"]) * n, float(d["mb_sent_per_image"]) * 1e6 * n,
                        float(d["mb_received_per_image"]) * 1e6 * n, int(d["rounds"]), n)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"incomplete profile: {type(exc).__name__}: {exc}") from None
    raise ValueError("not a profile: expected online_s, bytes_sent, bytes_received, rounds (Profile) or "
                     "online_s_per_image, mb_sent_per_image, mb_received_per_image, rounds (secure.tools.measure)")


def predict_latency(profile, bandwidth_bps: float, rtt_s: float) -> float:
    """Projected online latency in seconds of the secure computation `profile` measured (its whole
    batch; divide by ``cost_of(profile).batch_size`` for seconds per image)."""
    if bandwidth_bps <= 0 or rtt_s < 0:
        raise ValueError("bandwidth_bps must be positive and rtt_s not negative")
    c = cost_of(profile)
    return c.compute_s + c.rounds * rtt_s / 2 + c.wire_bytes * 8 / bandwidth_bps


def project(profile, links: dict[str, Link] | None = None) -> dict[str, float]:
    """{name: predicted seconds} for every link of `links` (default PROJECTIONS)."""
    return {name: predict_latency(profile, link.bandwidth_bps, link.rtt_s)
            for name, link in (links or PROJECTIONS).items()}


def format_projections(profile, links: dict[str, Link] | None = None) -> str:
    """A small table: the measured loopback figures, then each projection split into its three terms."""
    c = cost_of(profile)
    lines = [f"measured (loopback): online {c.compute_s:.2f} s for {c.batch_size} image(s), "
             f"{c.bytes_sent / 1e6:.1f} MB sent and {c.bytes_received / 1e6:.1f} MB received by the server, {c.rounds} rounds",
             f"{'network':<8} {'latency':>9} {'compute':>9} {'rounds':>9} {'transfer':>9}  link"]
    for name, link in (links or PROJECTIONS).items():
        total = predict_latency(profile, link.bandwidth_bps, link.rtt_s)
        lines.append(f"{name:<8} {total:>8.2f}s {c.compute_s:>8.2f}s {c.rounds * link.rtt_s / 2:>8.2f}s "
                     f"{c.wire_bytes * 8 / link.bandwidth_bps:>8.2f}s  {link.description}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m secure.tools.netmodel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", help="JSON file: a Profile dict (server party) or a `secure.tools.measure --json-out` result")
    args = p.parse_args(argv)
    try:
        with open(args.profile) as f:
            doc = json.load(f)
        if isinstance(doc, dict) and isinstance(doc.get("profile"), dict):
            doc = doc["profile"]  # a PartyResult.to_dict()
        print(format_projections(doc))
    except (OSError, ValueError) as exc:
        print(f"error: {args.profile}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
