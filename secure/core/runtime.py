"""The party entry points of a secure session, and the engine registry behind them.

An engine (`secure.core.party.Engine`) runs one role of one session in the calling process; this
module checks the inputs and picks the engine by name. Engines are imported when first used, so a
process that runs the fast engine never loads CrypTen:

    fast     this project's dealer-assisted protocol (`secure.core.engine`, docs/PROTOCOL.md)
    crypten  CrypTen's MPC tensors with its TTP as the dealer (`secure.reference.engine`), the reference

The fast engine runs one of its ReLU protocols (`relu_protocol`: gmw, fss or fss-exact, `secure.core.party.RELU_PROTOCOLS`);
"auto" is resolved before a session (`secure.core.costmodel.resolve_relu_protocol`), never here. The CrypTen
engine runs CrypTen's own comparison: it takes the default ("gmw") and refuses "fss".

Each call must run in a fresh process (gloo's process group and CrypTen's state are per process).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from secure.core.party import (DEFAULT_ENGINE, ENGINES, RELU_PROTOCOLS, ROLES, DealerLimits, Engine, PartyResult,
                               Rendezvous, SecureSessionError)
from secure.core.plaintext import check_input
from secure.core.plan import PublicPlan, SecurePlan


DEFAULT_RELU_PROTOCOL = "gmw"  # what a party runs when nobody chose (today's protocol)
CRYPTEN_RELU_REFUSAL = ("the crypten engine has its own ReLU protocol; --relu-protocol applies to the fast engine")


def _fast(relu_protocol: str = DEFAULT_RELU_PROTOCOL) -> Engine:
    from secure.core.engine import EngineConfig, FastEngine
    return FastEngine(EngineConfig(relu_protocol=relu_protocol))


def _crypten(relu_protocol: str = DEFAULT_RELU_PROTOCOL) -> Engine:
    from secure.reference.engine import CryptenEngine
    return CryptenEngine()  # CrypTen's own comparison (check_relu_protocol refused anything else)


ENGINE_FACTORIES: dict[str, Callable[[str], Engine]] = {"fast": _fast, "crypten": _crypten}
assert tuple(ENGINE_FACTORIES) == ENGINES, "secure.core.party.ENGINES names the registered engines"

__all__ = ["CRYPTEN_RELU_REFUSAL", "DEFAULT_ENGINE", "DEFAULT_RELU_PROTOCOL", "ENGINES", "RELU_PROTOCOLS", "ROLES",
           "PartyResult", "Rendezvous", "SecureSessionError", "check_relu_protocol", "get_engine", "run_client",
           "run_dealer", "run_server"]


def check_relu_protocol(relu_protocol: str, engine: str = DEFAULT_ENGINE) -> str:
    """`relu_protocol` if `engine` can run it; a ValueError naming the choices otherwise."""
    if relu_protocol not in RELU_PROTOCOLS:
        hint = (" (\"auto\" is resolved before a session starts: secure.core.costmodel.resolve_relu_protocol)"
                if relu_protocol == "auto" else "")
        raise ValueError(f"unknown ReLU protocol {str(relu_protocol)[:32]!r}: one of {', '.join(RELU_PROTOCOLS)}{hint}")
    if engine == "crypten" and relu_protocol != DEFAULT_RELU_PROTOCOL:
        raise ValueError(CRYPTEN_RELU_REFUSAL)
    return relu_protocol


def get_engine(name: str, relu_protocol: str = DEFAULT_RELU_PROTOCOL) -> Engine:
    if name not in ENGINE_FACTORIES:
        raise ValueError(f"unknown engine {name!r}: one of {', '.join(ENGINES)}")
    return ENGINE_FACTORIES[name](check_relu_protocol(relu_protocol, name))


def _mark(profile, engine: str, relu_protocol: str):
    """The profile says which ReLU protocol ran ("" for the crypten engine: CrypTen's own)."""
    if profile is not None:
        profile.relu_protocol = relu_protocol if engine == "fast" else ""
    return profile


def run_server(plan: SecurePlan, rdv: Rendezvous, batch_sizes: list[int], insecure_tfp: bool = False,
               engine: str = DEFAULT_ENGINE, relu_protocol: str = DEFAULT_RELU_PROTOCOL) -> PartyResult:
    """`batch_sizes`: the size of each query (batch) of the session, in order. `relu_protocol`: the fast
    engine's ReLU protocol, gmw or fss (both parties must run the same one)."""
    profile = get_engine(engine, relu_protocol).run_server(plan, rdv, [int(b) for b in batch_sizes], insecure_tfp)
    return PartyResult("server", None, _mark(profile, engine, relu_protocol), insecure_tfp)


def run_client(public: PublicPlan, batches: list[torch.Tensor], rdv: Rendezvous, insecure_tfp: bool = False,
               engine: str = DEFAULT_ENGINE, relu_protocol: str = DEFAULT_RELU_PROTOCOL) -> PartyResult:
    """`batches`: the session's queries, each an already-normalised float N x C x H x W batch.
    `relu_protocol`: as for run_server."""
    engine_impl = get_engine(engine, relu_protocol)  # a bad choice fails before the inputs are checked
    for batch in batches:
        check_input(batch, public.input_shape)
    logits, profile = engine_impl.run_client(public, list(batches), rdv, insecure_tfp)
    return PartyResult("client", logits, _mark(profile, engine, relu_protocol), insecure_tfp)


def run_dealer(rdv: Rendezvous, engine: str = DEFAULT_ENGINE, limits: DealerLimits | None = None) -> dict:
    """Serve correlated randomness until the server party is done; returns the dealer's traffic."""
    return get_engine(engine).run_dealer(rdv, limits or DealerLimits())


def run_warm(role: str, rdv, public: PublicPlan, settings, relu_protocol: str = DEFAULT_RELU_PROTOCOL, plan=None,
             next_images=None, answer=None, pools: list | None = None):
    """One computing party's warm session (`secure.core.stream`: queries as they come, each on material
    prepared ahead); the fast engine only. Returns its `StreamSummary`."""
    from secure.core.engine import EngineConfig
    from secure.core.stream import run_stream
    config = EngineConfig(relu_protocol=check_relu_protocol(relu_protocol))
    return run_stream(role, rdv, public, settings, config, plan, next_images, answer, pools)
