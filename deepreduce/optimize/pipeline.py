"""The `deepreduce optimize` pipeline: every network is a resumable job.

Layout of the run directory DIR::

    run.json                   the effective config, data and teacher (a --resume must match it)
    driver.json                the session of the driver running it now (host, pid, executor)
    jobs/<name>/last.pt        resume state, written by train() after every epoch
    jobs/<name>/final.pt       the trained checkpoint
    jobs/<name>/result.json    the job's record (atomic); a job is done when final.pt and this exist
    jobs/<name>/worker.json    where and when the job's latest run started (host, GPU, pid)
    jobs/<name>/train.log      one JSON line per epoch
    jobs/<name>/.lock          held while a process trains the job (so two never train one job)
    criticality.json           step 2's table and the stage order (most critical first)
    frontier.json/.csv/.png    step 7 (see report.py)

Jobs, in order: ``teacher``; ``crit-none`` and ``crit-s<k>``; the culled candidates ``keep-s...``,
their thinned variants ``keep-s...-thin``, then the reshaped variants (``...-a0.5-r0.5-b1111``),
fewest ReLUs first, each skipped when pruning shows it cannot improve the frontier (or it is above
pruning.max_relus); then ``final-<pick>`` for the budget picks of finals.budgets (trained longer);
then the ``ablation-...`` jobs at the pick of ablations.budget. frontier.json is rewritten after
every job (``meta.complete`` is false until the last; frontier.png is drawn at the end), so a run
spread over days shows its frontier so far.

Where the jobs run is the executor's business (executor.py): one after another here (``local``), or
side by side on Ray. The pipeline submits a job as soon as what it needs is finished: the teacher and
the criticality networks together (unless those warm-start from the teacher); every culled and thinned
candidate at once; a reshaped variant once the results its pruning decision reads are in (its parent
and every earlier candidate with no more ReLUs, so the decision, and the set of jobs, is the local
order's); the finals and ablations together once the search is complete.

A killed run continues with --resume: finished jobs are skipped, an interrupted one resumes from
its last.pt. Multi-GPU on one node: run the whole command under torchrun, e.g.
``torchrun --nproc_per_node 8 -m deepreduce optimize ...``; every rank walks the same job list and
train() trains each job data-parallel, while only rank 0 writes pipeline files (the others wait at
a barrier, then read the rank-0 records). Many nodes: ``--executor ray`` (docs/RAY.md).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..data import Dataset, load_dataset
from ..errors import UserError
from ..relus import relu_count
from ..fileio import atomic_write_json, remove_stale_temps
from ..spec import ModelSpec
from ..train import FINAL, evaluate_model, train, training_progress
from .ablations import AblationJob, ablation_jobs, job_row, thinning_rows
from .candidates import (NO_RELU, Candidate, all_candidates, all_stages, criticality_specs, criticality_table,
                         culling_order, parent_candidates, reshaped_for, stage_relus)
from .config import KD, OptimizeConfig, Training
from .executor import ExecutorSettings, JobProgress, make_executor
from .pareto import best_within, prune_reason
from .report import format_criticality_table, format_frontier_table, frontier_document, write_reports

RUN_JSON = "run.json"
DRIVER_JSON = "driver.json"
CRITICALITY_JSON = "criticality.json"
RESULT_JSON = "result.json"
WORKER_JSON = "worker.json"
TRAIN_LOG = "train.log"
LOCK = ".lock"
JOBS_DIR = "jobs"
TEACHER = "teacher"
PROGRESS_INTERVAL_S = 1.0  # how often the driver's bar re-reads the running jobs' epochs
LOCK_WAIT_S = 120.0        # how long a job waits for another process still training it (e.g. a dying worker)
WAIT = object()            # a pruning decision that needs results still in flight


@dataclass(frozen=True)
class Job:
    name: str
    kind: str                   # teacher | criticality | culled | thinned | reshaped | final | ablation
    spec: ModelSpec
    training: Training
    kd: KD | None = None        # distil from the teacher with these settings
    parent: str | None = None


@dataclass(frozen=True)
class JobContext:
    """What every job of a run needs besides its Job, valid on any worker (absolute paths)."""
    out_dir: str
    data_arg: str               # KIND:/absolute/path
    test_subset: int | None     # evaluation.test_subset
    teacher: str                # the checkpoint KD and warm starts read
    resume: bool                # continue a job from its last.pt
    session: str                # the driver's session in DIR/driver.json


class Optimizer:
    """One `deepreduce optimize` run over DIR (see the module docstring)."""

    def __init__(self, out_dir: str, data: Dataset, data_arg: str, config: OptimizeConfig, *,
                 resume: bool = False, teacher: str | None = None, quick: bool = False, progress: bool = True,
                 out=None, executor: ExecutorSettings | None = None):
        self.out_dir, self.config, self.resume, self.progress = out_dir, config, resume, progress
        self.data = _with_test_subset(data, config.evaluation.test_subset)
        self.identity = {"config": config.to_dict(), "data": _normalise_data_arg(data_arg), "quick": quick,
                         "teacher": os.path.abspath(teacher) if teacher else None}
        self.teacher_path = self.identity["teacher"]
        self.out = out or _print_above_bars
        self.executor_settings = executor or ExecutorSettings()
        self.session = uuid.uuid4().hex
        self.rank, self.world = _rank_and_world()
        self.base = ModelSpec(arch=config.base.arch, alpha=config.base.alpha, rho=config.base.rho,
                              blocks=config.base.blocks and tuple(config.base.blocks), widen=config.base.widen,
                              in_channels=data.in_channels, input_size=data.input_size,
                              num_classes=len(data.classes))
        self.bar = self.executor = None  # the progress bar and the executor, while run() runs
        self.context: dict = {}        # teacher, criticality: what every frontier document carries
        self.points: dict[str, dict] = {}  # trained candidates (and finals) by name
        self.pruned: list[dict] = []
        self.ablations: list[dict] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the pipeline -------------------------------------------------------------------------
    def run(self) -> dict:
        self.executor_settings.check()
        self._claim_directory()
        # Generating every candidate up front also checks their specs before any training starts.
        total = (1 + len(criticality_specs(self.base)) + len(all_candidates(self.config, self.base, all_stages(self.base)))
                 + len(set(self.config.finals.budgets)) + self._ablation_job_count())
        # A Ray worker resumes whatever last.pt it finds: its job may be a re-run after a worker died.
        remote = RemoteJob(self._job_context(resume=True))
        with JobProgress(total, enabled=self.progress and self.is_main) as self.bar, \
                make_executor(self.executor_settings, self._train_here, remote,
                              on_start=self._starting) as self.executor:
            teacher, results = self._teacher_and_criticality()
            self.context["teacher"] = teacher
            table, no_relu, order = self._criticality(results)
            self.context.update(criticality=table, no_relu_accuracy=no_relu, stage_order=order)
            self._candidates(order)
            self._finals_and_ablations(order)
        doc = self._publish(complete=True)
        if self.is_main:
            self.out(format_frontier_table(doc))
        return doc

    def _publish(self, complete: bool = False) -> dict:
        """The frontier document of what is trained so far, written to DIR (rank 0)."""
        doc = frontier_document(list(self.points.values()), self.config.budgets, self.pruned, **self.context,
                                ablations=thinning_rows(self._search_points()) + self.ablations,
                                meta=self._meta(complete))
        if self.is_main:
            write_reports(self.out_dir, doc, plots=complete)  # (plotting takes a second: once, at the end)
        return doc

    def _teacher_and_criticality(self) -> tuple[dict, dict[str, dict]]:
        """Steps 1 and 2: the all-ReLU base network (or the --teacher checkpoint, evaluated), and one
        network per stage (only that stage's ReLUs) plus the no-ReLU network; all at once unless the
        criticality networks warm-start from the teacher."""
        crit = [Job(name, "criticality", spec, self.config.train.criticality)
                for name, spec in criticality_specs(self.base).items()]
        if self.teacher_path:
            return self._external_teacher(), self._run_all(crit)
        teacher = Job(TEACHER, "teacher", self.base, self.config.train.teacher)
        if self.config.train.criticality.init == "teacher":
            return self._run_all([teacher])[TEACHER], self._run_all(crit)
        results = self._run_all([teacher] + crit)
        return results.pop(TEACHER), results

    def _criticality(self, results: dict[str, dict]) -> tuple[list[dict], float, list[int]]:
        """Step 2's table and culling order from the criticality networks' records."""
        results = dict(results)
        no_relu = results.pop(NO_RELU)
        table = criticality_table({int(n.rsplit("s", 1)[1]): r["accuracy"] for n, r in results.items()},
                                  no_relu["accuracy"], stage_relus(self.base))
        for row in table:  # what each job cost, as for every other kind of job
            row["train_seconds"] = results[f"crit-s{row['stage']}"]["train_seconds"]
        order = culling_order(table, self.config.criticality.order)
        if self.is_main:
            doc = {"no_relu_accuracy": no_relu["accuracy"], "no_relu_train_seconds": no_relu["train_seconds"],
                   "stages": table, "order": [r["name"] for r in table],
                   "culling_order": [f"S{s}" for s in order], "order_mode": self.config.criticality.order}
            atomic_write_json(os.path.join(self.out_dir, CRITICALITY_JSON), doc)
            self._say("\ncriticality (accuracy gain over the no-ReLU network):\n"
                      + format_criticality_table(table, no_relu["accuracy"])
                      + f"\nculling keeps stages in {doc['order_mode']} order: {' > '.join(doc['culling_order'])}\n")
        return table, no_relu["accuracy"], order

    def _candidates(self, order: list[int]) -> None:
        """Steps 3-6: culled, thinned, then reshaped candidates (with pruning), all distilled.

        Decisions are taken in the local order; a job starts as soon as its decision is taken, and a
        decision that reads results still in flight waits for them (see _verdict)."""
        parents = parent_candidates(self.config, self.base, order)
        queue = parents + reshaped_for(self.config, self.base, parents)
        in_flight: set[str] = set()
        decided = 0
        while decided < len(queue) or in_flight:
            while decided < len(queue):
                c = queue[decided]
                verdict = self._verdict(c, queue[:decided], in_flight)
                if verdict is WAIT:
                    break
                decided += 1
                if verdict:
                    self.pruned.append({"name": c.name, "parent": c.parent, "relu_count": c.relu_count,
                                        "spec": c.spec.to_dict(), "reason": verdict})
                    self.bar.done()
                elif (record := self._start(self._candidate_job(c))) is not None:
                    self._add_point(record)
                else:
                    in_flight.add(c.name)
            if in_flight:
                job, record = self._next()
                in_flight.discard(job.name)
                self._add_point(record)

    def _add_point(self, record: dict) -> None:
        self.points[record["name"]] = record
        self._publish()

    def _verdict(self, c: Candidate, earlier: list[Candidate], in_flight: set[str]):
        """Why `c` is not trained (a reason), None to train it, or WAIT for results still in flight.

        The rule reads the parent's accuracy and the candidates trained before `c` in the local order
        with no more ReLUs than `c` (no other can prune it): once those are in, the decision is the
        local order's, whichever finished first."""
        cap = self.config.pruning.max_relus
        if cap is not None and c.relu_count > cap:
            return f"{c.relu_count:,} ReLUs > pruning.max_relus {cap:,}"
        # A parent above the cap was never trained, so nothing shows its variants are dominated, and
        # shrinking a big parent is how DeepReDuce reaches low budgets (keep-s1s2s3s4-thin-r0.5: 30,720
        # ReLUs from 122,880).
        if c.parent is None or (c.parent not in self.points and c.parent not in in_flight):
            return None
        if not self.config.pruning.enabled or self._is_done(c.name):  # a finished job is always used
            return None
        needed = [e.name for e in earlier if e.relu_count <= c.relu_count]
        if c.parent in in_flight or any(name in in_flight for name in needed):
            return WAIT
        return prune_reason({"name": c.name, "relu_count": c.relu_count}, self.points[c.parent],
                            [self.points[name] for name in needed if name in self.points])

    def _search_points(self) -> list[dict]:
        """The candidates of the search (all trained with train.candidates), not the finals."""
        return [p for p in self.points.values() if p["kind"] != "final"]

    def _finals_and_ablations(self, order: list[int]) -> None:
        """Steps 8 and 9, side by side: both read the search's picks only."""
        finals = self._final_jobs()
        ablations = self._ablation_jobs(order)
        rows: dict[str, dict] = {}

        def record(job: Job, result: dict) -> None:
            if job.kind == "final":
                self.points[job.name] = result
            else:
                aj, pick = ablations[job.name]
                rows[job.name] = job_row(aj, pick, result)
                self.ablations = [rows[name] for name in ablations if name in rows]  # in job order
            self._publish()

        for job in finals + [self._ablation_job(aj, pick) for aj, pick in ablations.values()]:
            if (result := self._start(job)) is not None:
                record(job, result)
        while self.executor.in_flight():
            record(*self._next())

    def _final_jobs(self) -> list[Job]:
        """Step 8: the pick of every budget in finals.budgets, trained again with train.finals."""
        picks = {}
        for budget in self.config.finals.budgets:
            pick = best_within(self._search_points(), budget)
            if pick is None:
                self._say(f"finals: no candidate has <= {budget:,} ReLUs; nothing to retrain")
            else:
                picks[pick["name"]] = pick
        self.bar.done(len(set(self.config.finals.budgets)) - len(picks))  # budgets sharing a pick, or without one
        return [Job(f"final-{pick['name']}", "final", ModelSpec.from_dict(pick["spec"]), self.config.train.finals,
                    self._kd(), pick["name"]) for pick in picks.values()]

    def _ablation_job_count(self) -> int:
        a = self.config.ablations
        return 0 if a.budget is None else int(a.kd) + int(a.order)

    def _ablation_jobs(self, order: list[int]) -> dict[str, tuple[AblationJob, dict]]:
        """Step 9: at the pick of ablations.budget, the same spec with KD switched and the other order's stages."""
        a = self.config.ablations
        if a.budget is None:
            return {}
        pick = best_within(self._search_points(), a.budget)
        jobs = [] if pick is None else ablation_jobs(pick, self.base, order, self.config.kd.enabled, switch_kd=a.kd,
                                                     other_order=a.order, order_mode=self.config.criticality.order)
        self.bar.done(self._ablation_job_count() - len(jobs))
        return {aj.name: (aj, pick) for aj in jobs}

    def _ablation_job(self, aj: AblationJob, pick: dict) -> Job:
        kd = self.config.kd if aj.kd else None  # aj.kd may differ from the run's: the KD ablation switches it
        return Job(aj.name, "ablation", aj.spec, self.config.train.candidates, kd, pick["name"])

    def _kd(self) -> KD | None:
        """The KD settings of candidates and finals: None when the config switches KD off."""
        return self.config.kd if self.config.kd.enabled else None

    def _candidate_job(self, c: Candidate) -> Job:
        return Job(c.name, c.kind, c.spec, self.config.train.candidates, self._kd(), c.parent)

    # -- jobs ---------------------------------------------------------------------------------
    def _job_dir(self, name: str) -> str:
        return os.path.join(self.out_dir, JOBS_DIR, name)

    def _is_done(self, name: str) -> bool:
        return is_done(self._job_dir(name))

    def _run_all(self, jobs: list[Job]) -> dict[str, dict]:
        """Run independent jobs (at once where the executor can); their records by name, in `jobs` order."""
        results = {}
        for job in jobs:
            if (record := self._start(job)) is not None:
                results[job.name] = record
        while len(results) < len(jobs):
            job, record = self._next()
            results[job.name] = record
            self._publish()
        return {job.name: results[job.name] for job in jobs}

    def _start(self, job: Job) -> dict | None:
        """Submit `job`; or, when a previous session finished it, count it and return its record."""
        if self._is_done(job.name):
            return self._finished(job, _read_json(os.path.join(self._job_dir(job.name), RESULT_JSON)))
        self.executor.submit(job)
        return None

    def _next(self) -> tuple[Job, dict]:
        """The next job to finish and its record, refreshing the bar's running jobs meanwhile."""
        while (finished := self.executor.next_result(timeout=PROGRESS_INTERVAL_S)) is None:
            self._show_running()
        job, record = finished
        self._finished(job, record)
        self._show_running()
        return job, record

    def _finished(self, job: Job, record: dict) -> dict:
        self.bar.done(name=job.name)
        self._say(f"{job.name}: {record['accuracy']:.2f}% with {record['relu_count']:,} ReLUs "
                  f"({record['train_seconds']:.0f} s)")
        return record

    def _starting(self, job: Job) -> None:
        """The local executor starts `job` (a Ray run finds its running jobs in _show_running)."""
        self.bar.show({job.name: f"{epochs_logged(self._job_dir(job.name))}/{job.training.epochs}"})

    def _show_running(self) -> None:
        """The jobs in flight that a worker of this session started, with their epochs so far."""
        running = {}
        for job in self.executor.in_flight():
            directory = self._job_dir(job.name)
            if (_read_json_if_any(os.path.join(directory, WORKER_JSON)) or {}).get("session") == self.session:
                running[job.name] = f"{epochs_logged(directory)}/{job.training.epochs}"
        self.bar.show(running)

    def _train_here(self, job: Job) -> dict:
        """The local executor's job: train it in this process (every rank under torchrun), return its record."""
        train_job(job, self._job_context(self.resume), self.data, progress=self.progress, is_main=self.is_main)
        _barrier(self.world)
        return _read_json(os.path.join(self._job_dir(job.name), RESULT_JSON))

    def _job_context(self, resume: bool) -> JobContext:
        return JobContext(os.path.abspath(self.out_dir), self.identity["data"], self.config.evaluation.test_subset,
                          self._teacher_checkpoint(), resume, self.session)

    def _external_teacher(self) -> dict:
        """--teacher CKPT: no training; its accuracy is measured on this run's test images."""
        directory = self._job_dir(TEACHER)
        path = os.path.join(directory, RESULT_JSON)
        if not os.path.isfile(path):
            ckpt = load_checkpoint(self.teacher_path)
            if self.is_main:
                acc = evaluate_model(ckpt.build(), self.data.test, ckpt.mean, ckpt.std)
                record = {"name": TEACHER, "kind": "teacher", "parent": None, "relu_count": relu_count(ckpt.spec),
                          "accuracy": acc, "spec": ckpt.spec.to_dict(), "checkpoint": self.teacher_path,
                          "train_seconds": ckpt.metrics.get("train_seconds"), "epochs": ckpt.metrics.get("epochs"),
                          "test_images": len(self.data.test), "external": True}
                atomic_write_json(path, record)
            _barrier(self.world)
        self.bar.done()
        return _read_json(path)

    def _teacher_checkpoint(self) -> str:
        return self.teacher_path or os.path.abspath(os.path.join(self._job_dir(TEACHER), FINAL))

    # -- run directory --------------------------------------------------------------------------
    def _claim_directory(self) -> None:
        """A fresh DIR gets run.json; an existing run continues only with --resume and the same settings.
        Either way driver.json names this session (Ray workers check they see it: a shared DIR)."""
        path = os.path.join(self.out_dir, RUN_JSON)
        exists = os.path.isfile(path)
        _barrier(self.world)  # every rank looks before rank 0 writes run.json
        if exists:
            if not self.resume:
                raise UserError(f"{self.out_dir} already holds an optimize run: pass --resume to continue it "
                                "or choose a new --out directory")
            _check_same_run(_read_json(path), self.identity, path)
            if self.is_main:  # what a kill during an atomic write left, here and in every job's directory
                jobs = os.path.join(self.out_dir, JOBS_DIR)
                for directory in [self.out_dir] + ([os.path.join(jobs, n) for n in os.listdir(jobs)]
                                                   if os.path.isdir(jobs) else []):
                    remove_stale_temps(directory)
        elif self.is_main:
            atomic_write_json(path, {**self.identity, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if self.is_main:
            driver = {"session": self.session, "executor": self.executor_settings.kind, "host": socket.gethostname(),
                      "pid": os.getpid(), "started_at": round(time.time(), 3)}
            atomic_write_json(os.path.join(self.out_dir, DRIVER_JSON), driver)
        _barrier(self.world)

    def _meta(self, complete: bool) -> dict:
        return {"data": self.identity["data"], "quick": self.identity["quick"], "test_images": len(self.data.test),
                "base_spec": self.base.to_dict(), "budgets": self.config.budgets, "config": self.identity["config"],
                "complete": complete}

    def _say(self, text: str) -> None:
        if self.is_main:
            self.out(text)


# -- one job, wherever it runs ------------------------------------------------------------------------

def is_done(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, FINAL)) and os.path.isfile(os.path.join(directory, RESULT_JSON))


def train_job(job: Job, ctx: JobContext, data: Dataset, *, progress: bool = False, is_main: bool = True) -> None:
    """Train `job` in DIR/jobs/<name>/ unless it is finished, then write its record.

    Under torchrun every rank trains and rank 0 (`is_main`) alone writes. The job's lock is held
    meanwhile, so a second process (a driver started twice, a worker still dying) waits instead of
    training the same job."""
    directory = os.path.join(ctx.out_dir, JOBS_DIR, job.name)
    with _job_lock(directory, job.name, enabled=is_main):
        if is_done(directory):
            return
        if not os.path.isfile(os.path.join(directory, FINAL)):  # else killed after final.pt: only the record is missing
            if is_main:
                atomic_write_json(os.path.join(directory, WORKER_JSON),
                                  {**_worker(), "pid": os.getpid(), "started_at": round(time.time(), 3),
                                   "session": ctx.session})
            teacher = ctx.teacher if job.kd else None
            init = ctx.teacher if job.training.init == "teacher" else None
            train(job.spec, data, directory, job.training.train_config(job.kd), teacher=teacher, resume=ctx.resume,
                  progress=progress, log=_epoch_logger(directory), init=init)
        if is_main:
            _write_result(job, ctx, len(data.test))


def _write_result(job: Job, ctx: JobContext, test_images: int) -> None:
    directory = os.path.join(ctx.out_dir, JOBS_DIR, job.name)
    final = os.path.join(directory, FINAL)
    metrics = load_checkpoint(final).metrics
    attempt = _read_json_if_any(os.path.join(directory, WORKER_JSON)) or {}
    record = {"name": job.name, "kind": job.kind, "parent": job.parent, "relu_count": relu_count(job.spec),
              "accuracy": metrics["test_acc"], "spec": job.spec.to_dict(),
              "checkpoint": os.path.relpath(final, ctx.out_dir), "train_seconds": metrics["train_seconds"],
              "epochs": metrics["epochs"], "test_images": test_images,
              "teacher": _relative(metrics.get("teacher"), ctx.out_dir),
              "kd": dataclasses.asdict(job.kd) if job.kd else None, "init": _relative(metrics.get("init"), ctx.out_dir),
              # the run that finished the job: it started then, there, and wrote final.pt then
              "started_at": attempt.get("started_at"), "finished_at": round(os.path.getmtime(final), 3),
              "worker": {"host": attempt["host"], "gpu": attempt["gpu"]} if attempt else None}
    atomic_write_json(os.path.join(directory, RESULT_JSON), record)


@dataclass(frozen=True)
class RemoteJob:
    """A job on a Ray worker (executor.py pickles this to the worker): checks that the run directory is
    the driver's, loads the data once per worker process, trains, returns the record."""
    ctx: JobContext

    def __call__(self, job: Job) -> dict:
        host = socket.gethostname()
        try:
            _check_shared(self.ctx)
            train_job(job, self.ctx, _worker_data(self.ctx.data_arg, self.ctx.test_subset), progress=False)
        except UserError as exc:
            raise UserError(f"{job.name} on {host}: {exc}") from None
        return _read_json(os.path.join(self.ctx.out_dir, JOBS_DIR, job.name, RESULT_JSON))


_WORKER_DATA: dict[tuple, Dataset] = {}


def _worker_data(data_arg: str, test_subset: int | None) -> Dataset:
    """The run's dataset, loaded (from the decode cache) once per worker process."""
    key = (data_arg, test_subset)
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()
        _WORKER_DATA[key] = _with_test_subset(load_dataset(data_arg, progress=False), test_subset)
    return _WORKER_DATA[key]


def _check_shared(ctx: JobContext) -> None:
    path = os.path.join(ctx.out_dir, DRIVER_JSON)
    seen = _read_json_if_any(path)
    if seen is None or seen.get("session") != ctx.session:
        why = "does not exist here" if seen is None else f"belongs to another driver ({seen.get('host')})"
        raise UserError(f"{path} {why}: every Ray node must see the run directory (--out) at the same path, on a "
                        "filesystem they share (NFS, a cluster filesystem); see docs/RAY.md")


def _worker() -> dict:
    """This process's host and GPU index (the physical one, through CUDA_VISIBLE_DEVICES; None on a CPU)."""
    import torch
    gpu = None
    if torch.cuda.is_available():
        gpu = int(os.environ.get("LOCAL_RANK", 0))
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if gpu < len(visible):
            gpu = int(visible[gpu]) if visible[gpu].isdigit() else visible[gpu]
    return {"host": socket.gethostname(), "gpu": gpu}


@contextmanager
def _job_lock(directory: str, name: str, enabled: bool = True):
    if not enabled:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, LOCK), "a") as f:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = _read_json_if_any(os.path.join(directory, WORKER_JSON)) or {}
                    raise UserError(f"job {name} is still being trained by another process (host "
                                    f"{holder.get('host')}, pid {holder.get('pid')}): stop it, or let it finish, "
                                    "before running this directory again") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _job_running(directory: str) -> bool | None:
    """Whether a process holds the job's lock now (None: no lock file, a run of an older version)."""
    path = os.path.join(directory, LOCK)
    try:
        f = open(path)
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def epochs_logged(directory: str) -> int:
    """Epochs a job has finished so far, from its train.log (cheap: no checkpoint is read)."""
    try:
        with open(os.path.join(directory, TRAIN_LOG)) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if "epoch" in row:
            return row["epoch"]
        if "resumed_from_epoch" in row:
            return row["resumed_from_epoch"]
    return 0


