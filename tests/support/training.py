"""Tiny training set-ups: a synthetic dataset whose class is its brightness, a tiny spec, and the
`deepreduce train` command line of the resume tests. Imported by tests and by their subprocesses
(the DDP workers put tests/ on sys.path)."""

from __future__ import annotations

import torch

from deepreduce.data import Dataset, Split
from deepreduce.spec import ModelSpec
from support.env import python_cmd

TINY = ModelSpec(alpha=0.125, input_size=8, num_classes=2)


def synthetic(n_train=64, n_test=32, size=8, channels=3, classes=2, seed=0) -> Dataset:
    """Images whose class is their brightness (class k: pixels around 40 + 170 k / (classes - 1))."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % classes
        level = 40 + 170 * labels.float() / (classes - 1)
        noise = torch.randint(-30, 31, (n, channels, size, size), generator=g).float()
        images = (level.view(-1, 1, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
        return Split(images, labels)
    train_split, test_split = split(n_train), split(n_test)
    px = train_split.images.float() / 255
    return Dataset("synthetic", train_split, test_split, [f"c{i}" for i in range(classes)],
                   px.mean(dim=(0, 2, 3)).tolist(), px.std(dim=(0, 2, 3)).tolist())


def train_cmd(data_arg: str, out, *extra) -> list[str]:
    """A 4-epoch alpha-0.125 run on 96 images, seeded: long enough to be killed mid-run."""
    return python_cmd("train", "--data", data_arg, "--out", str(out), "--alpha", "0.125", "--epochs", "4",
                      "--batch-size", "32", "--subset", "96", "--lr", "0.05", "--seed", "3", "--no-progress", *extra)
