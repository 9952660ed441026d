"""The reference engine: CrypTen's MPC tensors, CrypTen's trusted third party (TTP) as the dealer.

Fixed ranks (`secure.core.party.Role`): the server is rank 0 and hosts the c10d store, the client rank
1; both form CrypTen's world of size 2. The dealer is rank 2, CrypTen's TTP: it hands out Beaver
triples and other correlated randomness and never sees an opened value. The server secret-shares every
plan tensor with src=0 (not the ReLU masks: they are public architecture, in the public plan), the client
its images with src=1; the logits are revealed to the client only, as raw ring values decoded here.

Every op kind of the graph runs, the ones of traced modules (`deepreduce.trace`) included, with CrypTen's
own MPC tensor operations: grouped and dilated convolutions as CrypTen convolutions (their Beaver triples
and TTP correlations take torch's conv2d options), avgpool2d as CrypTen's sum pool and public division,
reshape, concat and public scales locally; a masked ReLU runs CrypTen's ReLU on its kept positions only, and
a max pool is the same tournament as the fast engine's, max(a, b) = a + ReLU(b - a), so that it costs
exactly the plan's comparisons (k - 1 per output of a k-element window) and padding never wins.

``insecure_tfp=True`` uses CrypTen's TFP provider instead: no dealer, and the server generates all
triples itself, so it could decrypt everything. Benchmarks only; every result says so.

Each session must run in a fresh process: CrypTen's state is global and its world size cannot change
inside a process. This is the only module that sets CrypTen's environment variables and config. Every
blocking step (rendezvous, each send/receive) times out after ``Rendezvous.timeout_s``, so a vanished
peer raises instead of hanging. One query (batch) per session.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import warnings
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from deepreduce.graph import Op, walk
from secure.core.correlations import tournament
from secure.core.party import ROLES, Rendezvous, SecureSessionError
from secure.core.plan import PublicPlan
from secure.core.profiling import LayerProfile, Profile
from secure.core.ring import pool_windows
from secure.reference.crypten_compat import crypten_module

WORLD_SIZE = 2  # the computing parties; the dealer joins as an extra rank
OUTPUT_RANK = ROLES["client"]
# Every kind `_mpc_layer` computes: a kind added to the graph stays refused at session start until it is here.
CRYPTEN_KINDS = ("input", "conv", "scale_shift", "relu", "add", "avgpool", "linear",
                 "avgpool2d", "maxpool", "reshape", "concat", "scale")
log = logging.getLogger(__name__)


class CryptenEngine:
    name = "crypten"

    def run_server(self, plan, rdv: Rendezvous, batch_sizes: list[int], insecure_tfp: bool) -> Profile:
        public = plan.public_info()
        tensors = {name: plan.tensors[name] for name in _shared_names(public)}
        return _run_party("server", public, tensors, None, _single(batch_sizes), rdv, insecure_tfp)

    def run_client(self, public: PublicPlan, batches: list[torch.Tensor], rdv: Rendezvous, insecure_tfp: bool):
        _single([len(b) for b in batches])
        batch = batches[0]
        shapes = {name: public.tensor_shapes[name] for name in _shared_names(public)}
        return _run_party("client", public, shapes, batch.float(), len(batch), rdv, insecure_tfp)

    def run_dealer(self, rdv: Rendezvous, limits=None) -> dict:
        return serve_dealer(rdv)  # CrypTen's TTP answers requests as they come: `limits` is the fast engine's


def _shared_names(public: PublicPlan) -> list[str]:
    """The plan tensors the server secret-shares, in the order both parties share them: all but the ReLU
    masks, which are public (a classic plan has none: its tensors are shared exactly as before)."""
    return [name for name in sorted(public.tensor_shapes) if name not in public.masks]


def _single(batch_sizes: list[int]) -> int:
    if len(batch_sizes) != 1:
        raise ValueError("the crypten engine runs one batch per session; use engine='fast' for several")
    return batch_sizes[0]


def _configure(role: str, rdv: Rendezvous, insecure_tfp: bool):
    torch.set_num_threads(1)  # CrypTen parties hang with several intra-op threads (CrypTen #88)
    os.environ.update(RENDEZVOUS=rdv.url, WORLD_SIZE=str(WORLD_SIZE), RANK=str(ROLES[role]),
                      DISTRIBUTED_BACKEND="gloo")
    # CrypTen calls init_process_group/new_group without a timeout: they fall back to this
    # module-level default, which then bounds the store rendezvous and every gloo operation.
    c10d.default_pg_timeout = timedelta(seconds=rdv.timeout_s)
    crypten = crypten_module()
    crypten.cfg.mpc.provider = "TFP" if insecure_tfp else "TTP"
    crypten.cfg.communicator.verbose = True  # per-layer round counts
    if insecure_tfp:
        log.warning("insecure TFP provider: the server party generates all triples (benchmark only)")
    return crypten


@contextmanager
def crypten_session(role: str, rdv: Rendezvous, insecure_tfp: bool):
    """crypten.init() ... crypten.uninit(), torn down even on error; failures become SecureSessionError."""
    crypten = _configure(role, rdv, insecure_tfp)
    try:
        try:
            crypten.init()
        except Exception as exc:  # DistNetworkError, RuntimeError: the peers did not all show up
            raise SecureSessionError(f"{role}: rendezvous at {rdv.url} failed within {rdv.timeout_s:g} s "
                                     f"({type(exc).__name__}: {exc})") from exc
        yield crypten
    except RuntimeError as exc:
        if isinstance(exc, SecureSessionError):
            raise
        raise SecureSessionError(f"{role}: secure session failed ({type(exc).__name__}: {exc})") from exc
    finally:
        _teardown(crypten)


def _teardown(crypten) -> None:
    try:
        if crypten.is_initialized():
            crypten.uninit()  # rank 0 also tells the dealer to stop
    except Exception as exc:  # a vanished peer: still drop the local process group below
        log.debug("crypten.uninit failed: %s", exc)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:
        log.debug("destroy_process_group failed: %s", exc)


def _run_party(role: str, public: PublicPlan, tensors: dict, images: torch.Tensor | None, batch_size: int,
               rdv: Rendezvous, insecure_tfp: bool):
    """The server passes real tensors and no images; the client tensor shapes and its images."""
    rank = ROLES[role]
    c, h, w = public.input_shape
    public_parts = PublicParts.of(public)  # before any process meets: a refusal leaves nothing to undo
    with crypten_session(role, rdv, insecure_tfp) as crypten:
        start = time.perf_counter()
        communicator = crypten.communicator.get()
        counter = TrafficCounter(communicator)
        check_agreement(communicator, public.plan_hash, batch_size, (c, h, w))
        # Sharing with src=k sends nothing; the other party passes a tensor of the same shape.
        enc = {name: crypten.cryptensor(t if rank == 0 else torch.zeros(t), src=ROLES["server"])
               for name, t in tensors.items()}
        x = crypten.cryptensor(images if rank == 1 else torch.zeros(batch_size, c, h, w), src=ROLES["client"])
        setup_s = time.perf_counter() - start

        recorder = LayerRecorder(communicator, counter)
        with crypten.no_grad():
            out = walk(public.ops, x, _mpc_layer(crypten, enc, public_parts, recorder, batch_size))
            logits = recorder.record("output", "reveal", 0, lambda: reveal_to_client(out))
        profile = Profile.from_layers(recorder.layers, setup_s, batch_size, insecure_tfp, engine="crypten")
    return (logits, profile) if role == "client" else profile


def check_agreement(communicator, plan_hash: str, batch_size: int, input_shape) -> None:
    """Both parties must run the same plan on the same batch shape, or the protocol desynchronises."""
    mine = torch.tensor([int(plan_hash[:15], 16), batch_size, *input_shape], dtype=torch.long)
    server, client = communicator.all_gather(mine)
    if not torch.equal(server, client):
        raise SecureSessionError(
            f"server and client disagree: plan {server[0]:x}... vs {client[0]:x}..., "
            f"batch {server[1]} vs {client[1]}, input {server[2:].tolist()} vs {client[2:].tolist()}")


class PublicParts:
    """What both parties derive from the public plan alone: the kept positions of each masked ReLU and the
    windows of each max pool (flat indices, `pool_windows`)."""

    def __init__(self, keep: dict[int, torch.Tensor], windows: dict[int, torch.Tensor]):
        self.keep, self.windows = keep, windows

    @classmethod
    def of(cls, public: PublicPlan) -> "PublicParts":
        """Raises ValueError on a plan this engine cannot run (an unknown kind, a mask not in the plan)."""
        ops = public.ops
        for op in ops:
            if op.kind not in CRYPTEN_KINDS:
                raise ValueError(f"the crypten engine cannot run op {op.name!r} ({op.kind}) of this plan yet")
            if op.mask is not None and op.mask not in public.masks:
                raise ValueError(f"the public plan lacks the ReLU mask of op {op.name!r}")
        keep = {op.id: public.masks[op.mask].expand(op.shape).reshape(-1).nonzero().view(-1)
                for op in ops if op.kind == "relu" and op.mask is not None}
        windows = {op.id: pool_windows(*ops[op.inputs[0]].shape[1:], op.kernel, op.stride, op.padding)
                   for op in ops if op.kind == "maxpool"}
        return cls(keep, windows)


def _mpc_layer(crypten, enc: dict, parts: PublicParts, recorder: LayerRecorder, batch_size: int):
    """apply(op, inputs) for `walk`, on MPCTensors, recording each layer's profile."""
    def channel(name, dims=4):  # per channel of N x C x H x W, per feature of N x F
        return enc[name].view(1, -1, *([1] * (dims - 2)))

    def plus_bias(y, name):
        return y if name is None else y + channel(name, y.dim())

    def compute(op, inputs):
        kind, x = op.kind, inputs[0]
        if kind == "conv":
            return plus_bias(x.conv2d(enc[op.weight], stride=op.stride, padding=op.padding, **_conv_options(op)),
                             op.bias)
        if kind == "scale_shift":
            return x * channel(op.scale, x.dim()) + channel(op.shift, x.dim())
        if kind == "relu":
            return x.relu() if op.id not in parts.keep else _masked_relu(x, parts.keep[op.id])
        if kind == "add":
            return x + inputs[1]
        if kind == "avgpool":
            return x.mean(dim=(2, 3))  # sum, then division by a public integer (local truncation)
        if kind == "linear":
            return plus_bias(x.matmul(enc[op.weight].t()), op.bias)
        if kind == "avgpool2d":  # sum pool, zero padding counted in the divisor, as torch's default
            return x.avg_pool2d(tuple(op.kernel), stride=tuple(op.stride), padding=tuple(op.padding))
        if kind == "maxpool":
            return _maxpool(crypten, x, op, parts.windows[op.id])
        if kind == "reshape":
            return x.reshape(x.size(0), *op.shape)
        if kind == "concat":
            return crypten.cat(inputs, dim=1)
        if kind == "scale":  # public constants: a fixed-point multiply (local truncation), a public add
            return x * op.factor + op.offset
        raise ValueError(f"unknown op {kind!r}")

    def apply(op, inputs):
        return recorder.record(op.name, op.kind, op.relu_count * batch_size, lambda: compute(op, inputs),
                               comparisons=op.comparison_count * batch_size)
    return apply


