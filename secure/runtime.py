"""Two-party secure inference with CrypTen: server (weights), client (images), dealer (triples).

Fixed ranks: the server is rank 0 and hosts the c10d store, the client rank 1; both form
CrypTen's world of size 2. The dealer is rank 2, CrypTen's trusted third party (TTP): it hands
out Beaver triples and other correlated randomness to the two parties and never sees an opened
value. The server encrypts (secret-shares) every plan tensor with src=0, the client its images
with src=1; the logits are revealed to the client only, as raw ring values decoded here.

``insecure_tfp=True`` uses CrypTen's TFP provider instead: no dealer, and the server generates
all triples itself, so it could decrypt everything. Benchmarks only; every result says so.

Each run_* call must run in a fresh process: CrypTen's state is global and its world size
cannot change inside a process. This is the only module that sets CrypTen's environment
variables and config. Every blocking step (rendezvous, each send/receive) times out after
``Rendezvous.timeout_s``, so a vanished peer raises instead of hanging.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import socket
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from . import engine as fast
from .crypten_compat import crypten_module
from .plan import SecurePlan, check_input, walk
from .profiling import LayerProfile, LayerRecorder, Profile, TrafficCounter

__all__ = ["ROLES", "Rendezvous", "LayerProfile", "Profile", "PartyResult", "SecureSessionError",
           "LocalRun",
           "run_server", "run_client", "run_dealer", "run_local", "run_local_parties"]

ROLES = {"server": 0, "client": 1, "dealer": 2}
ENGINES = ("fast", "crypten")  # fast: secure/engine.py; crypten: CrypTen's MPC tensors (the reference)
DEFAULT_ENGINE = "fast"
WORLD_SIZE = 2  # the computing parties; the dealer joins as an extra rank
OUTPUT_RANK = ROLES["client"]
log = logging.getLogger(__name__)


@dataclass
class Rendezvous:
    host: str  # where rank 0 (the server party) hosts the c10d TCP store
    port: int
    timeout_s: float = 60.0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass
class PartyResult:
    role: str
    logits: torch.Tensor | None  # client only: float64, N x classes
    profile: Profile | None
    insecure_tfp: bool

    def to_dict(self) -> dict:
        return {"role": self.role, "insecure_tfp": self.insecure_tfp,
                "logits": None if self.logits is None else self.logits.tolist(),
                "profile": None if self.profile is None else self.profile.to_dict()}


class SecureSessionError(RuntimeError):
    """The two parties disagree (plan, batch) or a peer failed, vanished or timed out."""


# -- party entry points ---------------------------------------------------------------------

def run_server(plan: SecurePlan, rdv: Rendezvous, batch_size: int | list[int], insecure_tfp: bool = False,
               engine: str = DEFAULT_ENGINE) -> PartyResult:
    """`batch_size`: one batch, or the sizes of several batches (queries) run in one session."""
    batches = _batch_list(batch_size)
    if engine == "fast":
        _, profile = _run_fast("server", rdv, plan.public_info(), batches, insecure_tfp, plan=plan)
        return PartyResult("server", None, profile, insecure_tfp)
    tensors = {name: plan.tensors[name] for name in sorted(plan.tensors)}
    profile = _run_party("server", plan.public_info(), tensors, None, _single(batches), rdv, insecure_tfp)
    return PartyResult("server", None, profile, insecure_tfp)


def run_client(public: dict, images: torch.Tensor | list[torch.Tensor], rdv: Rendezvous, insecure_tfp: bool = False,
               engine: str = DEFAULT_ENGINE) -> PartyResult:
    """`images`: the already-normalised float N x C x H x W batch, or a list of batches (one session)."""
    batches = [images] if isinstance(images, torch.Tensor) else list(images)
    for batch in batches:
        check_input(batch, public["input_shape"])
    if engine == "fast":
        logits, profile = _run_fast("client", rdv, public, [len(b) for b in batches], insecure_tfp,
                                    images=[b.float() for b in batches])
        return PartyResult("client", torch.cat(logits), profile, insecure_tfp)
    _single([len(b) for b in batches])
    batch = batches[0]
    shapes = {name: public["tensor_shapes"][name] for name in sorted(public["tensor_shapes"])}
    logits, profile = _run_party("client", public, shapes, batch.float(), len(batch), rdv, insecure_tfp)
    return PartyResult("client", logits, profile, insecure_tfp)


def run_dealer(rdv: Rendezvous, engine: str = DEFAULT_ENGINE) -> dict:
    """Serve correlated randomness until the server party is done; returns the dealer's traffic."""
    if engine == "fast":
        return _run_fast("dealer", rdv, None, None, False)
    return _serve_dealer(rdv)


