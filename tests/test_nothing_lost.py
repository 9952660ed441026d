"""Nothing lost: `deepreduce train` and `deepreduce optimize` SIGKILLed again and again at random points
(start-up, mid-epoch, mid-write) and resumed with --resume. After every kill every checkpoint and
JSON file in the run loads (atomic writes: deepreduce/fileio.py), no finished epoch or finished job
is lost or redone, and the run finally completes. Extends the single-kill tests of test_train.py
(bit-exact resume) and test_optimize.py (finished jobs not retrained), with their tiny settings."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from support.datasets import write_image_tree
from support.env import python_cmd, subprocess_env
from support.optimize import check_frontier_files
from support.training import train_cmd

pytestmark = pytest.mark.usefixtures("deepreduce_env")
SEED = int(os.environ.get("DEEPREDUCE_KILL_SEED", "11"))


KILLS = 5


def run_and_kill(cmd: list[str], env: dict, trigger, delay: float, timeout: float = 600) -> bool:
    """Run `cmd`; SIGKILL it `delay` seconds after `trigger()` first holds, unless it ends first.
    True if it was killed. Tying the kill to progress (not to wall time) keeps it mid-run on a fast
    or a slow machine."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, fired = time.monotonic() + timeout, None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            assert now < deadline, f"{cmd[3]} did not end within {timeout} s"
            if fired is None and trigger():
                fired = now
            if fired is not None and now - fired >= delay:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return True
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err[-2000:]
    return False


def mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def check_files(out: Path) -> dict:
    """Every checkpoint and JSON file of the run loads; counts them and stray temporary files."""
    counts = {"checkpoints": 0, "json": 0, "temp": 0}
    for path in out.rglob("*"):
        if path.name.startswith(".tmp-"):
            counts["temp"] += 1  # an atomic write cut short: never read, never the real file
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)  # raises on a torn file
            counts["checkpoints"] += 1
        elif path.suffix == ".json":
            json.loads(path.read_text())
            counts["json"] += 1
    return counts


@pytest.mark.slow
@pytest.mark.faults
def test_train_killed_at_random_points_loses_no_epoch(tmp_path):
    rng = random.Random(SEED)
    data = tmp_path / "ds"
    write_image_tree(data, {"train": {"a": 64, "b": 64}, "test": {"a": 150, "b": 150}}, size=32)
    env = subprocess_env(DEEPREDUCE_CACHE=tmp_path / "cache")
    out = tmp_path / "run"
    epochs = 8
    cmd = train_cmd(f"folder:{data}", out, "--epochs", str(epochs), "--resume")
    done_before: list[dict] = []
    kills = runs = lost = 0
    worst = {"checkpoints": 0, "json": 0, "temp": 0}
    points = []
    while not (out / "final.pt").exists():
        runs += 1
        assert runs <= 3 * KILLS, f"did not finish after {runs - 1} runs"
        if kills >= KILLS:  # enough: let it finish
            trigger, delay, point = (lambda: False), 0.0, "none"
        elif rng.random() < 0.3:  # during start-up (imports, data loading) or the first steps
            trigger, delay, point = (lambda: True), rng.uniform(0.2, 3.0), "start-up"
        else:  # during the epoch after the next checkpoint (before its end), or right as it is written
            seen = mtime(out / "last.pt")
            epoch_s = done_before[-1]["seconds"] if done_before else 0.5
            trigger, delay, point = (lambda: mtime(out / "last.pt") != seen), rng.uniform(0.0, 0.9) * epoch_s, "mid-epoch"
        if run_and_kill(cmd, env, trigger, delay):
            kills += 1
            points.append(point)
        counts = check_files(out) if out.exists() else worst
        worst = {k: max(worst[k], counts[k]) for k in worst}
        if (out / "last.pt").exists():
            history = torch.load(out / "last.pt", weights_only=True)["history"]
            # every epoch finished before this kill is still there, unchanged
            lost += sum(1 for a, b in zip(done_before, history) if a != b) + max(0, len(done_before) - len(history))
            done_before = history
    final = torch.load(out / "final.pt", weights_only=True)
    history = torch.load(out / "last.pt", weights_only=True)["history"]
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))  # each epoch exactly once
    assert final["metrics"]["test_acc"] == history[-1]["test_acc"]
    print(f"\nnothing-lost figures (train): {kills} SIGKILLs at random points ({', '.join(points)}) over {runs} runs, "
          f"{epochs} epochs "
          f"completed, {lost} finished epochs lost or redone, 0 corrupt files (up to {worst['checkpoints']} checkpoints "
          f"and {worst['json']} JSON files checked after each kill), {worst['temp']} stray temp files at most, "
          f"{check_files(out)['temp']} left at the end")
    assert kills >= 3 and lost == 0  # KILLS unless a run finished before its kill point
    assert check_files(out)["temp"] == 0  # --resume removed what the kills left


