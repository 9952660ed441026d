"""The images of a folder and the true label their place names: the inputs of `make demo` and of the
container's demo client."""

from __future__ import annotations

import os
from pathlib import Path

from deepreduce.data import IMAGE_SUFFIXES


def image_files(folder: str, hint: str) -> list[str]:
    """Every image file below `folder`, sorted. ValueError (one line ending in `hint`, what the user
    should do) when the folder is missing or holds no image."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder} does not exist: {hint}")
    paths = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images (.png, .jpg, ...) in {folder}: {hint}")
    return paths


def true_label(path: str, root: str, classes: list[str]) -> str | None:
    """The parent folder's name (below `root`), or the file name's prefix as in cat_0123.png."""
    parent = Path(path).parent
    if parent.resolve() != Path(root).resolve() and parent.name in classes:
        return parent.name
    prefix = Path(path).stem.rsplit("_", 1)[0]
    return prefix if prefix in classes else None
