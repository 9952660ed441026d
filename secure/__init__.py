"""Secure inference: plans, the two engines, the control plane and the evaluation tools.

    secure.core       the secure computation: plan format and export, ring arithmetic, dealer
                      correlations, the fast engine, channels, the party entry points
    secure.reference  the reference engine: CrypTen's MPC tensors with its TTP as the dealer
    secure.control    the control plane: messages, authentication, the service loop, party worker
                      processes, query limits, the dealer service (`pi-dealer`)
    secure.tools      evaluation: the local three-party harness, agreement, cost measurement, the
                      benchmark against stock CrypTen, network testbeds and models

Common names are importable from here (`from secure import SecurePlan, run_local`); they load lazily,
so `import secure` alone loads no torch (the role processes announce their port before that).
See docs/ARCHITECTURE.md.
"""

import importlib
import os

# Party processes are spawned from processes that import this package. With OpenMP's default active
# wait, the server's idle intra-op threads spin between its online convolutions and take the core
# the client needs for its part of the next ReLU round; passive waiting avoids that. Set before any
# child imports torch (libgomp reads it once, at load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_EXPORTS = {
    "SecurePlan": "secure.core.plan", "PublicPlan": "secure.core.plan",
    "run_plaintext": "secure.core.plaintext", "predict_files": "secure.core.plaintext",
    "export_plan": "secure.core.export", "plan_from_checkpoint": "secure.core.export",
    "load_plan_or_checkpoint": "secure.core.export", "export_module": "secure.core.export",
    "Role": "secure.core.party", "ROLES": "secure.core.party", "Rendezvous": "secure.core.party",
    "PartyResult": "secure.core.party", "SecureSessionError": "secure.core.party",
    "ENGINES": "secure.core.runtime", "DEFAULT_ENGINE": "secure.core.runtime",
    "run_server": "secure.core.runtime", "run_client": "secure.core.runtime", "run_dealer": "secure.core.runtime",
    "Profile": "secure.core.profiling", "LayerProfile": "secure.core.profiling",
    "run_local": "secure.tools.local", "run_local_parties": "secure.tools.local", "LocalRun": "secure.tools.local",
    "measure_cost": "secure.tools.measure", "measure_agreement": "secure.tools.agreement",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
