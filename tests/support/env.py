"""Where things are and how child processes start: the checkout, the real CIFAR-10 archive and its
persistent decode cache (see tests/conftest.py), and the environment of `python -m deepreduce` children."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from secure.control.protocol import free_port  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent.parent
CIFAR10_TAR = Path(os.environ.get("DEEPREDUCE_TEST_CIFAR10")
                   or ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
PERSISTENT_CACHE = os.environ.get("DEEPREDUCE_CACHE") or os.path.expanduser("~/.cache/deepreduce-test")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def subprocess_env(**extra) -> dict:
    """Environment for `python -m deepreduce ...` children: this checkout importable, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepreduce", *args]
