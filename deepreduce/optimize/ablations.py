"""The ablations of a DeepReDuce run: what KD, the criticality order and thinning each contribute.

Pure functions, records in and records out. KD and the order need extra jobs at one budget's pick
(`ablation_jobs`); thinning is read off the candidates the search trained anyway (`thinning_rows`).
A row compares the run's own setting (``ours``) with the alternative (``other``), both trained with
the same epochs::

    {"question": "kd" | "order" | "thinning", "ours": side, "other": side, "accuracy_gain": ours - other}
    side = {"name", "setting", "relu_count", "accuracy", "train_seconds"}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..spec import ModelSpec
from .candidates import all_stages, stage_label

ABLATION_PREFIX = "ablation-"


@dataclass(frozen=True)
class AblationJob:
    name: str
    question: str            # kd | order
    spec: ModelSpec
    kd: bool                 # distil from the teacher?
    ours_setting: str
    other_setting: str


# The order each criticality order is ablated against: its reverse.
OTHER_ORDER = {"critical": "reverse", "reverse": "critical", "per_relu": "reverse per_relu"}


def ablation_jobs(pick: dict, base: ModelSpec, order: list[int], kd_enabled: bool, *, switch_kd: bool = True,
                  other_order: bool = True, order_mode: str = "critical") -> list[AblationJob]:
    """The jobs that ablate `pick` (a candidate record): the same spec with KD switched, and the same
    shape keeping the stages the other criticality order keeps (none when both orders keep the same)."""
    spec = ModelSpec.from_dict(pick["spec"])
    jobs = []
    if switch_kd:
        on, off = "KD from the teacher", "no KD (labels only)"
        jobs.append(AblationJob(f"{ABLATION_PREFIX}{'nokd' if kd_enabled else 'kd'}-{pick['name']}", "kd", spec,
                                not kd_enabled, on if kd_enabled else off, off if kd_enabled else on))
    kept = [s for s in all_stages(base) if s not in spec.cull]
    other = order[::-1][:len(kept)]  # `order` is this run's culling order; its reverse is the other one's
    if other_order and sorted(other) != sorted(kept):
        label = stage_label(kept)
        suffix = pick["name"][len(label):] if pick["name"].startswith(label) else ""
        other_spec = spec.replace(cull=tuple(s for s in all_stages(base) if s not in other))
        ours_mode, other_mode = order_mode, OTHER_ORDER[order_mode]
        jobs.append(AblationJob(f"{ABLATION_PREFIX}order-{stage_label(other)}{suffix}", "order", other_spec,
                                kd_enabled, f"{ours_mode} order: keeps {_stages(kept)}",
                                f"{other_mode} order: keeps {_stages(other)}"))
    return jobs


def job_row(job: AblationJob, pick: dict, result: dict) -> dict:
    return _row(job.question, _side(pick, job.ours_setting), _side(result, job.other_setting))


def thinning_rows(candidates: list[dict]) -> list[dict]:
    """Each thinned candidate against the culled candidate nearest in ReLU count (within 2x, ties:
    fewer ReLUs): does thinning beat culling more stages at a similar ReLU count?"""
    culled = [c for c in candidates if c["kind"] == "culled"]
    rows = []
    for thin in sorted((c for c in candidates if c["kind"] == "thinned"), key=lambda c: c["relu_count"]):
        near = [c for c in culled if c["relu_count"] and thin["relu_count"]
                and abs(math.log2(c["relu_count"] / thin["relu_count"])) <= 1]
        if near:
            match = min(near, key=lambda c: (abs(math.log2(c["relu_count"] / thin["relu_count"])), c["relu_count"]))
            rows.append(_row("thinning", _side(thin, "thinned (one ReLU per block)"),
                             _side(match, "culled only (all ReLUs of the kept stages)")))
    return rows


def _row(question: str, ours: dict, other: dict) -> dict:
    return {"question": question, "ours": ours, "other": other,
            "accuracy_gain": round(ours["accuracy"] - other["accuracy"], 4)}


def _side(record: dict, setting: str) -> dict:
    return {"name": record["name"], "setting": setting, "relu_count": record["relu_count"],
            "accuracy": record["accuracy"], "train_seconds": record.get("train_seconds")}


def _stages(stages) -> str:
    return "+".join(f"S{s}" for s in sorted(stages))
