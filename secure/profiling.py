"""Per-layer profiles of a secure inference, and the traffic counter behind them.

CrypTen's own statistics (``cfg.communicator.verbose``) count rounds and the bytes a party sent
*plus* received; `TrafficCounter` wraps the communicator's methods to split bytes by direction.
Both count what one party sees: the server's figures include its traffic with the dealer.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import asdict, dataclass

import torch

from deepreduce.checkpoint import Checkpoint
from deepreduce.models import build_model
from deepreduce.spec import ModelSpec


@dataclass
class LayerProfile:
    name: str
    op: str
    seconds: float
    bytes_sent: int
    bytes_received: int
    rounds: int
    relu_count: int  # ReLUs evaluated in this layer for the whole batch


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
    offline_s: float = 0.0  # everything before the input is used: set-up, dealer correlations, precomputation
    offline_bytes: int = 0  # sent + received by this party before the input is used
    queries: int = 1  # batches in the session; the other figures sum over them
    engine: str = "crypten"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(**{**d, "layers": [LayerProfile(**layer) for layer in d["layers"]]})

    @classmethod
    def from_layers(cls, layers: list[LayerProfile], setup_s: float, batch_size: int,
                    insecure_tfp: bool) -> "Profile":
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
                   relu_count=sum(lp.relu_count for lp in layers), offline_s=setup_s)

    def summary(self) -> str:
        mode = "INSECURE TFP (no dealer)" if self.insecure_tfp else "TTP dealer"
        return (f"batch {self.batch_size}, {mode}: setup {self.setup_s:.2f} s, online {self.online_s:.2f} s "
                f"(ReLU {self.relu_s:.2f} s / linear {self.linear_s:.2f} s), "
                f"sent {self.bytes_sent / 1e6:.1f} MB, received {self.bytes_received / 1e6:.1f} MB, "
                f"{self.rounds} rounds")


def _traffic(layers: list[LayerProfile]) -> int:
    return sum(lp.bytes_sent + lp.bytes_received for lp in layers)


class TrafficCounter:
    """Counts bytes sent and received by one party, by wrapping its CrypTen communicator.

    Every group this project uses has two members (server-client, server-dealer) except the
    three-party group of the dealer's seed set-up, which runs before the counter is installed.
    """

    def __init__(self, communicator):
        self.sent = 0
        self.received = 0
        self._comm = communicator
        self._rank = communicator.get_rank()
        for name in ("send", "isend", "recv", "irecv", "all_reduce", "reduce", "broadcast", "all_gather",
                     "gather", "scatter", "send_obj", "recv_obj", "broadcast_obj"):
            setattr(communicator, name, self._wrap(name, getattr(communicator, name)))

    def _wrap(self, name: str, method):
        def counted(*args, **kwargs):
            result = method(*args, **kwargs)
            sent, received = self._directions(name, args, kwargs, result)
            self.sent += int(sent)
            self.received += int(received)
            return result
        return counted

    def _directions(self, name: str, args, kwargs, result) -> tuple[int, int]:
        if name in ("send", "isend"):
            return _nbytes(args[0]), 0
        if name in ("recv", "irecv"):
            return 0, _nbytes(args[0])
        if name in ("all_reduce", "all_gather"):  # two parties: each sends and receives its part
            return _nbytes(args[0]), _nbytes(args[0])
        if name in ("reduce", "gather"):
            dst = args[1] if len(args) > 1 else kwargs["dst"]
            return (0, _nbytes(args[0])) if dst == self._rank else (_nbytes(args[0]), 0)
        if name == "broadcast":
            src = args[1] if len(args) > 1 else kwargs["src"]
            return (_nbytes(args[0]), 0) if src == self._rank else (0, _nbytes(args[0]))
        if name == "scatter":
            src = args[1] if len(args) > 1 else kwargs["src"]
            if src == self._rank:
                return sum(_nbytes(t) for i, t in enumerate(args[0]) if i != self._rank), 0
            return 0, _nbytes(result)
        if name == "send_obj":
            return _pickled_size(args[0]), 0
        if name == "recv_obj":
            return 0, _pickled_size(result)
        if name == "broadcast_obj":
            src = args[1] if len(args) > 1 else kwargs["src"]
            return (_pickled_size(args[0]), 0) if src == self._rank else (0, _pickled_size(result))
        return 0, 0


def _nbytes(x) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return x.nelement() * x.element_size()


def _pickled_size(obj) -> int:
    return len(pickle.dumps(obj)) + 4  # + the int32 length sent first


class LayerRecorder:
    """Times one layer at a time and records its traffic (counter) and rounds (CrypTen stats)."""

    def __init__(self, communicator, counter: TrafficCounter):
        self._comm = communicator
        self._counter = counter
        self.layers: list[LayerProfile] = []

    def record(self, name: str, op: str, relu_count: int, fn):
        sent, received = self._counter.sent, self._counter.received
        rounds = self._comm.comm_rounds
        start = time.perf_counter()
        result = fn()
        self.layers.append(LayerProfile(name=name, op=op, seconds=time.perf_counter() - start,
                                        bytes_sent=self._counter.sent - sent,
                                        bytes_received=self._counter.received - received,
                                        rounds=self._comm.comm_rounds - rounds, relu_count=relu_count))
        return result


# -- models for tests and latency benchmarks (latency does not depend on the weight values) ----

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


def random_checkpoint(spec: ModelSpec, seed: int = 0, classes: list[str] | None = None,
                      mean: list[float] | None = None, std: list[float] | None = None) -> Checkpoint:
    """A checkpoint with random weights and random batch-norm statistics and affine parameters
    (default ones would make batch-norm folding bugs invisible)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen))
    if classes is None:
        classes = CIFAR10_CLASSES if spec.num_classes == 10 else [f"class{i}" for i in range(spec.num_classes)]
    channels = spec.in_channels
    return Checkpoint(spec=spec, state_dict=model.state_dict(),
                      mean=mean or (CIFAR10_MEAN if channels == 3 else [0.5])[:channels],
                      std=std or (CIFAR10_STD if channels == 3 else [0.25])[:channels],
                      classes=list(classes))