def _batch_list(batch_size) -> list[int]:
    return [int(batch_size)] if isinstance(batch_size, int) else [int(b) for b in batch_size]


def _single(batches: list[int]) -> int:
    if len(batches) != 1:
        raise ValueError("the crypten engine runs one batch per session; use engine='fast' for several")
    return batches[0]


# -- the fast engine (secure/engine.py) -------------------------------------------------------

def _run_fast(role: str, rdv: Rendezvous, public: dict | None, batches: list[int] | None, insecure_tfp: bool,
              plan: SecurePlan | None = None, images: list[torch.Tensor] | None = None):
    torch.set_num_threads(1)  # the server raises its own count for the online convolutions
    try:
        channel = fast.connect(ROLES[role], rdv.host, rdv.port, rdv.timeout_s, insecure_tfp)
    except Exception as exc:  # DistNetworkError, RuntimeError: the peers did not all show up
        raise SecureSessionError(f"{role}: rendezvous at {rdv.url} failed within {rdv.timeout_s:g} s "
                                 f"({type(exc).__name__}: {exc})") from exc
    try:
        if role == "dealer":
            return fast.serve_dealer(channel)
        return fast.run_party(ROLES[role], channel, public, batches, fast.EngineConfig(), insecure_tfp, plan, images)
    except (RuntimeError, ValueError) as exc:  # gloo timeouts and resets are RuntimeErrors
        raise SecureSessionError(f"{role}: secure session failed ({type(exc).__name__}: {exc})") from exc
    finally:
        fast.disconnect()


# -- one party's session ----------------------------------------------------------------------

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
def _crypten_session(role: str, rdv: Rendezvous, insecure_tfp: bool):
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


def _run_party(role: str, public: dict, tensors: dict, images: torch.Tensor | None, batch_size: int,
               rdv: Rendezvous, insecure_tfp: bool):
    """The server passes real tensors and no images; the client tensor shapes and its images."""
    rank = ROLES[role]
    c, h, w = public["input_shape"]
    with _crypten_session(role, rdv, insecure_tfp) as crypten:
        start = time.perf_counter()
        communicator = crypten.communicator.get()
        counter = TrafficCounter(communicator)
        _check_agreement(communicator, public["plan_hash"], batch_size, (c, h, w))
        # Sharing with src=k sends nothing; the other party passes a tensor of the same shape.
        enc = {name: crypten.cryptensor(t if rank == 0 else torch.zeros(t), src=ROLES["server"])
               for name, t in tensors.items()}
        x = crypten.cryptensor(images if rank == 1 else torch.zeros(batch_size, c, h, w), src=ROLES["client"])
        setup_s = time.perf_counter() - start

        recorder = LayerRecorder(communicator, counter)
        with crypten.no_grad():
            out = walk(public["ops"], x, _mpc_layer(enc, recorder, batch_size))
            logits = recorder.record("output", "reveal", 0, lambda: _reveal_to_client(out))
        profile = Profile.from_layers(recorder.layers, setup_s, batch_size, insecure_tfp)
    return (logits, profile) if role == "client" else profile