def _conv_options(op: Op) -> dict:
    """torch's conv2d options beyond stride and padding, only where the op has them: CrypTen passes them on
    to the convolutions of its Beaver protocol and to the dealer's triples."""
    options = {}
    if op.dilation is not None:
        options["dilation"] = tuple(op.dilation)
    if op.groups is not None:
        options["groups"] = op.groups
    return options


def _masked_relu(x, keep: torch.Tensor):
    """ReLU on the kept positions only (`keep`: flat per-image indices, public): gathered, compared,
    scattered back; the other positions keep their shares, with no comparison and no traffic."""
    flat = x.reshape(x.size(0), -1)
    out = flat.clone()
    out[:, keep] = flat[:, keep].relu()
    return out.reshape(*x.size())


def _maxpool(crypten, x, op: Op, windows: torch.Tensor):
    """The max of each window as a tournament, max(a, b) = a + ReLU(b - a): one ReLU run per level over
    every window's pairs, an odd element waiting a level; `windows` repeats a real element where torch
    pads with -inf."""
    n, c = x.size(0), x.size(1)
    t = x.reshape(n, c, -1)[:, :, windows]  # N x C x outputs x kernel elements
    for pairs in tournament(t.size(-1)):
        a, b = t[..., 0: 2 * pairs: 2], t[..., 1: 2 * pairs: 2]
        best = a + (b - a).relu()
        t = best if t.size(-1) == 2 * pairs else crypten.cat([best, t[..., 2 * pairs:]], dim=-1)
    return t.reshape(n, *op.shape)


