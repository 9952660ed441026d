"""What every engine shares: the role table, the rendezvous, a party's result, the session error.

Torch-free on purpose: the control plane imports the role table before any party process loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Protocol

from deepreduce.errors import ProjectError

if TYPE_CHECKING:
    import torch

    from secure.core.plan import PublicPlan, SecurePlan
    from secure.core.profiling import Profile


class Role(IntEnum):
    """The three roles and their fixed ranks: the server holds the weights, the client the images,
    the dealer hands out correlated randomness and never sees an opened value."""
    SERVER = 0
    CLIENT = 1
    DEALER = 2

    @property
    def label(self) -> str:
        return self.name.lower()


ROLES = {role.label: int(role) for role in Role}  # "server" -> 0, ...
ROLE_NAMES = tuple(ROLES)
# The engines by name (their registry is secure.core.runtime): fast = this project's dealer-assisted
# protocol, crypten = CrypTen's MPC tensors, the reference. Here so that torch-free processes know them.
ENGINES = ("fast", "crypten")
DEFAULT_ENGINE = "fast"
# The fast engine's ReLU protocols (docs/PROTOCOL.md): gmw = the bit-packed carry tree (7 rounds per ReLU
# layer, little dealer traffic), fss = one-round comparison from the dealer's DCF keys (large dealer
# traffic), fss-exact = fss with truncation gates wherever a local truncation's wrap could do harm (more
# rounds, no wrap failure). "auto" is resolved before a session starts, by
# `secure.core.costmodel.resolve_relu_protocol` from the public plan and the link, between gmw and fss;
# the engine itself only ever sees a concrete protocol.
RELU_PROTOCOLS = ("gmw", "fss", "fss-exact")
AUTO_CANDIDATES = ("gmw", "fss")
RELU_CHOICES = ("auto",) + RELU_PROTOCOLS
DEFAULT_RELU_CHOICE = "auto"


@dataclass
class Rendezvous:
    host: str  # where rank 0 (the server party) hosts the session's meeting point
    port: int
    timeout_s: float = 60.0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def where(self) -> str:
        return f"rendezvous at {self.url}"

    def channel(self, rank: int, world: int):
        """A gloo channel (unencrypted: the local measurement harness and the CrypTen engine's world).
        The roles' sessions meet over TLS links instead: `secure.transport.meeting.Meeting`."""
        from secure.core.channel import gloo_channel
        return gloo_channel(rank, self.host, self.port, self.timeout_s, world)


@dataclass(frozen=True)
class DealerLimits:
    """What one session may ask of the dealer: checked before anything is allocated, refused with the
    reason. With gmw the dealer precomputes every query's correlations before the parties go online, so
    `max_session_bytes` bounds the session's total; with fss it makes and sends one query's keys at a
    time, so it bounds the largest query's."""
    max_description_bytes: int = 8_000_000  # the public session description the server sends
    max_images: int = 256  # images in all the session's queries
    max_queries: int = 64
    max_session_bytes: int = 4_000_000_000  # the correlations held at once (see above)

    def check_description(self, length: int) -> None:
        if not 0 < length <= self.max_description_bytes:
            raise ValueError(f"the session description has {length:,} bytes, the dealer accepts at most "
                             f"{self.max_description_bytes:,} (pi-dealer --max-description-kb)")

    def check_stream(self, batch_size: int, pool: int, query_bytes: int) -> None:
        """A warm session (queries as they come, `pool` prepared ahead): the dealer holds one query's
        correlations at a time, so `max_session_bytes` bounds one query's, and a query is at most
        `max_images` images. How many queries a warm session runs is the server's to limit (quotas)."""
        if not 1 <= batch_size <= self.max_images or not 1 <= pool <= self.max_queries:
            raise ValueError(f"the warm session asks for queries of {batch_size} images with {pool} prepared ahead, "
                             f"the dealer serves at most {self.max_images} images a query and {self.max_queries} "
                             "ahead (pi-dealer --max-images / --max-queries)")
        if query_bytes > self.max_session_bytes:
            raise ValueError(f"one query needs {query_bytes / 1e6:,.0f} MB of correlations, the dealer holds at most "
                             f"{self.max_session_bytes / 1e6:,.0f} MB a session (pi-dealer --max-session-mb)")

    def check_session(self, batch_sizes: list[int], correlation_bytes: int) -> None:
        images = sum(batch_sizes)
        if len(batch_sizes) > self.max_queries or images > self.max_images:
            raise ValueError(f"the session asks for {len(batch_sizes)} queries of {images} images in all, the dealer "
                             f"serves at most {self.max_queries} queries and {self.max_images} images a session "
                             "(pi-dealer --max-queries / --max-images)")
        if correlation_bytes > self.max_session_bytes:
            raise ValueError(f"the session needs {correlation_bytes / 1e6:,.0f} MB of correlations, the dealer holds "
                             f"at most {self.max_session_bytes / 1e6:,.0f} MB a session (pi-dealer --max-session-mb)")


@dataclass
class PartyResult:
    role: str
    logits: "torch.Tensor | None"  # client only: float64, N x classes
    profile: "Profile | None"
    insecure_tfp: bool

    def to_dict(self) -> dict:
        return {"role": self.role, "insecure_tfp": self.insecure_tfp,
                "logits": None if self.logits is None else self.logits.double().tolist(),
                "profile": None if self.profile is None else self.profile.to_dict()}


class SecureSessionError(ProjectError, RuntimeError):
    """The two parties disagree (plan, batch) or a peer failed, vanished or timed out."""


class Engine(Protocol):
    """A two-party inference protocol: each method runs one role of one session in this process.

    `batch_sizes` lists the queries (batches) of the session in order; an engine that runs one
    query per session refuses more with a ValueError."""

    name: str

    def run_server(self, plan: "SecurePlan", rdv: Rendezvous, batch_sizes: list[int],
                   insecure_tfp: bool) -> "Profile": ...

    def run_client(self, public: "PublicPlan", batches: "list[torch.Tensor]", rdv: Rendezvous,
                   insecure_tfp: bool) -> "tuple[torch.Tensor, Profile]": ...

    def run_dealer(self, rdv: Rendezvous, limits: DealerLimits) -> dict: ...