def _check_agreement(communicator, plan_hash: str, batch_size: int, input_shape) -> None:
    """Both parties must run the same plan on the same batch shape, or the protocol desynchronises."""
    mine = torch.tensor([int(plan_hash[:15], 16), batch_size, *input_shape], dtype=torch.long)
    server, client = communicator.all_gather(mine)
    if not torch.equal(server, client):
        raise SecureSessionError(
            f"server and client disagree: plan {server[0]:x}... vs {client[0]:x}..., "
            f"batch {server[1]} vs {client[1]}, input {server[2:].tolist()} vs {client[2:].tolist()}")


def _mpc_layer(enc: dict, recorder: LayerRecorder, batch_size: int):
    """apply(op, inputs) for `walk`, on MPCTensors, recording each layer's profile."""
    def channel(name):
        return enc[name].view(1, -1, 1, 1)

    def compute(op, inputs):
        kind = op["op"]
        if kind == "conv":
            y = inputs[0].conv2d(enc[op["weight"]], stride=op["stride"], padding=op["padding"])
            return y if op["bias"] is None else y + channel(op["bias"])
        if kind == "scale_shift":
            return inputs[0] * channel(op["scale"]) + channel(op["shift"])
        if kind == "relu":
            return inputs[0].relu()
        if kind == "add":
            return inputs[0] + inputs[1]
        if kind == "avgpool":
            return inputs[0].mean(dim=(2, 3))  # sum, then division by a public integer (local truncation)
        if kind == "linear":
            return inputs[0].matmul(enc[op["weight"]].t()) + enc[op["bias"]]
        raise ValueError(f"unknown op {kind!r}")

    def apply(op, inputs):
        relus = op.get("relu_count", 0) * batch_size
        return recorder.record(op["name"], op["op"], relus, lambda: compute(op, inputs))
    return apply


def _reveal_to_client(out) -> torch.Tensor | None:
    """Open the logits to the client only and decode the ring values ourselves: CrypTen's
    FixedPointEncoder.decode rounds negative values about 1.0 too low."""
    ring = out._tensor.reveal(dst=OUTPUT_RANK)  # None at the server
    if ring is None:
        return None
    return ring.to(torch.float64) / out._tensor.encoder.scale


def _serve_dealer(rdv: Rendezvous) -> dict:
    """Run the dealer; returns its traffic (for tests and benchmarks)."""
    with _crypten_session("dealer", rdv, insecure_tfp=False) as crypten:
        counter = TrafficCounter(crypten.communicator.get())
        with warnings.catch_warnings():  # TTPServer calls crypten.init() again: "already initialized"
            warnings.simplefilter("ignore", RuntimeWarning)
            crypten.mpc.provider.TTPServer()  # loops until rank 0 sends "terminate"
        return {"bytes_sent": counter.sent, "bytes_received": counter.received}


# -- all parties on this machine (tests, benchmarks) -------------------------------------------

def run_local(plan: SecurePlan, images: torch.Tensor, insecure_tfp: bool = False, port: int | None = None,
              timeout_s: float = 60, engine: str = DEFAULT_ENGINE, batch_size: int | None = None) -> PartyResult:
    """Run server, client and dealer (no dealer with TFP) as fresh processes on 127.0.0.1 and
    return the client's result."""
    return run_local_parties(plan, images, insecure_tfp, port, timeout_s, engine=engine, batch_size=batch_size).client


@dataclass
class LocalRun:
    server: PartyResult
    client: PartyResult
    dealer: dict | None  # {"bytes_sent", "bytes_received"}; None with TFP
    pids: dict  # role -> process id: every party ran in its own process


