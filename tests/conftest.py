"""Shared fixtures for the deepreduce test suite.

Dataset cache
-------------
`deepreduce.data` caches decoded datasets under ``$DEEPREDUCE_CACHE``. Two caches are used here:

* the real CIFAR-10 archive (``../shared/data/cifar10-jpeg.tar.gz``, or ``$DEEPREDUCE_TEST_CIFAR10``)
  is decoded once (about 20 s) into a *persistent* cache that is reused by later test runs:
  ``$DEEPREDUCE_CACHE`` when it is set, otherwise ``~/.cache/deepreduce-test``. (A directory under
  pytest's basetemp would be thrown away after each run, so every run would pay the decode.)
* every deepreduce test gets its own empty cache directory (``tmp_path/cache``, fixture
  ``deepreduce_env``), so the small datasets built inside tests never pile up in the persistent cache
  and a test's cache hits are its own.
"""

from __future__ import annotations

import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from secure.control.protocol import free_port  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent
CIFAR10_TAR = Path(os.environ.get("DEEPREDUCE_TEST_CIFAR10")
                   or ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
PERSISTENT_CACHE = os.environ.get("DEEPREDUCE_CACHE") or os.path.expanduser("~/.cache/deepreduce-test")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def deepreduce_env(tmp_path, monkeypatch):
    """A private dataset cache (see the module docstring) and one intra-op thread for the test.

    The deepreduce test modules use it for every test (``pytestmark``). One thread is fastest for the
    small models here on a 2-core CPU and immune to oversubscription when other processes share the
    cores; subprocesses get the same through OMP_NUM_THREADS=1 (see subprocess_env).
    """
    monkeypatch.setenv("DEEPREDUCE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar10_arg() -> str:
    if not CIFAR10_TAR.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR10_TAR} (set DEEPREDUCE_TEST_CIFAR10)")
    return f"folder:{CIFAR10_TAR}"


@pytest.fixture(scope="session")
def cifar10(cifar10_arg):
    """The real CIFAR-10 (50,000 + 10,000 images), decoded once into the persistent cache."""
    from deepreduce.data import load_dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPREDUCE_CACHE", PERSISTENT_CACHE)
        return load_dataset(cifar10_arg, progress=False)


def subprocess_env(**extra) -> dict:
    """Environment for `python -m deepreduce ...` children: this checkout importable, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# -- small datasets built inside tests ------------------------------------------------------------

def random_images(rng: np.random.Generator, n: int, size: int, channels: int = 3) -> np.ndarray:
    """n x H x W x C uint8 (C == 1 gives n x H x W)."""
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_image_tree(root: Path, splits: dict, size: int = 8, channels: int = 3, seed: int = 0,
                     suffix: str = ".png") -> dict:
    """Write ``root/<split>/<class>/NNNN.png`` for splits like {"train": {"cat": 3, "dog": 2}, ...}.

    Returns {split: (images N x H x W x C uint8 in sorted (class, file) order, labels, classes)}.
    PNG is lossless, so the returned arrays are the exact pixels a loader must produce.
    """
    rng = np.random.default_rng(seed)
    classes = sorted(splits["train"])
    out = {}
    for split, counts in splits.items():
        images, labels = [], []
        for cls in sorted(counts):
            cdir = root / split / cls
            cdir.mkdir(parents=True, exist_ok=True)
            for i in range(counts[cls]):
                arr = random_images(rng, 1, size, channels)[0]
                Image.fromarray(arr, mode="L" if channels == 1 else "RGB").save(cdir / f"{i:04d}{suffix}")
                images.append(arr if channels == 3 else arr[..., None])
                labels.append(classes.index(cls) if cls in classes else -1)
        out[split] = (np.stack(images), np.asarray(labels), classes)
    return out


def make_tar(src: Path, dest: Path, arcname: str | None = None) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=arcname if arcname is not None else ".")
    return dest


@pytest.fixture
def tiny_folder(tmp_path) -> tuple[str, dict]:
    """A 3-class 8x8 RGB PNG folder tree (12 train / 6 test images) -> (--data argument, truth)."""
    root = tmp_path / "tiny"
    truth = write_image_tree(root, {"train": {"ant": 4, "bee": 4, "cow": 4}, "test": {"ant": 2, "bee": 2, "cow": 2}})
    return f"folder:{root}", truth


def write_cifar_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepreduce", *args]
