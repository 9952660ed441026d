"""The party entry points of a secure session, and the engine registry behind them.

An engine (`secure.core.party.Engine`) runs one role of one session in the calling process; this
module checks the inputs and picks the engine by name. Engines are imported when first used, so a
process that runs the fast engine never loads CrypTen:

    fast     this project's dealer-assisted protocol (`secure.core.engine`, docs/PROTOCOL.md)
    crypten  CrypTen's MPC tensors with its TTP as the dealer (`secure.reference.engine`), the reference

Each call must run in a fresh process (gloo's process group and CrypTen's state are per process).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from secure.core.party import (DEFAULT_ENGINE, ENGINES, ROLES, DealerLimits, Engine, PartyResult, Rendezvous,
                               SecureSessionError)
from secure.core.plaintext import check_input
from secure.core.plan import PublicPlan, SecurePlan


def _fast() -> Engine:
    from secure.core.engine import FastEngine
    return FastEngine()


def _crypten() -> Engine:
    from secure.reference.engine import CryptenEngine
    return CryptenEngine()


ENGINE_FACTORIES: dict[str, Callable[[], Engine]] = {"fast": _fast, "crypten": _crypten}
assert tuple(ENGINE_FACTORIES) == ENGINES, "secure.core.party.ENGINES names the registered engines"

__all__ = ["DEFAULT_ENGINE", "ENGINES", "ROLES", "PartyResult", "Rendezvous", "SecureSessionError",
           "get_engine", "run_client", "run_dealer", "run_server"]


def get_engine(name: str) -> Engine:
    if name not in ENGINE_FACTORIES:
        raise ValueError(f"unknown engine {name!r}: one of {', '.join(ENGINES)}")
    return ENGINE_FACTORIES[name]()


def run_server(plan: SecurePlan, rdv: Rendezvous, batch_sizes: list[int], insecure_tfp: bool = False,
               engine: str = DEFAULT_ENGINE) -> PartyResult:
    """`batch_sizes`: the size of each query (batch) of the session, in order."""
    profile = get_engine(engine).run_server(plan, rdv, [int(b) for b in batch_sizes], insecure_tfp)
    return PartyResult("server", None, profile, insecure_tfp)


def run_client(public: PublicPlan, batches: list[torch.Tensor], rdv: Rendezvous, insecure_tfp: bool = False,
               engine: str = DEFAULT_ENGINE) -> PartyResult:
    """`batches`: the session's queries, each an already-normalised float N x C x H x W batch."""
    for batch in batches:
        check_input(batch, public.input_shape)
    logits, profile = get_engine(engine).run_client(public, list(batches), rdv, insecure_tfp)
    return PartyResult("client", logits, profile, insecure_tfp)


def run_dealer(rdv: Rendezvous, engine: str = DEFAULT_ENGINE, limits: DealerLimits | None = None) -> dict:
    """Serve correlated randomness until the server party is done; returns the dealer's traffic."""
    return get_engine(engine).run_dealer(rdv, limits or DealerLimits())
