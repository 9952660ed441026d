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

import pytest
import torch

from support.datasets import write_image_tree
from support.env import CIFAR10_TAR, PERSISTENT_CACHE
from support.roles import IMAGES, write_plan

# The helpers that used to live here, for modules still written `from conftest import ...` (new code
# imports them from support.*): drop once none is left.
from support.datasets import make_tar, random_images, write_cifar_pickle  # noqa: F401
from support.env import CIFAR10_CLASSES, ROOT, free_port, python_cmd, subprocess_env  # noqa: F401


@pytest.fixture
def deepreduce_env(tmp_path, monkeypatch):
    """A private dataset cache (see the module docstring) and one intra-op thread for the test.

    The deepreduce test modules use it for every test (``pytestmark``). One thread is fastest for the
    small models here on a 2-core CPU and immune to oversubscription when other processes share the
    cores; subprocesses get the same through OMP_NUM_THREADS=1 (see support.env.subprocess_env).
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


@pytest.fixture
def tiny_folder(tmp_path) -> tuple[str, dict]:
    """A 3-class 8x8 RGB PNG folder tree (12 train / 6 test images) -> (--data argument, truth)."""
    root = tmp_path / "tiny"
    truth = write_image_tree(root, {"train": {"ant": 4, "bee": 4, "cow": 4}, "test": {"ant": 2, "bee": 2, "cow": 2}})
    return f"folder:{root}", truth


# -- the secure roles' test plan ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    """A random-weight ResNet18 (alpha 0.25, culled, thinned) exported to a secure plan."""
    if len(IMAGES) < 4:
        pytest.skip("demo/images holds fewer than 4 CIFAR-10 images")
    return write_plan(tmp_path_factory.mktemp("plan"))


@pytest.fixture(scope="module")
def plan(plan_file):
    from secure.core.plan import SecurePlan
    return SecurePlan.load(str(plan_file))
