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


# -- crypten.nn.from_pytorch on current torch (the "stock CrypTen" path of `deepreduce bench`) -------

_from_pytorch_patched = False


def patch_from_pytorch():
    """Make ``crypten.nn.from_pytorch`` work on torch 2.13 with the smallest change; returns crypten.

    Two things break it: ``torch.onnx.export`` now defaults to the dynamo exporter (which needs
    onnxscript), so CrypTen's export helper is replaced by the same call with ``dynamo=False``
    (the TorchScript exporter CrypTen was written for); and that exporter may emit ONNX
    ``Identity`` nodes, which CrypTen has no module for (upstream #418, #455, #508), so an
    ``Identity`` module is added to ``onnx_converter.ONNX_TO_CRYPTEN``. Idempotent.
    """
    global _from_pytorch_patched
    crypten = crypten_module()
    if _from_pytorch_patched:
        return crypten
    import warnings

    import torch
    from crypten.nn import module, onnx_converter  # noqa: PLC0415 - CrypTen internals live here only

    def export_torchscript(f, pytorch_model, dummy_input):
        with warnings.catch_warnings():  # "legacy TorchScript-based ONNX export": chosen on purpose
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(pytorch_model, dummy_input, f, do_constant_folding=False, export_params=True,
                              input_names=["input"], operator_export_type=torch.onnx.OperatorExportTypes.ONNX,
                              output_names=["output"], opset_version=onnx_converter._OPSET_VERSION, dynamo=False)
        return f

    class Identity(module.Module):
        """ONNX ``Identity``: returns its input."""

        def forward(self, x):
            return x

        @staticmethod
        def from_onnx(attributes=None):
            return Identity()

    onnx_converter._export_pytorch_model = export_torchscript
    onnx_converter.ONNX_TO_CRYPTEN.setdefault("Identity", Identity)
    _from_pytorch_patched = True
    return crypten
