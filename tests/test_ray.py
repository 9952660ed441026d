"""Where the optimizer's jobs run (deepreduce/optimize/executor.py): the pipeline's decisions when jobs
finish in any order (fast, no Ray), the flags and records, and on real CIFAR-10 with a local Ray
instance of two workers (slow): the same jobs and files as the local executor with jobs side by side,
a Ray worker killed mid-job, and drivers killed mid-run, resumed across executors, losing nothing.

The Ray tests need the optional extra (`pip install -e '.[ray]'`, `make install-ray`; `make test`
installs it) and are skipped, with that reason, without it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

import pytest
import torch

from conftest import PERSISTENT_CACHE, python_cmd, subprocess_env
from deepreduce.cli import main
from deepreduce.errors import UserError
from deepreduce.optimize import pipeline
from deepreduce.optimize.executor import ExecutorSettings, RayExecutor
from deepreduce.optimize.report import format_jobs_in_progress
from test_optimize import by_relus, check_frontier_files, run_fake, tiny_config, wait_for

pytestmark = pytest.mark.usefixtures("deepreduce_env")

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed: it is the optional extra "
                               "(pip install -e '.[ray]', or make install-ray; make test and CI install it)")
RUN_STAMPS = ("started_at", "finished_at", "worker")  # where and when: the one thing two runs differ in


# -- the pipeline's decisions with jobs finishing out of order (fast, no Ray) ---------------------------

class ScrambledExecutor:
    """Holds every submitted job and finishes them in another order than the local one: the last
    submitted first (lifo) or at random, as on a cluster where jobs take different times."""

    def __init__(self, run, order: str):
        self.run, self.order, self.queue, self.most_in_flight = run, order, [], 0
        self.rng = random.Random(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def submit(self, job):
        self.queue.append(job)
        self.most_in_flight = max(self.most_in_flight, len(self.queue))

    def in_flight(self):
        return list(self.queue)

    def next_result(self, timeout=None):
        job = self.queue.pop(-1 if self.order == "lifo" else self.rng.randrange(len(self.queue)))
        return job, self.run(job)


def without_run_stamps(value, stamps=RUN_STAMPS):
    if isinstance(value, dict):
        return {k: without_run_stamps(v, stamps) for k, v in value.items() if k not in stamps}
    if isinstance(value, list):
        return [without_run_stamps(v, stamps) for v in value]
    return value


def prunes_variants(name, spec):
    return 90.0 if name == "keep-s3-thin" else by_relus(name, spec)  # makes every larger parent's variants pointless


@pytest.mark.parametrize("order", ["lifo", "random"])
@pytest.mark.parametrize("accuracy", [by_relus, prunes_variants], ids=["no-pruning", "pruning"])
def test_jobs_finishing_in_any_order_give_the_local_jobs_and_decisions(tmp_path, monkeypatch, order, accuracy):
    config = tiny_config(finals={"budgets": [800, 790]}, ablations={"budget": 800})
    local, local_fake, _ = run_fake(tmp_path, monkeypatch, accuracy, config=config, out=tmp_path / "local")
    executors = []

    def scrambled(settings, run_here, run_remote, on_start=None):
        executors.append(ScrambledExecutor(run_here, order))
        return executors[0]
    monkeypatch.setattr(pipeline, "make_executor", scrambled)
    doc, fake, out = run_fake(tmp_path, monkeypatch, accuracy, config=config, out=tmp_path / "scrambled")
    assert sorted(c["name"] for c in fake.calls) == sorted(c["name"] for c in local_fake.calls)
    assert [c["name"] for c in fake.calls] != [c["name"] for c in local_fake.calls]  # really out of order
    assert doc["pruned"] == local["pruned"]  # the same decisions, reasons included
    assert bool(doc["pruned"]) == (accuracy is prunes_variants)
    assert without_run_stamps(doc) == without_run_stamps(local)
    # teacher and the 5 criticality networks at once, then the 8 culled and thinned candidates at once
    assert executors[0].most_in_flight >= 8
    # every kind of job records what it cost: criticality rows and ablations too (docs/RAY.md's projection)
    assert all(row["train_seconds"] == 1.5 for row in doc["criticality"])
    assert json.loads((out / "criticality.json").read_text())["no_relu_train_seconds"] == 1.5
    assert all(r[side]["train_seconds"] == 1.5 for r in doc["ablations"] for side in ("ours", "other"))


def test_every_job_records_when_and_where_it_ran(tmp_path, monkeypatch):
    _, fake, out = run_fake(tmp_path, monkeypatch)
    for call in fake.calls:
        record = json.loads((out / "jobs" / call["name"] / "result.json").read_text())
        assert record["started_at"] <= record["finished_at"] <= time.time()
        assert record["worker"] == {"host": socket.gethostname(), "gpu": None}
    teacher = json.loads((out / "jobs" / "teacher" / "result.json").read_text())
    # a record rebuilt after a kill between final.pt and result.json keeps the run's stamps
    (out / "jobs" / "teacher" / "result.json").unlink()
    _, fake, _ = run_fake(tmp_path, monkeypatch, resume=True)
    assert fake.calls == [] and json.loads((out / "jobs" / "teacher" / "result.json").read_text()) == teacher
    driver = json.loads((out / "driver.json").read_text())
    assert driver["executor"] == "local" and driver["pid"] == os.getpid()


def test_jobs_in_progress_show_where_they_run_and_whether_they_still_do(tmp_path):
    directory = tmp_path / "jobs" / "keep-s3"
    directory.mkdir(parents=True)
    (directory / "worker.json").write_text(json.dumps({"host": "node-2", "gpu": 3, "pid": 4242, "started_at": 1.0,
                                                       "session": "s"}))
    with pipeline._job_lock(str(directory), "keep-s3"):
        [row] = pipeline.jobs_in_progress(str(tmp_path))
        assert row["worker"] == {"host": "node-2", "gpu": 3, "pid": 4242} and row["running"] is True
        assert format_jobs_in_progress([row]) == ("started, not finished:\n"
                                                  "  keep-s3 [node-2 GPU 3, running]: no epoch finished yet")
    [row] = pipeline.jobs_in_progress(str(tmp_path))
    assert row["running"] is False and "[node-2 GPU 3, not running]" in format_jobs_in_progress([row])


def test_a_worker_refuses_a_run_directory_it_does_not_share(tmp_path):
    ctx = pipeline.JobContext(str(tmp_path / "run"), "folder:/nowhere", None, "/nowhere/final.pt", True, "ours")
    job = pipeline.Job("teacher", "teacher", pipeline.ModelSpec(), tiny_config().train.teacher)
    with pytest.raises(UserError, match="does not exist here: every Ray node must see the run directory"):
        pipeline.RemoteJob(ctx)(job)  # (what a Ray task runs: a node without the shared filesystem)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "driver.json").write_text(json.dumps({"session": "theirs", "host": "elsewhere"}))
    with pytest.raises(UserError, match=r"teacher on .*belongs to another driver \(elsewhere\)"):
        pipeline.RemoteJob(ctx)(job)


def test_executor_flags_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    args = ["optimize", "--data", "folder:/nowhere", "--out", str(tmp_path / "run")]
    assert main(args + ["--workers", "2"]) == 2
    assert "--workers, --ray-address and --cpus-per-job need --executor ray" in capsys.readouterr().err
    assert main(args + ["--executor", "ray", "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert main(args + ["--executor", "ray"]) == 2
    assert "needs Ray, an optional dependency: pip install -e '.[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    fake_ray = types.ModuleType("ray")
    fake_ray.__spec__ = importlib.machinery.ModuleSpec("ray", None)  # installed, as far as the check can tell
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="not under torchrun"):
        pipeline.make_executor(ExecutorSettings("ray"), None, None)


@needs_ray
def test_a_cluster_address_without_a_cluster_is_a_clear_error(monkeypatch):
    import ray

    def no_cluster(**kwargs):  # what ray.init says where none runs (a real "auto" would find any cluster here)
        raise ConnectionError("Could not find any running Ray instance.")
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(UserError, match="--ray-address auto: Could not find any running Ray instance"):
        with RayExecutor(ExecutorSettings("ray", address="auto"), None):
            pass


@needs_ray
@pytest.mark.slow
def test_a_job_error_on_a_ray_worker_reaches_the_driver_as_is(tmp_path, monkeypatch):
    """A worker that does not see the run directory fails its job; the driver raises that UserError (the
    CLI prints it in one line), not Ray's wrapper."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # (Ray's socket paths must stay short)
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    ctx = pipeline.JobContext(str(tmp_path / "unshared"), "folder:/nowhere", None, "/nowhere/final.pt", True, "s")
    job = pipeline.Job("teacher", "teacher", pipeline.ModelSpec(), tiny_config().train.teacher)
    try:
        with RayExecutor(ExecutorSettings("ray", workers=1), pipeline.RemoteJob(ctx)) as executor:
            assert executor.request == {"num_cpus": 1}
            executor.submit(job)
            with pytest.raises(UserError, match=r"^teacher on .*does not exist here: every Ray node must see"):
                for _ in range(120):  # (bounded: a minute)
                    executor.next_result(timeout=0.5)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- on real CIFAR-10 with a local Ray instance of two workers (slow) --------------------------------------