def run_local_parties(plan: SecurePlan, images: torch.Tensor, insecure_tfp: bool = False,
                      port: int | None = None, timeout_s: float = 60, client_public: dict | None = None,
                      engine: str = DEFAULT_ENGINE, batch_size: int | None = None) -> LocalRun:
    """Like run_local, but returns every party's outcome. `client_public` gives the client another
    public description than `plan`'s (tests: a client holding a stale plan). `batch_size` splits
    `images` into several queries of one session (fast engine); by default they are one batch."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    rdv = Rendezvous("127.0.0.1", port or free_port(), timeout_s)
    roles = ["server", "client"] + ([] if insecure_tfp else ["dealer"])
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="secure-local-") as tmp:
        plan_path = os.path.join(tmp, "model.plan")
        plan.save(plan_path)  # each party loads it, as the images below: arguments stay small (run_processes)
        public = json.dumps(client_public or plan.public_info())  # only what crosses the network
        pixels_path = os.path.join(tmp, "images.npy")
        np.save(pixels_path, images.detach().float().numpy())
        procs = {role: ctx.Process(target=_local_party, name=f"secure-{role}", daemon=True,
                                   args=(role, plan_path, public, pixels_path, rdv, insecure_tfp, results, engine,
                                         batch_size or len(images)))
                 for role in roles}
        outcomes, pids = run_processes(procs, results, timeout_s)
    return LocalRun(server=_party_result(outcomes["server"]), client=_party_result(outcomes["client"]),
                    dealer=outcomes.get("dealer"), pids=pids)


def run_processes(procs: dict, results, timeout_s: float) -> tuple[dict, dict]:
    """Start every party process, collect each one's ("ok", payload with its "pid") from `results`,
    stop them all whatever happens; returns (role -> payload without the pid, role -> pid).

    The processes' arguments must stay small (paths, not tensors): spawn writes them into a pipe that
    the child reads only after importing __main__, so a child that dies there (a script without a
    `__main__` guard) would leave start() blocked on a full pipe instead of reporting the dead party."""
    try:
        for p in procs.values():
            p.start()
        outcomes = _collect(procs, results, deadline=time.monotonic() + 10 * timeout_s + 60)
    finally:
        _stop(procs.values())
    return outcomes, {role: outcome.pop("pid") for role, outcome in outcomes.items()}


def _local_party(role, plan_path, public_json, pixels_path, rdv, insecure_tfp, results, engine, batch_size) -> None:
    try:
        if role == "dealer":
            traffic = run_dealer(rdv, engine)
            results.put((role, "ok", {"pid": os.getpid(), **traffic}))
            return
        batches = list(torch.from_numpy(np.load(pixels_path)).split(batch_size))
        if role == "server":
            outcome = run_server(SecurePlan.load(plan_path), rdv, [len(b) for b in batches], insecure_tfp, engine)
        else:
            outcome = run_client(json.loads(public_json), batches, rdv, insecure_tfp, engine)
        results.put((role, "ok", {"pid": os.getpid(), **outcome.to_dict()}))
    except BaseException as exc:
        results.put((role, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _collect(procs: dict, results, deadline: float) -> dict:
    outcomes = {}
    while len(outcomes) < len(procs):
        try:
            role, status, payload = results.get(timeout=0.5)
        except queue.Empty:
            dead = [r for r, p in procs.items() if r not in outcomes and not p.is_alive()]
            if dead:
                # a result put just before exiting may still be in flight
                try:
                    role, status, payload = results.get(timeout=2.0)
                except queue.Empty:
                    raise SecureSessionError(f"party {dead[0]} exited with code "
                                             f"{procs[dead[0]].exitcode} without a result") from None
            elif time.monotonic() > deadline:
                waiting = sorted(set(procs) - set(outcomes))
                raise SecureSessionError(f"local secure run timed out; waiting for {waiting}")
            else:
                continue
        if status == "error":
            raise SecureSessionError(_failures(role, payload, results))
        outcomes[role] = payload
    return outcomes


def _failures(role: str, payload: str, results) -> str:
    """The first failure plus any other party's that follows shortly: the root cause may be
    in the party that reports second (a crash at one end shows as a reset at the other)."""
    failures = [f"party {role} failed: {payload}"]
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            other, status, text = results.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if status == "error":
            failures.append(f"party {other} failed: {text}")
    return "\n".join(failures)


def _party_result(d: dict) -> PartyResult:
    logits = None if d["logits"] is None else torch.tensor(d["logits"], dtype=torch.float64)
    profile = None if d["profile"] is None else Profile.from_dict(d["profile"])
    return PartyResult(d["role"], logits, profile, d["insecure_tfp"])


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.join(timeout=5)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