def reveal_to_client(out) -> torch.Tensor | None:
    """Open the logits to the client only and decode the ring values ourselves: CrypTen's
    FixedPointEncoder.decode rounds negative values about 1.0 too low."""
    ring = out._tensor.reveal(dst=OUTPUT_RANK)  # None at the server
    if ring is None:
        return None
    return ring.to(torch.float64) / out._tensor.encoder.scale


def serve_dealer(rdv: Rendezvous) -> dict:
    """Run the dealer; returns its traffic (for tests and benchmarks)."""
    with crypten_session("dealer", rdv, insecure_tfp=False) as crypten:
        counter = TrafficCounter(crypten.communicator.get())
        with warnings.catch_warnings():  # TTPServer calls crypten.init() again: "already initialized"
            warnings.simplefilter("ignore", RuntimeWarning)
            crypten.mpc.provider.TTPServer()  # loops until rank 0 sends "terminate"
        return {"bytes_sent": counter.sent, "bytes_received": counter.received}


# -- traffic and per-layer profiles from CrypTen's communicator ------------------------------

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

    def record(self, name: str, op: str, relu_count: int, fn, comparisons: int = 0):
        sent, received = self._counter.sent, self._counter.received
        rounds = self._comm.comm_rounds
        start = time.perf_counter()
        result = fn()
        self.layers.append(LayerProfile(name=name, op=op, seconds=time.perf_counter() - start,
                                        bytes_sent=self._counter.sent - sent,
                                        bytes_received=self._counter.received - received,
                                        rounds=self._comm.comm_rounds - rounds, relu_count=relu_count,
                                        comparison_count=comparisons))
        return result
