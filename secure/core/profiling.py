"""Per-layer profiles of a secure inference, the record every engine reports.

Each party's profile counts what that party sees: the server's figures include its traffic with
the dealer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LayerProfile:
    name: str
    op: str
    seconds: float
    bytes_sent: int
    bytes_received: int
    rounds: int
    relu_count: int  # ReLUs evaluated in this layer for the whole batch
    # Max-pool comparisons of this layer for the whole batch: a kind of its own, not counted as ReLUs
    # (default 0: profiles written before it load unchanged)
    comparison_count: int = 0


@dataclass
class Profile:
    layers: list[LayerProfile]
    setup_s: float  # rendezvous + plan check + weight/input encryption
    online_s: float  # the layers and the output reveal, whole batch
    total_s: float
    bytes_sent: int  # totals over `layers` (the online phase)
    bytes_received: int
    rounds: int
    relu_s: float  # ReLU layers ...
    linear_s: float  # ... and every other layer (incl. the output reveal): the two sum to the totals
    relu_bytes: int
    linear_bytes: int
    batch_size: int
    insecure_tfp: bool
    relu_count: int = 0  # ReLUs evaluated for the whole batch
    comparison_count: int = 0  # max-pool comparisons for the whole batch
    offline_s: float = 0.0  # everything before the input is used: set-up, dealer correlations, precomputation
    offline_bytes: int = 0  # sent + received by this party before the input is used
    queries: int = 1  # batches in the session; the other figures sum over them
    engine: str = ""  # the engine that ran: "fast" or "crypten"
    relu_protocol: str = ""  # the fast engine's ReLU protocol that ran: "gmw", "fss" or "fss-exact" ("": crypten's own)
    # The whole session as this party's channel counted it, all phases: payload bytes, and, over TLS links,
    # the bytes on the wire (TLS records and frame headers, the handshakes and prefaces included).
    session_bytes_sent: int | None = None
    session_bytes_received: int | None = None
    wire_bytes_sent: int | None = None
    wire_bytes_received: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(**{**d, "layers": [LayerProfile(**layer) for layer in d["layers"]]})

    @classmethod
    def from_layers(cls, layers: list[LayerProfile], setup_s: float, batch_size: int,
                    insecure_tfp: bool, engine: str) -> "Profile":
        relu = [lp for lp in layers if lp.op == "relu"]
        other = [lp for lp in layers if lp.op != "relu"]
        online_s = sum(lp.seconds for lp in layers)
        return cls(layers=layers, setup_s=setup_s, online_s=online_s, total_s=setup_s + online_s,
                   bytes_sent=sum(lp.bytes_sent for lp in layers),
                   bytes_received=sum(lp.bytes_received for lp in layers),
                   rounds=sum(lp.rounds for lp in layers),
                   relu_s=sum(lp.seconds for lp in relu), linear_s=sum(lp.seconds for lp in other),
                   relu_bytes=_traffic(relu), linear_bytes=_traffic(other),
                   batch_size=batch_size, insecure_tfp=insecure_tfp,
                   relu_count=sum(lp.relu_count for lp in layers),
                   comparison_count=sum(lp.comparison_count for lp in layers), offline_s=setup_s, engine=engine)

    def summary(self) -> str:
        mode = "INSECURE TFP (no dealer)" if self.insecure_tfp else "with dealer"
        return (f"batch {self.batch_size}, {mode}: setup {self.setup_s:.2f} s, online {self.online_s:.2f} s "
                f"(ReLU {self.relu_s:.2f} s / linear {self.linear_s:.2f} s), "
                f"sent {self.bytes_sent / 1e6:.1f} MB, received {self.bytes_received / 1e6:.1f} MB, "
                f"{self.rounds} rounds" + (f", ReLU protocol {self.relu_protocol}" if self.relu_protocol else ""))


def _traffic(layers: list[LayerProfile]) -> int:
    return sum(lp.bytes_sent + lp.bytes_received for lp in layers)