# The built-in --quick pipeline (teacher, criticality, culling, thinning, reshaping, a final, ablations) on
# smaller subsets, every parent reshaped: 25 jobs, some pruned (a reshaped culled network is pruned when a
# smaller one beats its parent, and culled networks keeping more stages learn least in 2 short epochs),
# so decisions wait for results in flight. The teacher and the final train long enough (about a second
# an epoch) to be killed mid-job; the final's 6 epochs outlast the second or two its worker may go on
# training after a driver's death.
RAY_QUICK = """
quick:
  evaluation: {test_subset: 200}
  train:
    teacher:     {epochs: 3, batch_size: 50, subset: 2000}
    criticality: {epochs: 2, batch_size: 50, subset: 300}
    candidates:  {epochs: 2, batch_size: 50, subset: 300}
    finals:      {epochs: 6, batch_size: 50, subset: 2000}
  reshape: {apply_to: all}
"""
JOBS = 25


@pytest.fixture(scope="module")
def ray_env(cifar10_arg):
    """Children load CIFAR-10 from the persistent cache; Ray keeps its files in a fresh short directory
    (sockets live there), and every process of the test carries a mark so that none outlives it."""
    mark, tmp = uuid.uuid4().hex, tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield subprocess_env(DEEPREDUCE_CACHE=PERSISTENT_CACHE, RAY_TMPDIR=tmp, DEEPREDUCE_TEST_MARK=mark)
    for pid in processes_marked(mark):  # e.g. Ray's agents after a killed driver (they exit in about a minute)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(tmp, ignore_errors=True)


