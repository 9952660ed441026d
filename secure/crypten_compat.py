"""The one place that imports CrypTen (0.4.1), patched to load on current torch.

CrypTen's ONNX converter imports ``torch.onnx._internal.registration``, which torch moved to
``torch.onnx._internal.torchscript_exporter.registration``. Aliasing the new module under the old
name before the import is enough: this project never uses the converter itself.
"""

from __future__ import annotations

import importlib
import sys

_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"

_crypten = None


def _alias_moved_torch_modules() -> None:
    if _OLD_REGISTRATION in sys.modules:
        return
    try:
        importlib.import_module(_OLD_REGISTRATION)  # an older torch still has it
    except ImportError:
        sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)


def crypten_module():
    """Import CrypTen on first use (it is slow to import) and return the module."""
    global _crypten
    if _crypten is None:
        _alias_moved_torch_modules()
        import crypten  # noqa: PLC0415 - the project's only import of crypten

        _crypten = crypten
    return _crypten
