"""Where the optimizer's jobs run: one after another in this process (``local``, the default), or side
by side as Ray tasks (``ray``) on a local Ray instance or an existing cluster (docs/RAY.md).

The pipeline (pipeline.py) decides what to train and in which order. It submits a job only once
everything the job needs is finished (the teacher's checkpoint, the criticality order, the results a
pruning decision reads), so whatever is submitted may run at once. An executor runs the submitted
jobs and hands back their records (the job's result.json) one at a time, as they finish::

    with make_executor(settings, run_here, run_remote) as executor:
        executor.submit(job)                          # any number of times
        finished = executor.next_result(timeout=1.0)  # (job, record), or None if none finished in time

``local`` runs a job inside ``next_result``, in the order of submission: the sequential behaviour
of a run without Ray (and, under torchrun, every rank walks the same list). ``ray`` submits each job
as a Ray task that asks for one GPU where the cluster has GPUs, else ``cpus_per_job`` CPUs; Ray queues
what does not fit yet and runs a job again when its worker dies (``max_retries`` times, each run
resuming from the job's last.pt). Only the records travel through Ray's object store: checkpoints,
logs and the records themselves are written by the workers into the run directory, which must be on
a filesystem every node mounts at the same path (a task checks this before it trains).

Ray is an optional dependency (``pip install -e '.[ray]'``); nothing here imports it before a Ray
executor starts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from tqdm import tqdm

from ..errors import UserError

EXECUTORS = ("local", "ray")
RAY_INSTALL_HINT = "pip install -e '.[ray]' (or `make install-ray`)"
# The local Ray instance holds nothing but the jobs' small records in its object store.
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class ExecutorSettings:
    """How `deepreduce optimize` runs its jobs (not part of a run's identity: a run started with one
    executor resumes with the other)."""
    kind: str = "local"            # local | ray
    workers: int | None = None     # ray: slots of the local instance (default: its GPUs, else CPUs // cpus_per_job);
                                   #   with `address`, the most jobs in flight at once (default: no cap)
    address: str | None = None     # ray: an existing cluster ("auto", "HOST:6379"); None = start a local instance
    cpus_per_job: int = 1          # ray: CPUs a job asks for (and its torch threads)
    max_retries: int = 3           # ray: runs of a job again after its worker died (each resumes from last.pt)

    def check(self) -> None:
        if self.kind not in EXECUTORS:
            raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.kind!r}")
        if self.kind == "local" and (self.workers is not None or self.address is not None or self.cpus_per_job != 1):
            raise UserError("--workers, --ray-address and --cpus-per-job need --executor ray")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.cpus_per_job < 1:
            raise UserError(f"--cpus-per-job must be >= 1, got {self.cpus_per_job}")
        if self.max_retries < 0:
            raise UserError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:
            raise UserError(f"--executor ray needs Ray, an optional dependency: {RAY_INSTALL_HINT}")


def make_executor(settings: ExecutorSettings, run_here: Callable[[Any], dict], run_remote: Callable[[Any], dict],
                  on_start: Callable[[Any], None] | None = None):
    """`run_here(job)` trains a job in this process (local); `run_remote(job)` is a picklable callable
    that does so on a Ray worker. `on_start(job)`: called as the local executor starts a job."""
    settings.check()
    if settings.kind == "local":
        return LocalExecutor(run_here, on_start)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--executor ray runs each job on one GPU of the cluster: start it with plain `deepreduce "
                        "optimize`, not under torchrun")
    return RayExecutor(settings, run_remote)


class LocalExecutor:
    """Runs each job in this process when its result is asked for, in the order of submission."""

    def __init__(self, run: Callable[[Any], dict], on_start: Callable[[Any], None] | None = None):
        self._run, self._on_start = run, on_start
        self._queue: deque = deque()

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self._queue.clear()

    def submit(self, job) -> None:
        self._queue.append(job)

    def in_flight(self) -> list:
        return list(self._queue)

    def next_result(self, timeout: float | None = None) -> tuple[Any, dict]:
        job = self._queue.popleft()
        if self._on_start:
            self._on_start(job)
        return job, self._run(job)


class RayExecutor:
    """Runs every submitted job at once as a Ray task (Ray queues what the cluster cannot fit yet)."""

    def __init__(self, settings: ExecutorSettings, run_remote: Callable[[Any], dict]):
        self.settings, self._task = settings, run_remote
        self._refs: dict = {}            # ObjectRef -> job, in flight
        self._waiting: deque = deque()   # submitted beyond settings.workers (with an address only)
        self.request: dict = {}          # the resources each job asks for
        self._remote = None

    # -- start and stop ---------------------------------------------------------------------------
    def __enter__(self) -> "RayExecutor":
        if self.settings.address:
            ray = import_ray()
            try:
                ray.init(address=self.settings.address, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError) as exc:  # no cluster there, or its token is not ours
                raise UserError(f"--ray-address {self.settings.address}: {exc}") from None
            total = ray.cluster_resources()
            gpus = 1 if total.get("GPU", 0) >= 1 else 0
        else:
            workers, gpus = self._local_slots()
            _loopback_only()  # before Ray is imported: a local instance listens on 127.0.0.1 only
            ray = import_ray()
            ray.init(address="local", num_cpus=workers * self.settings.cpus_per_job, num_gpus=local_gpu_count(),
                     include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False,
                     logging_level=logging.ERROR)
            total = ray.cluster_resources()
        self.request = {"num_cpus": self.settings.cpus_per_job}
        if gpus:
            self.request["num_gpus"] = gpus
        elif total.get("CPU", 0) < self.settings.cpus_per_job:
            ray.shutdown()
            raise UserError(f"the Ray cluster has {total.get('CPU', 0):g} CPUs and no GPU: a job asks for "
                            f"--cpus-per-job {self.settings.cpus_per_job}")
        self._remote = ray.remote(_run_task).options(max_retries=self.settings.max_retries, retry_exceptions=False,
                                                     **self.request)
        return self

    def _local_slots(self) -> tuple[int, float]:
        """(workers, GPUs per job) of a local instance: one job per GPU by default, jobs sharing the
        GPUs evenly when --workers asks for more slots than there are GPUs."""
        gpus = local_gpu_count()
        if gpus:
            workers = self.settings.workers or gpus
            return workers, 1.0 / math.ceil(workers / gpus)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return self.settings.workers or max(1, cpus // self.settings.cpus_per_job), 0

    def __exit__(self, exc_type, *exc) -> None:
        import ray
        if exc_type is not None:  # stop what is still training (its finished epochs are in last.pt)
            for ref in list(self._refs):
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 -- already finished or already gone
                    pass
        self._refs.clear()
        self._waiting.clear()
        ray.shutdown()  # stops a local instance; from a cluster, only disconnects

    # -- jobs -------------------------------------------------------------------------------------
    def submit(self, job) -> None:
        self._waiting.append(job)
        self._launch()

    def _launch(self) -> None:
        cap = self.settings.workers if self.settings.address else None
        while self._waiting and (cap is None or len(self._refs) < cap):
            job = self._waiting.popleft()
            self._refs[self._remote.remote(self._task, job)] = job

    def in_flight(self) -> list:
        return list(self._refs.values()) + list(self._waiting)

    def next_result(self, timeout: float | None = None) -> tuple[Any, dict] | None:
        import ray
        ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if not ready:
            return None
        job = self._refs.pop(ready[0])
        try:
            record = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:  # the job raised: a UserError is the user's to read
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UserError):
                raise cause from None
            raise
        except ray.exceptions.RayError as exc:  # its worker or node died more than max_retries times
            raise UserError(f"job {job.name} failed {self.settings.max_retries + 1} times on Ray "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            "its finished epochs are in its last.pt: --resume continues it") from None
        self._launch()
        return job, record


def _run_task(task: Callable[[Any], dict], job) -> dict:
    """The Ray task: a job on one worker, with as many torch threads as CPUs it was given."""
    import ray
    import torch
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    return task(job)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, an optional dependency: {RAY_INSTALL_HINT}") from None
    return ray


def local_gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _loopback_only() -> None:
    """A local Ray instance serves this machine only: bind its servers to 127.0.0.1. Ray picks the
    loopback address as the node's where multi-node clusters are switched off, which this switch
    does (it is read when Ray is imported, so it is also set on an already imported module)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


class JobProgress:
    """The driver's bar over the run's jobs: done of total, how many run and wait, and the epoch of
    each running job (``optimize  40%|####  | 8/20 [..., 2 running, 10 waiting: keep-s3 1/2, ...]``)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc="optimize", unit="job", position=0, file=sys.stderr, disable=not enabled)
        self.running: dict[str, str] = {}

    def __enter__(self) -> "JobProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def done(self, count: int = 1, name: str | None = None) -> None:
        """`count` jobs finished (`name`, if it was running), found finished, or skipped (pruned, nothing
        to retrain)."""
        self.running.pop(name, None)
        self.bar.update(count)
        self._postfix()

    def show(self, running: dict[str, str]) -> None:
        """`running`: job name -> its epochs so far ("1/3")."""
        self.running = dict(running)
        self._postfix()

    def _postfix(self) -> None:
        waiting = max(0, self.bar.total - self.bar.n - len(self.running))
        jobs = ", ".join(f"{name} {epochs}" for name, epochs in self.running.items())
        self.bar.set_postfix_str(f"{len(self.running)} running, {waiting} waiting" + (f": {jobs}" if jobs else ""))
