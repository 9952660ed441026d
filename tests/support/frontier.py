"""What every finished optimizer run directory must hold (frontier JSON, CSV and plot)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from deepreduce.optimize.pareto import best_within, dominates, pareto_front
from deepreduce.optimize.report import load_frontier
from deepreduce.relus import relu_count
from deepreduce.spec import ModelSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
