"""Small datasets written inside tests: random images, class-folder trees, tarballs, CIFAR pickles."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


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


def write_cifar_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
