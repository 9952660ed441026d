"""The optimizer's test set-ups: a tiny config and dataset, a fake trainer whose accuracy comes from a
table (the pipeline runs in seconds), waiting for a run's files, and what every finished run
directory must hold (frontier JSON, CSV and plot)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import time
from pathlib import Path

import torch
import yaml

from deepreduce.checkpoint import Checkpoint
from deepreduce.data import Dataset, Split
from deepreduce.models import build_model
from deepreduce.optimize import pipeline
from deepreduce.optimize.config import builtin_config_path, config_from_dict, deep_merge
from deepreduce.optimize.pareto import best_within, dominates, pareto_front
from deepreduce.optimize.report import load_frontier
from deepreduce.relus import relu_count
from deepreduce.spec import ModelSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def default_raw() -> dict:
    with open(builtin_config_path()) as f:
        return yaml.safe_load(f)


def tiny_data(size=8, n=12) -> Dataset:
    g = torch.Generator().manual_seed(0)
    split = lambda: Split(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),  # noqa: E731
                          torch.arange(n) % 3)
    return Dataset("tiny", split(), split(), ["a", "b", "c"], [0.5] * 3, [0.25] * 3)


TINY_TRAINING = {"epochs": 1, "batch_size": 4, "lr": 0.05, "subset": None}


def tiny_config(**sections):
    raw = deep_merge(default_raw(), {"base": {"alpha": 0.125},  # 0.0625 (4-channel convs) crashes torch CPU training
                                     "train": {k: TINY_TRAINING for k in ("teacher", "criticality", "candidates")},
                                     "reshape": {"alphas": [0.5], "rhos": [0.5]}})
    return config_from_dict(deep_merge(raw, sections))


class FakeTrainer:
    """Stands in for deepreduce.train.train: writes a real final.pt whose accuracy comes from a table."""

    def __init__(self, accuracy):
        self.accuracy, self.calls = accuracy, []

    def __call__(self, spec, data, out_dir, config, teacher=None, resume=False, progress=True, log=print, init=None):
        name = os.path.basename(out_dir)
        self.calls.append({"name": name, "teacher": teacher, "resume": resume, "config": config, "init": init})
        metrics = {"test_acc": self.accuracy(name, spec), "train_seconds": 1.5, "epochs": config.epochs,
                   "teacher": teacher, "init": init}
        Checkpoint(spec, build_model(spec).state_dict(), data.mean, data.std, data.classes, metrics).save(
            os.path.join(out_dir, "final.pt"))


def by_relus(name, spec):
    """More ReLUs, more accuracy; stage 3 is the most critical, stage 1 the least."""
    crit = {"crit-none": 20.0, "crit-s1": 21.0, "crit-s2": 30.0, "crit-s3": 40.0, "crit-s4": 25.0}
    return crit.get(name, 30.0 + 10 * math.log10(1 + relu_count(spec)))


def run_fake(tmp_path, monkeypatch, accuracy=by_relus, config=None, **kwargs):
    fake = FakeTrainer(accuracy)
    monkeypatch.setattr(pipeline, "train", fake)
    out = kwargs.pop("out", tmp_path / "run")
    doc = pipeline.Optimizer(str(out), tiny_data(), "folder:/tmp/tiny", config or tiny_config(), progress=False,
                             out=lambda *_: None, **kwargs).run()
    return doc, fake, out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"optimize exited early ({proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def check_frontier_files(out: Path) -> dict:
    doc = load_frontier(str(out))
    assert set(doc) >= {"frontier", "candidates", "budget_picks", "pruned"}
    for point in doc["frontier"] + doc["candidates"]:
        assert set(point) >= {"relu_count", "accuracy", "spec", "checkpoint", "train_seconds", "name"}
        assert (out / point["checkpoint"]).is_file() and not os.path.isabs(point["checkpoint"])
        assert ModelSpec.from_dict(point["spec"]) and relu_count(ModelSpec.from_dict(point["spec"])) == point["relu_count"]
        assert 0 <= point["accuracy"] <= 100
    assert not any(dominates(q, p) for p in doc["frontier"] for q in doc["candidates"])
    assert {p["name"] for p in pareto_front(doc["candidates"])} == {p["name"] for p in doc["frontier"]}
    for budget, pick in doc["budget_picks"].items():
        assert pick == best_within(doc["candidates"], int(budget))
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert len(rows) == len(doc["candidates"])
    assert {r["name"] for r in rows if r["on_frontier"] == "1"} == {p["name"] for p in doc["frontier"]}
    assert (out / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    return doc