TINY_OPTIMIZE = """
base: {alpha: 0.125}
evaluation: {test_subset: null}
train:
  teacher:     {epochs: 2, batch_size: 8, lr: 0.05, subset: null}
  criticality: {epochs: 1, batch_size: 8, lr: 0.05, subset: null}
  candidates:  {epochs: 2, batch_size: 8, lr: 0.05, subset: null}
thinning: {enabled: true}
reshape: {enabled: true, alphas: [0.5], rhos: [], apply_to: thinned}
budgets: [3000]
"""


def job_records(out: Path) -> dict:
    """{job: (result.json text, final.pt mtime)} for every finished job."""
    records = {}
    for result in (out / "jobs").glob("*/result.json"):
        records[result.parent.name] = (result.read_text(), (result.parent / "final.pt").stat().st_mtime_ns)
    return records


@pytest.mark.slow
@pytest.mark.faults
def run_complete(out: Path) -> bool:
    try:
        return json.loads((out / "frontier.json").read_text())["meta"]["complete"]
    except FileNotFoundError:
        return False


def test_optimize_killed_at_random_points_loses_no_job(tmp_path):
    rng = random.Random(SEED + 1)
    data = tmp_path / "ds"
    write_image_tree(data, {"train": {"a": 8, "b": 8, "c": 8}, "test": {"a": 4, "b": 4, "c": 4}}, size=8)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_OPTIMIZE)
    env = subprocess_env(DEEPREDUCE_CACHE=tmp_path / "cache")
    out = tmp_path / "run"
    cmd = python_cmd("optimize", "--data", f"folder:{data}", "--config", str(config), "--out", str(out), "--no-progress")
    finished: dict = {}
    kills = runs = lost = 0
    worst = {"checkpoints": 0, "json": 0, "temp": 0}
    points = []
    while not run_complete(out):  # frontier.json is rewritten after every job; complete at the end
        runs += 1
        assert runs <= 3 * KILLS, f"did not finish after {runs - 1} runs"
        resume = ["--resume"] if (out / "run.json").exists() else []
        done_jobs = len(list(out.glob("jobs/*/result.json")))
        started_jobs = len(list(out.glob("jobs/*/last.pt")))
        mode = "none" if kills >= KILLS else rng.choice(["start-up", "after a job", "mid-job"])
        if mode == "start-up":
            trigger, delay = (lambda: True), rng.uniform(0.5, 4.0)
        elif mode == "after a job":  # as the next job starts, or as its record is written
            trigger, delay = (lambda: len(list(out.glob("jobs/*/result.json"))) > done_jobs), rng.uniform(0.0, 0.5)
        elif mode == "mid-job":  # after a job's first epoch checkpoint
            trigger, delay = (lambda: len(list(out.glob("jobs/*/last.pt"))) > started_jobs), rng.uniform(0.0, 0.3)
        else:
            trigger, delay = (lambda: False), 0.0
        if run_and_kill(cmd + resume, env, trigger, delay, timeout=900):
            kills += 1
            points.append(mode)
        counts = check_files(out) if out.exists() else worst
        worst = {k: max(worst[k], counts[k]) for k in worst}
        now = job_records(out) if (out / "jobs").exists() else {}
        # a job finished before this kill keeps its record and its checkpoint (not retrained)
        lost += sum(1 for name, record in finished.items() if now.get(name) != record)
        finished = now
    doc = check_frontier_files(out)
    assert set(job_records(out)) >= {c["name"] for c in doc["candidates"]}
    print(f"\nnothing-lost figures (optimize): {kills} SIGKILLs at random points ({', '.join(points)}) over {runs} runs, "
          f"{len(finished)} jobs finished, {lost} finished jobs lost or retrained, 0 corrupt files (up to "
          f"{worst['checkpoints']} checkpoints and {worst['json']} JSON files checked after each kill), "
          f"{worst['temp']} stray temp files at most, {check_files(out)['temp']} left at the end")
    assert kills >= 3 and lost == 0  # KILLS unless a run finished before its kill point
    assert check_files(out)["temp"] == 0  # --resume removed what the kills left