def processes_marked(mark: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if f"DEEPREDUCE_TEST_MARK={mark}".encode() in Path(f"/proc/{entry}/environ").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "ray-quick.yaml"
    path.write_text(RAY_QUICK)
    return path


def optimize_args(cifar10_arg, config_file, out, *extra) -> list[str]:
    return python_cmd("optimize", "--data", cifar10_arg, "--config", str(config_file), "--out", str(out),
                      "--quick", *extra)


def records(out: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "result.json").read_text())
            for d in sorted((out / "jobs").iterdir()) if (d / "result.json").is_file()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, cifar10_arg, config_file, ray_env) -> dict:
    """The reference: the same pipeline with the local executor."""
    out = tmp_path_factory.mktemp("local") / "run"
    run = subprocess.run(optimize_args(cifar10_arg, config_file, out, "--no-progress"), env=ray_env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {"records": records(out), "frontier": json.loads((out / "frontier.json").read_text())}


def assert_same_jobs(out: Path, local_run: dict) -> dict[str, dict]:
    """The run in `out` trained the reference's jobs, to the same accuracy (training is deterministic
    with one thread per job), and pruned the same candidates for the same reasons."""
    got = records(out)
    assert sorted(got) == sorted(local_run["records"])
    assert {n: r["accuracy"] for n, r in got.items()} == {n: r["accuracy"] for n, r in local_run["records"].items()}
    doc = check_frontier_files(out)
    assert doc["pruned"] == local_run["frontier"]["pruned"] and doc["pruned"] and doc["meta"]["complete"]
    measured = RUN_STAMPS + ("train_seconds",)  # (and how long each job took)
    assert without_run_stamps(doc, measured) == without_run_stamps(local_run["frontier"], measured)
    return got


def resumed_from(directory: Path) -> list[int]:
    return [json.loads(line)["resumed_from_epoch"] for line in (directory / "train.log").read_text().splitlines()
            if "resumed_from_epoch" in line]


def last_epoch(directory: Path) -> int:
    return torch.load(directory / "last.pt", map_location="cpu", weights_only=True)["epoch"]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"  # a zombie has stopped
    except (OSError, IndexError):
        return True


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


@needs_ray
@pytest.mark.slow
def test_ray_runs_the_local_jobs_side_by_side(tmp_path, cifar10_arg, config_file, ray_env, local_run):
    out = tmp_path / "ray"
    t0 = time.monotonic()
    run = subprocess.run(optimize_args(cifar10_arg, config_file, out, "--executor", "ray", "--workers", "2"),
                         env=ray_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"--executor ray --workers 2: {time.monotonic() - t0:.0f} s")
    got = assert_same_jobs(out, local_run)
    assert "budget picks" in run.stdout and "teacher:" in run.stdout
    intervals = sorted((r["started_at"], r["finished_at"], n) for n, r in got.items())
    assert all(r["worker"]["host"] and r["worker"]["gpu"] is None for r in got.values())
    overlapping = [(a[2], b[2]) for i, a in enumerate(intervals) for b in intervals[i + 1:] if b[0] < a[1]]
    assert overlapping, intervals  # jobs ran side by side
    # never more at once than the two workers
    assert all(sum(s <= t < f for s, f, _ in intervals) <= 2 for t, _, _ in intervals)
    bar = run.stderr.replace("\r", "\n")
    assert "running" in bar and "waiting" in bar and f"/{JOBS} [" in bar  # the driver's bar over the jobs
    assert json.loads((out / "driver.json").read_text())["executor"] == "ray"


@needs_ray
@pytest.mark.slow
def test_a_killed_ray_worker_loses_no_epoch(tmp_path, cifar10_arg, config_file, ray_env, local_run):
    out, teacher = tmp_path / "ray", tmp_path / "ray" / "jobs" / "teacher"
    proc = subprocess.Popen(optimize_args(cifar10_arg, config_file, out, "--executor", "ray", "--workers", "2",
                                          "--no-progress"),
                            env=ray_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(teacher / "last.pt", proc, timeout=300)  # the teacher's first epoch is saved
        worker = json.loads((teacher / "worker.json").read_text())  # the job's own record names its process
        os.kill(worker["pid"], signal.SIGKILL)
        done_epochs = last_epoch(teacher)
        assert not (teacher / "final.pt").exists(), "the teacher finished before its worker was killed"
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    # Ray ran the job again on another worker process, which continued from the killed one's last epoch
    assert json.loads((teacher / "worker.json").read_text())["pid"] != worker["pid"]
    assert resumed_from(teacher) == [done_epochs]
    assert_same_jobs(out, local_run)


@needs_ray
@pytest.mark.slow
def test_killed_drivers_resume_across_executors(tmp_path, cifar10_arg, config_file, ray_env, local_run):
    """Local, killed mid-teacher; resumed on Ray, killed mid-final; resumed locally to the end."""
    out = tmp_path / "run"
    jobs = out / "jobs"
    final = jobs / next(n for n in local_run["records"] if n.startswith("final-"))

    def start(*extra):
        return subprocess.Popen(optimize_args(cifar10_arg, config_file, out, "--no-progress", *extra), env=ray_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def kill_when(path: Path, proc):
        try:
            wait_for(path, proc, timeout=300)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()

    kill_when(jobs / "teacher" / "last.pt", start())
    teacher_epochs = last_epoch(jobs / "teacher")
    assert not (jobs / "teacher" / "final.pt").exists()

    proc = start("--resume", "--executor", "ray", "--workers", "2")
    kill_when(final / "last.pt", proc)
    # The jobs in flight when the driver died: their workers stop with it, within a second or two (Ray's
    # check of its raylet), so one may still finish an epoch, or its final.pt, meanwhile.
    in_flight = [row for row in pipeline.jobs_in_progress(str(out)) if "worker" in row]
    assert final.name in [row["name"] for row in in_flight] or (final / "result.json").exists()
    for row in in_flight:
        wait_until(lambda: gone(row["worker"]["pid"]), 30, f"the worker of {row['name']} did not stop")
    # A task Ray had already handed to a worker may start just after that snapshot: every worker stops
    # once the driver is gone, whichever job it runs.
    wait_until(lambda: all(row["running"] is False for row in pipeline.jobs_in_progress(str(out))), 30,
               "every job's worker stopped after the driver was killed")
    finished = {n: (jobs / n / "result.json").stat().st_mtime_ns for n in records(out)}
    # Under load the final may finish in the second its worker outlives the driver: then it must simply
    # not be trained again below (its record's time is in `finished`).
    assert "teacher" in finished
    final_epochs = None if (final / "final.pt").exists() else last_epoch(final)

    run = subprocess.run(optimize_args(cifar10_arg, config_file, out, "--no-progress", "--resume"), env=ray_env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {n: (jobs / n / "result.json").stat().st_mtime_ns for n in finished} == finished  # not one retrained
    assert resumed_from(jobs / "teacher") == [teacher_epochs]
    assert resumed_from(final) == ([] if final_epochs is None else [final_epochs])  # [] if only its record was missing
    assert_same_jobs(out, local_run)
