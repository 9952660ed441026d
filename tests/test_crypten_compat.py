"""CrypTen 0.4.1 imports on current torch through secure.reference.crypten_compat, and nowhere else."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SINGLE_PARTY = """
import torch
from secure.reference.crypten_compat import crypten_module
crypten = crypten_module()
assert crypten_module() is crypten
crypten.init()  # single party: no peers
try:
    x = torch.tensor([[1.5, -2.25, 3.0], [0.0, -0.5, 100.125]])
    enc = crypten.cryptensor(x)
    assert crypten.is_encrypted_tensor(enc)
    assert enc.share.dtype == torch.int64
    back = enc.get_plain_text()
    assert torch.allclose(back, x, atol=1e-4), back
    doubled = (enc + enc).get_plain_text()
    assert torch.allclose(doubled, 2 * x, atol=1e-4), doubled
finally:
    crypten.uninit()
print("ok")
"""


def test_crypten_imports_encrypts_and_decrypts():
    # A fresh interpreter: CrypTen's state is process-global and must not leak into other tests.
    out = subprocess.run([sys.executable, "-c", SINGLE_PARTY], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_crypten_is_imported_only_by_the_compat_module():
    pattern = re.compile(r"^\s*(import crypten|from crypten[ .])", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for d in ("deepreduce", "secure", "server", "client")
                 for p in (ROOT / d).rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == ["secure/reference/crypten_compat.py"]
