"""Stock CrypTen: the private-inference path a CrypTen user would write, for `deepreduce bench`.

The plaintext PyTorch model of a checkpoint with its batch-norm layers *left in* (`Checkpoint.build()`)
is converted with ``crypten.nn.from_pytorch`` (made to run on torch 2.13 by
`crypten_compat.patch_from_pytorch`: TorchScript ONNX export and an ``Identity`` module, nothing
else), the server encrypts it with ``model.encrypt(src=0)``, the client builds the same architecture
with placeholder weights (CrypTen needs a module of the same structure to receive its shares: it
never sees the weights) and encrypts its input with ``src=1``; the logits are revealed to the client
only. The dealer is CrypTen's TTP, as in the reference engine (`secure.reference.engine`), whose session
helpers (rendezvous, timeouts, teardown, dealer) this module reuses, so both runtimes run in the same security setting.

Per session: ``offline_s`` = rendezvous + model encryption (+ a barrier, so the online phase of the
two parties starts together), measured at the server; the ONNX conversion (plaintext, once per model)
is ``convert_s`` and not part of it. Per query: the client's ``online_s`` runs from the encryption of
its input to the revealed logits; each party's profile holds bytes (`TrafficCounter`), rounds
(CrypTen's communicator statistics) and per-module times, with the same keys as
`secure.core.profiling.Profile`. A session answers several queries on the once-encrypted model.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from deepreduce.checkpoint import Checkpoint, load_checkpoint, random_checkpoint
from deepreduce.spec import ModelSpec
from secure.control.protocol import free_port
from secure.core.party import ROLES, Rendezvous
from secure.reference.crypten_compat import patch_from_pytorch
from secure.reference.engine import (LayerRecorder, TrafficCounter, check_agreement, crypten_session,
                                     reveal_to_client, serve_dealer)
from secure.tools.local import run_processes

PLACEHOLDER_SEED = 20_240_601  # the client's placeholder weights (any values do)

__all__ = ["StockRun", "plaintext_logits", "run_stock_local"]


@dataclass
class StockRun:
    server: dict  # offline_s, convert_s, setup_s, queries: [profile dict per query]
    client: dict  # offline_s, convert_s, queries: [profile dict + "logits" per query]
    dealer: dict  # {"bytes_sent", "bytes_received"}
    pids: dict  # role -> process id

    @property
    def logits(self) -> list[torch.Tensor]:
        return [torch.tensor(q["logits"], dtype=torch.float64) for q in self.client["queries"]]


def plaintext_logits(ckpt: Checkpoint, x: torch.Tensor) -> torch.Tensor:
    """The reference: the PyTorch eval model (batch-norm in), float64."""
    with torch.no_grad():
        return ckpt.build().double()(x.double())


def stock_session_hash(crypten, cmodel, queries: int) -> str:
    """What both parties must agree on: the converted graph's structure (modules, edges, parameter
    shapes: the client has no weights to hash) and the number of queries in the session."""
    nodes = []
    for name, mod in cmodel._modules.items():
        shape = list(mod.data.shape) if isinstance(mod, crypten.nn.Parameter) else None
        nodes.append([name, type(mod).__name__, cmodel._graph.get(name), shape])
    text = json.dumps({"graph": nodes, "queries": queries}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# -- one party --------------------------------------------------------------------------------

def _convert(crypten, model: torch.nn.Module, spec: ModelSpec, batch_size: int):
    dummy = torch.zeros(batch_size, spec.in_channels, spec.input_size, spec.input_size)
    start = time.perf_counter()
    with warnings.catch_warnings():  # CrypTen's converter: "The given NumPy array is not writable"
        warnings.simplefilter("ignore", UserWarning)
        cmodel = crypten.nn.from_pytorch(model.eval(), dummy)
    return cmodel, time.perf_counter() - start


def _instrument(crypten, cmodel, recorder: LayerRecorder) -> None:
    """Record time, traffic and rounds of every op module of the converted graph (not the
    parameter nodes); a ReLU module is recorded as op "relu" with its element count."""
    for name, mod in cmodel._modules.items():
        if isinstance(mod, crypten.nn.Parameter):
            continue
        kind = "relu" if isinstance(mod, crypten.nn.ReLU) else type(mod).__name__.lower()

        def timed(x, _forward=type(mod).forward.__get__(mod), _name=name, _kind=kind):
            relus = x.nelement() if _kind == "relu" else 0
            return recorder.record(_name, _kind, relus, lambda: _forward(x))
        mod.__dict__["forward"] = timed  # CrypTen's Module.__getattribute__ resolves forward on the instance


def _profile(layers, online_s: float, batch_size: int) -> dict:
    relu = [lp for lp in layers if lp.op == "relu"]
    other = [lp for lp in layers if lp.op != "relu"]
    relu_s = sum(lp.seconds for lp in relu)
    return {"online_s": online_s, "batch_size": batch_size,
            "bytes_sent": sum(lp.bytes_sent for lp in layers),
            "bytes_received": sum(lp.bytes_received for lp in layers),
            "rounds": sum(lp.rounds for lp in layers),
            # ReLU modules, and everything else (other modules, CrypTen's graph bookkeeping, the reveal)
            "relu_s": relu_s, "linear_s": max(0.0, online_s - relu_s),
            "relu_bytes": sum(lp.bytes_sent + lp.bytes_received for lp in relu),
            "linear_bytes": sum(lp.bytes_sent + lp.bytes_received for lp in other),
            "relu_count": sum(lp.relu_count for lp in relu),
            "layers": [vars(lp).copy() for lp in layers]}


def _run_stock_party(role: str, ckpt: Checkpoint | None, spec: ModelSpec, batches: list[torch.Tensor] | None,
                     batch_size: int, queries: int, rdv: Rendezvous) -> dict:
    """The server passes the checkpoint (weights) and no images; the client the spec and its batches."""
    crypten = patch_from_pytorch()  # import before the clock starts
    rank = ROLES[role]
    # The client only knows the architecture: it builds it with placeholder weights. They must be
    # random, not PyTorch's initial batch-norm statistics: the ONNX exporter merges initializers of
    # equal value, which would give the client another graph than the server's.
    model = ckpt.build() if role == "server" else random_checkpoint(spec, seed=PLACEHOLDER_SEED).build()
    cmodel, convert_s = _convert(crypten, model, spec, batch_size)
    shape = (batch_size, spec.in_channels, spec.input_size, spec.input_size)
    start = time.perf_counter()
    with crypten_session(role, rdv, insecure_tfp=False) as crypten:
        communicator = crypten.communicator.get()
        counter = TrafficCounter(communicator)
        check_agreement(communicator, stock_session_hash(crypten, cmodel, queries), batch_size, shape[1:])
        cmodel.encrypt(src=ROLES["server"])
        communicator.barrier()  # the online phase starts at both parties together
        offline_s = time.perf_counter() - start
        recorder = LayerRecorder(communicator, counter)
        _instrument(crypten, cmodel, recorder)
        results = []
        for q in range(queries):
            recorder.layers = []
            t0 = time.perf_counter()
            x = recorder.record("input", "encrypt_input", 0,
                                lambda: crypten.cryptensor(batches[q] if rank == 1 else torch.zeros(shape),
                                                           src=ROLES["client"]))
            with crypten.no_grad():
                out = cmodel(x)
                logits = recorder.record("output", "reveal", 0, lambda: reveal_to_client(out))
            profile = _profile(recorder.layers, time.perf_counter() - t0, batch_size)
            if role == "client":
                profile["logits"] = logits.tolist()
            results.append(profile)
            communicator.barrier()  # the next query starts at both parties together
    return {"role": role, "offline_s": offline_s, "setup_s": offline_s, "convert_s": convert_s, "queries": results}


# -- all parties on this machine ----------------------------------------------------------------

def run_stock_local(ckpt: Checkpoint, batches: list[torch.Tensor], timeout_s: float = 120,
                    port: int | None = None) -> StockRun:
    """Server, client and dealer as fresh processes on 127.0.0.1; one session, one query per batch
    (`batches`: normalised N x C x H x W tensors of one shape)."""
    if not batches or any(b.shape != batches[0].shape for b in batches):
        raise ValueError("run_stock_local needs one or more batches of the same shape")
    spec = ckpt.spec
    expected = (spec.in_channels, spec.input_size, spec.input_size)
    if batches[0].dim() != 4 or tuple(batches[0].shape[1:]) != expected:
        raise ValueError(f"batches have shape {tuple(batches[0].shape)}, the model expects N x {expected}")
    rdv = Rendezvous("127.0.0.1", port or free_port(), timeout_s)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="secure-stock-") as tmp:
        ckpt_path = os.path.join(tmp, "model.pt")
        ckpt.save(ckpt_path)  # only the server process reads it
        spec_json = json.dumps(spec.to_dict())
        pixels_path = os.path.join(tmp, "images.npy")  # queries x N x C x H x W; arguments stay small (run_processes)
        np.save(pixels_path, torch.stack(batches).detach().float().numpy())
        procs = {role: ctx.Process(target=_local_stock_party, name=f"stock-{role}", daemon=True,
                                   args=(role, ckpt_path, spec_json, pixels_path, rdv, results))
                 for role in ("server", "client", "dealer")}
        outcomes, pids = run_processes(procs, results, timeout_s)
    return StockRun(server=outcomes["server"], client=outcomes["client"], dealer=outcomes["dealer"], pids=pids)


def _local_stock_party(role, ckpt_path, spec_json, pixels_path, rdv, results) -> None:
    try:
        if role == "dealer":
            traffic = serve_dealer(rdv)
            results.put((role, "ok", {"pid": os.getpid(), **traffic}))
            return
        spec = ModelSpec.from_dict(json.loads(spec_json))
        pixels = torch.from_numpy(np.load(pixels_path))
        queries, batch_size = pixels.shape[:2]
        if role == "server":
            outcome = _run_stock_party("server", load_checkpoint(ckpt_path), spec, None, batch_size, queries, rdv)
        else:
            batches = list(pixels)
            outcome = _run_stock_party("client", None, spec, batches, batch_size, queries, rdv)
        results.put((role, "ok", {"pid": os.getpid(), **outcome}))
    except BaseException as exc:
        results.put((role, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