def _epoch_logger(directory: str):
    def log(line: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TRAIN_LOG), "a") as f:
            f.write(line + "\n")
    return log


def jobs_in_progress(out_dir: str) -> list[dict]:
    """The jobs of run DIR that started but have no record yet, with how far each got, where it runs
    and whether a process trains it now: what `deepreduce frontier` shows of a run besides its
    frontier so far (on every worker, as the run directory is shared)."""
    jobs = os.path.join(out_dir, JOBS_DIR)
    rows = []
    for name in sorted(os.listdir(jobs)) if os.path.isdir(jobs) else []:
        directory = os.path.join(jobs, name)
        # The record alone decides, not is_done: an external --teacher has a record and no final.pt.
        if os.path.isdir(directory) and not os.path.isfile(os.path.join(directory, RESULT_JSON)):
            worker = _read_json_if_any(os.path.join(directory, WORKER_JSON))
            rows.append({"name": name, "trained": os.path.isfile(os.path.join(directory, FINAL)),
                         **(training_progress(directory) or {"epochs_done": 0}),
                         **({"worker": {k: worker.get(k) for k in ("host", "gpu", "pid")}} if worker else {}),
                         "running": _job_running(directory)})
    return rows


def _relative(path: str | None, out_dir: str) -> str | None:
    if path is None:
        return None
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
    return path if rel.startswith("..") else rel


def _print_above_bars(text: str) -> None:
    tqdm.write(text, file=sys.stdout)  # print() would tear the progress bars on stderr


def _check_same_run(recorded: dict, current: dict, path: str) -> None:
    differing = [k for k in ("config", "data", "quick", "teacher") if recorded.get(k) != current[k]]
    if differing:
        raise UserError(f"--resume: this run's {', '.join(differing)} differ from the interrupted run's "
                        f"({path}): pass the same --config/--quick/--data/--teacher, or use a new --out directory")


def _with_test_subset(data: Dataset, n: int | None) -> Dataset:
    """Accuracy on a fixed random subset of the test split (same images for every job)."""
    return dataclasses.replace(data, test=data.test.subset(n, seed=0)) if n else data


def _normalise_data_arg(arg: str) -> str:
    kind, _, path = arg.partition(":")
    return f"{kind}:{os.path.abspath(path)}"


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _read_json_if_any(path: str) -> dict | None:
    """A small JSON record, or None where there is none (or it cannot be read: it is informative only)."""
    try:
        return _read_json(path)
    except (OSError, ValueError):
        return None


def _rank_and_world() -> tuple[int, int]:
    from ..train import _distributed  # the one place that sets up torch.distributed for training
    return _distributed()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
