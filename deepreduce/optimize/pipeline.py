"""The `deepreduce optimize` pipeline: every network is a resumable job.

Layout of the run directory DIR::

    run.json                   the effective config, data and teacher (a --resume must match it)
    jobs/<name>/last.pt        resume state, written by train() after every epoch
    jobs/<name>/final.pt       the trained checkpoint
    jobs/<name>/result.json    the job's record (atomic); a job is done when final.pt and this exist
    jobs/<name>/train.log      one JSON line per epoch
    criticality.json           step 2's table and the stage order (most critical first)
    frontier.json/.csv/.png    step 7 (see report.py)

Jobs, in order: ``teacher``; ``crit-none`` and ``crit-s<k>``; the culled candidates ``keep-s...``,
their thinned variants ``keep-s...-thin``, then the reshaped variants (``...-a0.5-r0.5-b1111``),
fewest ReLUs first, each skipped when pruning shows it cannot improve the frontier (or it is above
pruning.max_relus); then ``final-<pick>`` for the budget picks of finals.budgets (trained longer);
then the ``ablation-...`` jobs at the pick of ablations.budget. frontier.json is rewritten after
every candidate, final and ablation job (``meta.complete`` is false until the last; frontier.png is
drawn at the end), so a run spread over days shows its frontier so far.

A killed run continues with --resume: finished jobs are skipped, an interrupted one resumes from
its last.pt. Multi-GPU: run the whole command under torchrun, e.g.
``torchrun --nproc_per_node 8 -m deepreduce optimize ...``; every rank walks the same job list and
train() trains each job data-parallel, while only rank 0 writes pipeline files (the others wait at
a barrier, then read the rank-0 records).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..data import Dataset
from ..errors import UserError
from ..relus import relu_count
from ..fileio import atomic_write_json, remove_stale_temps
from ..spec import ModelSpec
from ..train import FINAL, evaluate_model, train, training_progress
from .ablations import ablation_jobs, job_row, thinning_rows
from .candidates import (NO_RELU, Candidate, all_candidates, all_stages, criticality_specs, criticality_table,
                         culling_order, parent_candidates, reshaped_for, stage_relus)
from .config import KD, OptimizeConfig, Training
from .pareto import best_within, prune_reason
from .report import format_criticality_table, format_frontier_table, frontier_document, write_reports

RUN_JSON = "run.json"
CRITICALITY_JSON = "criticality.json"
RESULT_JSON = "result.json"
JOBS_DIR = "jobs"
TEACHER = "teacher"


@dataclass(frozen=True)
class Job:
    name: str
    kind: str                   # teacher | criticality | culled | thinned | reshaped | final | ablation
    spec: ModelSpec
    training: Training
    kd: KD | None = None        # distil from the teacher with these settings
    parent: str | None = None


class Optimizer:
    """One `deepreduce optimize` run over DIR (see the module docstring)."""

    def __init__(self, out_dir: str, data: Dataset, data_arg: str, config: OptimizeConfig, *,
                 resume: bool = False, teacher: str | None = None, quick: bool = False, progress: bool = True,
                 out=None):
        self.out_dir, self.config, self.resume, self.progress = out_dir, config, resume, progress
        self.data = _with_test_subset(data, config.evaluation.test_subset)
        self.identity = {"config": config.to_dict(), "data": _normalise_data_arg(data_arg), "quick": quick,
                         "teacher": os.path.abspath(teacher) if teacher else None}
        self.teacher_path = self.identity["teacher"]
        self.out = out or _print_above_bars
        self.rank, self.world = _rank_and_world()
        self.base = ModelSpec(arch=config.base.arch, alpha=config.base.alpha, rho=config.base.rho,
                              blocks=config.base.blocks and tuple(config.base.blocks), widen=config.base.widen,
                              in_channels=data.in_channels, input_size=data.input_size,
                              num_classes=len(data.classes))
        self.bar = None
        self.context: dict = {}        # teacher, criticality: what every frontier document carries
        self.points: dict[str, dict] = {}  # trained candidates (and finals) by name
        self.pruned: list[dict] = []
        self.ablations: list[dict] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the pipeline -------------------------------------------------------------------------
    def run(self) -> dict:
        self._claim_directory()
        # Generating every candidate up front also checks their specs before any training starts.
        total = (1 + len(criticality_specs(self.base)) + len(all_candidates(self.config, self.base, all_stages(self.base)))
                 + len(set(self.config.finals.budgets)) + self._ablation_job_count())
        with tqdm(total=total, desc="optimize", unit="job", position=0, file=sys.stderr,
                  disable=not self.progress or not self.is_main) as self.bar:
            self.context["teacher"] = self._teacher()
            table, no_relu, order = self._criticality()
            self.context.update(criticality=table, no_relu_accuracy=no_relu, stage_order=order)
            self._candidates(order)
            self._finals()
            self._ablations(order)
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

    def _teacher(self) -> dict:
        """Step 1: train the all-ReLU base network, or record (and evaluate) the --teacher checkpoint."""
        if self.teacher_path:
            return self._external_teacher()
        return self._run(Job(TEACHER, "teacher", self.base, self.config.train.teacher))

    def _criticality(self) -> tuple[list[dict], float, list[int]]:
        """Step 2: one network per stage (only that stage's ReLUs) and the no-ReLU network."""
        results = {name: self._run(Job(name, "criticality", spec, self.config.train.criticality))
                   for name, spec in criticality_specs(self.base).items()}
        no_relu = results.pop(NO_RELU)["accuracy"]
        table = criticality_table({int(n.rsplit("s", 1)[1]): r["accuracy"] for n, r in results.items()},
                                  no_relu, stage_relus(self.base))
        order = culling_order(table, self.config.criticality.order)
        if self.is_main:
            doc = {"no_relu_accuracy": no_relu, "stages": table, "order": [r["name"] for r in table],
                   "culling_order": [f"S{s}" for s in order], "order_mode": self.config.criticality.order}
            atomic_write_json(os.path.join(self.out_dir, CRITICALITY_JSON), doc)
            self._say("\ncriticality (accuracy gain over the no-ReLU network):\n"
                      + format_criticality_table(table, no_relu)
                      + f"\nculling keeps stages in {doc['order_mode']} order: {' > '.join(doc['culling_order'])}\n")
        return table, no_relu, order

    def _candidates(self, order: list[int]) -> None:
        """Steps 3-6: culled, thinned, then reshaped candidates (with pruning), all distilled."""
        parents = parent_candidates(self.config, self.base, order)
        for c in parents + reshaped_for(self.config, self.base, parents):
            reason = self._prune_reason(c)
            if reason:
                self.pruned.append({"name": c.name, "parent": c.parent, "relu_count": c.relu_count,
                                    "spec": c.spec.to_dict(), "reason": reason})
                self.bar.update(1)
                continue
            self.points[c.name] = self._run(self._candidate_job(c))
            self._publish()

    def _prune_reason(self, c: Candidate) -> str | None:
        cap = self.config.pruning.max_relus
        if cap is not None and c.relu_count > cap:
            return f"{c.relu_count:,} ReLUs > pruning.max_relus {cap:,}"
        # A parent above the cap was never trained, so nothing shows its variants are dominated, and
        # shrinking a big parent is how DeepReDuce reaches low budgets (keep-s1s2s3s4-thin-r0.5: 30,720
        # ReLUs from 122,880).
        if c.parent is None or c.parent not in self.points:
            return None
        if not self.config.pruning.enabled or self._is_done(c.name):  # a finished job is always used
            return None
        return prune_reason({"name": c.name, "relu_count": c.relu_count}, self.points[c.parent],
                            list(self.points.values()))

    def _search_points(self) -> list[dict]:
        """The candidates of the search (all trained with train.candidates), not the finals."""
        return [p for p in self.points.values() if p["kind"] != "final"]

    def _finals(self) -> None:
        """Step 8: the pick of every budget in finals.budgets, trained again with train.finals."""
        picks = {}
        for budget in self.config.finals.budgets:
            pick = best_within(self._search_points(), budget)
            if pick is None:
                self._say(f"finals: no candidate has <= {budget:,} ReLUs; nothing to retrain")
            else:
                picks[pick["name"]] = pick
        self.bar.update(len(set(self.config.finals.budgets)) - len(picks))  # budgets sharing a pick, or without one
        for pick in picks.values():
            job = Job(f"final-{pick['name']}", "final", ModelSpec.from_dict(pick["spec"]), self.config.train.finals,
                      self._kd(), pick["name"])
            self.points[job.name] = self._run(job)
            self._publish()

    def _ablation_job_count(self) -> int:
        a = self.config.ablations
        return 0 if a.budget is None else int(a.kd) + int(a.order)

    def _ablations(self, order: list[int]) -> None:
        """Step 9: at the pick of ablations.budget, the same spec with KD switched and the other order's stages."""
        a = self.config.ablations
        if a.budget is None:
            return
        pick = best_within(self._search_points(), a.budget)
        jobs = [] if pick is None else ablation_jobs(pick, self.base, order, self.config.kd.enabled, switch_kd=a.kd,
                                                     other_order=a.order, order_mode=self.config.criticality.order)
        self.bar.update(self._ablation_job_count() - len(jobs))
        for aj in jobs:  # aj.kd may differ from the run's: the KD ablation switches it
            kd = self.config.kd if aj.kd else None
            result = self._run(Job(aj.name, "ablation", aj.spec, self.config.train.candidates, kd, pick["name"]))
            self.ablations.append(job_row(aj, pick, result))
            self._publish()

    def _kd(self) -> KD | None:
        """The KD settings of candidates and finals: None when the config switches KD off."""
        return self.config.kd if self.config.kd.enabled else None

    def _candidate_job(self, c: Candidate) -> Job:
        return Job(c.name, c.kind, c.spec, self.config.train.candidates, self._kd(), c.parent)

    # -- jobs ---------------------------------------------------------------------------------
    def _job_dir(self, name: str) -> str:
        return os.path.join(self.out_dir, JOBS_DIR, name)

    def _is_done(self, name: str) -> bool:
        d = self._job_dir(name)
        return os.path.isfile(os.path.join(d, FINAL)) and os.path.isfile(os.path.join(d, RESULT_JSON))

    def _run(self, job: Job) -> dict:
        """Train the job unless it is done; return its record (identical on every rank)."""
        self.bar.set_postfix_str(job.name)
        directory = self._job_dir(job.name)
        if not self._is_done(job.name):
            if not os.path.isfile(os.path.join(directory, FINAL)):  # killed after final.pt: only the record is missing
                config = job.training.train_config(job.kd)
                teacher = self._teacher_checkpoint() if job.kd else None
                init = self._teacher_checkpoint() if job.training.init == "teacher" else None
                train(job.spec, self.data, directory, config, teacher=teacher, resume=self.resume,
                      progress=self.progress, log=self._epoch_logger(directory), init=init)
            if self.is_main:
                self._write_result(job)
            _barrier(self.world)
        result = _read_json(os.path.join(directory, RESULT_JSON))
        self.bar.update(1)
        self._say(f"{job.name}: {result['accuracy']:.2f}% with {result['relu_count']:,} ReLUs "
                  f"({result['train_seconds']:.0f} s)")
        return result

    def _write_result(self, job: Job) -> None:
        final = os.path.join(self._job_dir(job.name), FINAL)
        metrics = load_checkpoint(final).metrics
        record = {"name": job.name, "kind": job.kind, "parent": job.parent, "relu_count": relu_count(job.spec),
                  "accuracy": metrics["test_acc"], "spec": job.spec.to_dict(),
                  "checkpoint": os.path.relpath(final, self.out_dir), "train_seconds": metrics["train_seconds"],
                  "epochs": metrics["epochs"], "test_images": len(self.data.test),
                  "teacher": self._relative(metrics.get("teacher")), "kd": dataclasses.asdict(job.kd) if job.kd else None,
                  "init": self._relative(metrics.get("init"))}
        atomic_write_json(os.path.join(self._job_dir(job.name), RESULT_JSON), record)

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
        self.bar.update(1)
        return _read_json(path)

    def _teacher_checkpoint(self) -> str:
        return self.teacher_path or os.path.abspath(os.path.join(self._job_dir(TEACHER), FINAL))

    def _epoch_logger(self, directory: str):
        def log(line: str) -> None:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "train.log"), "a") as f:
                f.write(line + "\n")
        return log

    # -- run directory --------------------------------------------------------------------------
    def _claim_directory(self) -> None:
        """A fresh DIR gets run.json; an existing run continues only with --resume and the same settings."""
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
        _barrier(self.world)

    def _meta(self, complete: bool) -> dict:
        return {"data": self.identity["data"], "quick": self.identity["quick"], "test_images": len(self.data.test),
                "base_spec": self.base.to_dict(), "budgets": self.config.budgets, "config": self.identity["config"],
                "complete": complete}

    def _relative(self, path: str | None) -> str | None:
        if path is None:
            return None
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.out_dir))
        return path if rel.startswith("..") else rel

    def _say(self, text: str) -> None:
        if self.is_main:
            self.out(text)


def jobs_in_progress(out_dir: str) -> list[dict]:
    """The jobs of run DIR that started but have no record yet, with how far each got: what
    `deepreduce frontier` shows of a run spread over sessions besides its frontier so far."""
    jobs = os.path.join(out_dir, JOBS_DIR)
    rows = []
    for name in sorted(os.listdir(jobs)) if os.path.isdir(jobs) else []:
        directory = os.path.join(jobs, name)
        # The record alone decides, not _is_done: an external --teacher has a record and no final.pt.
        if os.path.isdir(directory) and not os.path.isfile(os.path.join(directory, RESULT_JSON)):
            rows.append({"name": name, "trained": os.path.isfile(os.path.join(directory, FINAL)),
                         **(training_progress(directory) or {"epochs_done": 0})})
    return rows


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


def _rank_and_world() -> tuple[int, int]:
    from ..train import _distributed  # the one place that sets up torch.distributed for training
    return _distributed()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
