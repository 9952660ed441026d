"""Imported once by the party fork server (`secure.control.workers`): torch, the secure runtime and CrypTen,
so that each session's party process is a fork that starts in milliseconds instead of a fresh
interpreter that spends seconds importing them. A failure is recorded, not raised: the party
process reports it when its job arrives."""

FAILURE = None
try:
    import torch

    torch.set_num_threads(1)  # CrypTen parties hang with several intra-op threads (CrypTen #88)
    import secure.core.runtime  # noqa: F401
    import secure.core.engine  # noqa: F401 - the registry loads engines when first asked: load both here
    import secure.reference.engine  # noqa: F401
    from secure.reference.crypten_compat import crypten_module

    crypten_module()
except Exception as exc:  # noqa: BLE001 - reported by the party process
    FAILURE = f"cannot load the secure runtime ({type(exc).__name__}: {exc})"
