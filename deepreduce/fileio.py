"""Atomic file writes: a temp file in the target's directory, then a rename.

A kill at any point leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


TEMP_PREFIX = ".tmp-"


@contextmanager
def atomic_output(path: str, mode: str = "wb"):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temps(directory: str) -> list[str]:
    """Delete the temp files a SIGKILLed writer left in `directory` (a 20 MB checkpoint each); for
    directories one process owns, such as a training run's on --resume. Returns what was removed."""
    if not os.path.isdir(directory):
        return []
    stale = [os.path.join(directory, name) for name in os.listdir(directory) if name.startswith(TEMP_PREFIX)]
    for path in stale:
        os.unlink(path)
    return stale


def atomic_write_text(path: str, text: str) -> None:
    with atomic_output(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str, obj) -> None:
    """Indented JSON with a final newline (the format of every JSON file the project writes)."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_write_bytes(path: str, chunks: list[bytes]) -> None:
    with atomic_output(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


def atomic_torch_save(obj, path: str) -> None:
    import torch  # only callers that save tensors pay for the import

    with atomic_output(path, "wb") as f:
        torch.save(obj, f)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
