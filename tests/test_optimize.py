"""The DeepReDuce optimizer: criticality ordering, candidate generation and ReLU counts, Pareto
selection, budget picks, pruning, config validation, the pipeline's job/resume logic (with a fake
trainer and with real training on tiny data), reports, the CLI, SIGKILL + --resume, and the
`--quick` pipeline end to end on real CIFAR-10 (slow)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepreduce.checkpoint import Checkpoint, load_checkpoint
from deepreduce.cli import main
from deepreduce.data import Dataset
from deepreduce.errors import UserError
from deepreduce.models import build_model
from deepreduce.optimize import candidates as cand
from deepreduce.optimize import pipeline
from deepreduce.optimize.config import builtin_config_path, config_from_dict, deep_merge, load_config
from deepreduce.optimize.pareto import best_within, budget_picks, dominates, pareto_front, prune_reason
from deepreduce.optimize.report import FRONTIER_JSON, frontier_document, load_frontier, write_reports
from deepreduce.relus import measured_relu_count, relu_count
from deepreduce.spec import ModelSpec
from support.env import PERSISTENT_CACHE, free_port, python_cmd, subprocess_env
from support.optimize import (PNG_MAGIC, TINY_TRAINING, by_relus, check_frontier_files, default_raw, run_fake,
                              tiny_config, tiny_data, wait_for)

pytestmark = pytest.mark.usefixtures("deepreduce_env")

train_module = importlib.import_module("deepreduce.train")  # (the package exports the function train)
R18 = ModelSpec()                      # ResNet18, alpha 1, 32x32, stem ReLU on: the teacher shape
WRN = ModelSpec(arch="wrn22_8")


def config_with(**sections) -> "object":
    """The default config with some sections deep-merged over it (no --quick)."""
    return config_from_dict(deep_merge(default_raw(), sections))


def pt(name, relus, acc) -> dict:
    return {"name": name, "relu_count": relus, "accuracy": acc}


# -- step 2: criticality ------------------------------------------------------------------------------

def test_criticality_order_from_accuracies():
    relus = cand.stage_relus(R18)
    assert relus == {1: 262144, 2: 131072, 3: 65536, 4: 32768}
    table = cand.criticality_table({1: 40.0, 2: 55.0, 3: 60.0, 4: 50.0}, 35.0, relus)
    assert [r["stage"] for r in table] == [3, 2, 4, 1]
    assert [r["gain"] for r in table] == [25.0, 20.0, 15.0, 5.0]
    assert table[0]["gain_per_1k_relus"] == pytest.approx(25.0 / 65.536, rel=1e-5)
    assert cand.culling_order(table, "critical") == [3, 2, 4, 1]
    assert cand.culling_order(table, "reverse") == [1, 4, 2, 3]
    # per 1K ReLUs: S4 15/32.768 = 0.458, S3 25/65.536 = 0.381, S2 20/131.072 = 0.153, S1 5/262.144 = 0.019
    assert cand.culling_order(table, "per_relu") == [4, 3, 2, 1]


def test_per_relu_order_on_the_cifar10_run():
    # The CIFAR-10 run of docs/RESULTS.md (alpha 0.5, warm-started criticality): S2 gains most, S1 second, but
    # S1 costs 131,072 ReLUs. Per 1K ReLUs: S4 12.07/16.384 = 0.737, S2 31.15/65.536 = 0.475,
    # S3 13.19/32.768 = 0.403, S1 23.41/131.072 = 0.179.
    relus = cand.stage_relus(ModelSpec(alpha=0.5))
    table = cand.criticality_table({1: 55.32, 2: 63.06, 3: 45.10, 4: 43.98}, 31.91, relus)
    assert cand.culling_order(table, "critical") == [2, 1, 3, 4]
    assert cand.culling_order(table, "per_relu") == [4, 2, 3, 1]
    culled = cand.culled_candidates(ModelSpec(alpha=0.5), cand.culling_order(table, "per_relu"), stem_relu=False)
    # S4 16,384; + S2 65,536; + S3 32,768; + S1 131,072
    assert [(c.name, c.relu_count) for c in culled] == [
        ("keep-s4", 16384), ("keep-s2s4", 81920), ("keep-s2s3s4", 114688), ("keep-s1s2s3s4", 245760)]


def test_criticality_ties_prefer_the_cheaper_stage_then_the_lower_one():
    relus = {1: 262144, 2: 131072, 3: 65536}
    table = cand.criticality_table({1: 50.0, 2: 50.0, 3: 10.0}, 20.0, relus)
    assert [r["stage"] for r in table] == [2, 1, 3]  # S2 and S1 gain the same; S2 is cheaper; S3 loses
    assert table[-1]["gain"] == -10.0
    same = cand.criticality_table({2: 30.0, 1: 30.0}, 20.0, {1: 100, 2: 100})
    assert [r["stage"] for r in same] == [1, 2]


def test_criticality_specs_keep_one_stage_and_drop_the_stem():
    specs = cand.criticality_specs(R18)
    assert list(specs) == ["crit-none", "crit-s1", "crit-s2", "crit-s3", "crit-s4"]
    assert relu_count(specs["crit-none"]) == 0
    assert [relu_count(specs[f"crit-s{s}"]) for s in (1, 2, 3, 4)] == [262144, 131072, 65536, 32768]
    assert all(not s.stem_relu and s.thin == "none" for s in specs.values())
    wrn = cand.criticality_specs(WRN)
    assert list(wrn) == ["crit-none", "crit-s1", "crit-s2", "crit-s3"]
    assert relu_count(wrn["crit-s3"]) == 262144  # 65,536 (s3.b1.r2 at 16x16) + 6 x 32,768 (incl. s3.head)
    assert sum(relu_count(wrn[f"crit-s{s}"]) for s in (1, 2, 3)) == relu_count(WRN) == 1392640


# -- steps 3-5: candidates ------------------------------------------------------------------------------

def test_culled_and_thinned_candidates_hand_counts():
    culled = cand.culled_candidates(R18, [3, 2, 4, 1], stem_relu=False)
    assert [c.name for c in culled] == ["keep-s3", "keep-s2s3", "keep-s2s3s4", "keep-s1s2s3s4"]
    assert [c.stages for c in culled] == [(3,), (3, 2), (3, 2, 4), (3, 2, 4, 1)]
    assert [c.relu_count for c in culled] == [65536, 196608, 229376, 491520]
    thinned = [cand.thinned_candidate(c, "bottom") for c in culled]
    assert [c.name for c in thinned][:2] == ["keep-s3-thin", "keep-s2s3-thin"]
    assert [c.relu_count for c in thinned] == [32768, 98304, 114688, 245760]
    assert thinned[1].spec.cull == (1, 4) and thinned[1].spec.thin == "bottom" and not thinned[1].spec.stem_relu
    assert cand.thinned_candidate(culled[0], "top").name == "keep-s3-thin-top"
    with_stem = cand.culled_candidates(R18, [3], stem_relu=True)[0]
    assert with_stem.relu_count == 65536 + 65536  # the stem ReLU is 64 x 32 x 32


def test_reshaped_candidates_hand_counts():
    parent = cand.thinned_candidate(cand.culled_candidates(R18, [3], False)[0], "bottom")  # 32,768
    grid = [(0.5, 1.0, (2, 2, 2, 2)), (1.0, 0.5, (2, 2, 2, 2)), (0.5, 0.5, (1, 1, 1, 1))]
    shrunk = cand.reshaped_candidates(parent, R18, grid)
    assert [c.name for c in shrunk] == ["keep-s3-thin-a0.5", "keep-s3-thin-r0.5", "keep-s3-thin-a0.5-r0.5-b1111"]
    assert [c.relu_count for c in shrunk] == [16384, 8192, 2048]
    assert all(c.parent == "keep-s3-thin" and c.kind == "reshaped" for c in shrunk)
    assert shrunk[2].spec.alpha == 0.5 and shrunk[2].spec.rho == 0.5 and shrunk[2].spec.blocks == (1, 1, 1, 1)


def test_reshape_grid_excludes_the_parent_and_multiplies_the_base():
    config = config_with(base={"alpha": 0.5}, reshape={"alphas": [0.5, 1.0], "rhos": [0.5], "blocks": [[1, 2, 2, 2]]})
    grid = config.reshape.grid(config.base)
    assert len(grid) == 2 * 2 * 2 - 1 and (1.0, 1.0, (2, 2, 2, 2)) not in grid
    base = ModelSpec(alpha=0.5)
    everything = cand.all_candidates(config, base, [1, 2, 3, 4])
    reshaped = [c for c in everything if c.kind == "reshaped"]
    assert len(reshaped) == 4 * 7  # apply_to: thinned (4 parents) x 7 grid points
    assert {c.spec.alpha for c in reshaped} == {0.25, 0.5}
    assert [c.relu_count for c in reshaped] == sorted(c.relu_count for c in reshaped)  # fewest first
    assert all(c.relu_count < next(p for p in everything if p.name == c.parent).relu_count for c in reshaped)
    culled_only = config_with(reshape={"apply_to": "culled"}, thinning={"enabled": False})
    assert config_with(reshape={"enabled": False}, thinning={"enabled": False})
    parents = cand.parent_candidates(culled_only, R18, [1, 2, 3, 4])
    assert [p.kind for p in parents] == ["culled"] * 4
    assert {c.parent for c in cand.reshaped_for(culled_only, R18, parents)} == {p.name for p in parents}
    assert cand.reshaped_for(config_with(reshape={"enabled": False}), R18, parents) == []


@pytest.mark.parametrize("config_name,arch", [("resnet18-cifar.yaml", "resnet18"), ("wrn22_8-cifar.yaml", "wrn22_8"),
                                              ("resnet18-cifar10-cpu.yaml", "resnet18")])
@pytest.mark.parametrize("quick", [False, True])
def test_every_builtin_candidate_count_matches_relu_count_and_hooks(config_name, arch, quick):
    config = load_config(config_name, quick=quick)
    base = ModelSpec(arch=arch, alpha=config.base.alpha, rho=config.base.rho)
    order = list(range(base.num_stages, 0, -1))
    everything = cand.all_candidates(config, base, order)
    assert len({c.name for c in everything}) == len(everything)
    by_stage = cand.stage_relus(base)
    for c in everything:
        assert c.relu_count == relu_count(c.spec)
        if c.kind == "culled":  # culling is additive over stages
            assert c.relu_count == sum(by_stage[s] for s in c.stages)
    small = everything if quick else everything[:2]  # full-width forward passes are slow on a CPU
    for c in small:
        assert measured_relu_count(c.spec) == c.relu_count, c.name


def test_wrn_candidates_hand_counts():
    culled = cand.culled_candidates(WRN, [3, 1, 2], stem_relu=False)
    assert [c.name for c in culled] == ["keep-s3", "keep-s1s3", "keep-s1s2s3"]
    assert culled[0].relu_count == 262144 and culled[-1].relu_count == 1392640
    thin = cand.thinned_candidate(culled[0], "bottom")
    assert thin.relu_count == 3 * 32768 + 32768  # r1 of 3 blocks at 512 x 8 x 8, plus s3.head


# -- step 7: Pareto frontier, budgets, pruning -----------------------------------------------------------

def test_pareto_front_hand_made_points():
    a, b, g = pt("a", 100, 50.0), pt("b", 200, 60.0), pt("g", 50, 30.0)
    dominated = [pt("c", 150, 40.0), pt("d", 200, 55.0), pt("e", 300, 60.0), pt("h", 60, 30.0)]
    duplicate = pt("f", 100, 50.0)
    front = pareto_front([b, *dominated, duplicate, a, g])
    assert [p["name"] for p in front] == ["g", "a", "b"]
    assert front[1] is a  # points come back unchanged (identity), fewest ReLUs first
    assert pareto_front([]) == []
    assert pareto_front([a]) == [a]
    assert [p["name"] for p in pareto_front([pt("x", 10, 5.0), pt("y", 10, 7.0)])] == ["y"]  # same ReLUs
    assert [p["name"] for p in pareto_front([pt("x", 10, 5.0), pt("y", 20, 5.0)])] == ["x"]  # same accuracy
    assert dominates(a, dominated[0]) and not dominates(a, duplicate) and not dominates(a, b)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 20)), max_size=30))
def test_pareto_front_is_non_dominated_and_covers_every_point(pairs):
    points = [pt(f"p{i}", r, float(a)) for i, (r, a) in enumerate(pairs)]
    front = pareto_front(points)
    assert not any(dominates(q, p) for p in front for q in points)
    for p in points:
        assert any(q is p or dominates(q, p) or (q["relu_count"], q["accuracy"]) == (p["relu_count"], p["accuracy"])
                   for q in front)
    assert len({(p["relu_count"], p["accuracy"]) for p in front}) == len(front)


def test_budget_picks():
    points = [pt("b", 100, 50.0), pt("a", 100, 50.0), pt("c", 80, 50.0), pt("d", 120, 70.0), pt("e", 20, 10.0)]
    picks = budget_picks(points, [100000, 100, 79, 10])
    assert picks["100000"]["name"] == "d"
    assert picks["100"]["name"] == "c"  # ties in accuracy: fewer ReLUs
    assert picks["79"]["name"] == "e"
    assert picks["10"] is None
    assert best_within([pt("b", 5, 1.0), pt("a", 5, 1.0)], 5)["name"] == "a"
    assert budget_picks([], [5]) == {"5": None}


def test_prune_reason():
    parent = pt("keep-s2s3-thin", 98304, 60.0)
    variant = pt("keep-s2s3-thin-a0.5", 49152, 0.0)
    better = pt("keep-s3-thin", 32768, 61.0)
    assert "keep-s3-thin" in prune_reason(variant, parent, [parent, better])
    assert prune_reason(variant, parent, [parent, pt("keep-s3-thin", 32768, 60.0)]) is None  # not higher
    assert prune_reason(variant, parent, [parent, pt("x", 60000, 90.0)]) is None  # more ReLUs than the variant
    assert prune_reason(variant, parent, []) is None


# -- config -------------------------------------------------------------------------------------------

def test_builtin_configs_load():
    config = load_config()
    assert config.base.arch == "resnet18" and config.budgets == [100000, 50000, 15000]
    assert config.thinning.position == "bottom" and config.criticality.order == "critical" and config.kd.enabled
    quick = load_config(quick=True)
    assert quick.base.alpha <= 0.25 and quick.train.candidates.subset <= 2000 and quick.train.candidates.epochs <= 2
    wrn = load_config("wrn22_8-cifar.yaml")
    assert wrn.base.arch == "wrn22_8" and wrn.reshape.blocks == [[1, 1, 1]]
    assert load_config(builtin_config_path("wrn22_8-cifar.yaml")) == wrn
    cpu = load_config("resnet18-cifar10-cpu.yaml")  # the CIFAR-10 run sized for a 2-core CPU
    assert cpu.base.alpha == 0.5 and cpu.train.criticality.subset == 15000 and cpu.train.candidates.epochs == 1
    assert cpu.kd.enabled and cpu.reshape.alphas == [] and cpu.reshape.rhos == [0.5]
    assert cpu.pruning.max_relus == 100000 and cpu.finals.budgets == [50000, 15000] and cpu.ablations.budget == 50000
    assert cpu.train.finals.epochs == 24 and cpu.train.finals.compile and cpu.criticality.order == "per_relu"
    assert cpu.train.criticality.init == cpu.train.candidates.init == cpu.train.finals.init == "teacher"
    assert load_config().finals.budgets == [] and load_config().ablations.budget is None  # the default: opt-in
    # the committed frontier's run (docs/frontier/) differs from the CPU config only in its order and epochs
    docs = Path(__file__).resolve().parents[1] / "docs"
    critical = load_config(str(docs / "frontier" / "critical-order.yaml"))
    assert critical.criticality.order == "critical" and critical.train.finals.epochs == 15
    assert dataclasses.replace(critical, criticality=cpu.criticality, train=cpu.train) == cpu
    # docs/frontier-per-relu/ is the CPU config's complete run: its frontier.json records that config
    per_relu = json.loads((docs / "frontier-per-relu" / "frontier.json").read_text())
    assert per_relu["meta"]["complete"] and per_relu["meta"]["config"] == cpu.to_dict()


def test_a_user_file_changes_only_its_keys(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("kd:\n  enabled: false\ntrain:\n  candidates:\n    epochs: 3\n")
    config = load_config(str(path))
    assert not config.kd.enabled and config.train.candidates.epochs == 3
    assert config.train.candidates.batch_size == load_config().train.candidates.batch_size
    assert config.train.teacher == load_config().train.teacher


@pytest.mark.parametrize("text,words", [
    ("budget: [1]", ["budget", "did you mean budgets"]),
    ("train:\n  teacher:\n    epoch: 3", ["train.teacher.epoch", "epochs"]),
    ("train:\n  teacher:\n    epochs: ten", ["train.teacher.epochs", "integer"]),
    ("train:\n  teacher:\n    epochs: 0", ["train.teacher.epochs", ">= 1"]),
    ("train:\n  candidates:\n    lr: -1", ["train.candidates.lr", "positive"]),
    ("base:\n  alpha: 5", ["base.alpha", "(0, 4]"]),
    ("base:\n  arch: vgg", ["base.arch", "resnet18"]),
    ("reshape:\n  alphas: [1.5]", ["reshape.alphas", "(0, 1]"]),
    ("reshape:\n  alphas: 0.5", ["reshape.alphas", "list"]),
    ("reshape:\n  alphas: []\n  rhos: []\n  blocks: []", ["grid is empty", "reshape.enabled: false"]),
    ("reshape:\n  blocks: [[1, 1, 1]]", ["reshape.blocks[0]", "4 positive"]),
    ("reshape:\n  blocks: [[3, 2, 2, 2]]", ["reshape.blocks[0]", "deeper"]),
    ("reshape:\n  apply_to: everything", ["reshape.apply_to", "thinned"]),
    ("thinning:\n  enabled: false", ["reshape.apply_to", "nothing would be reshaped"]),
    ("criticality:\n  order: random", ["criticality.order", "reverse"]),
    ("thinning:\n  position: none", ["thinning.position", "bottom"]),
    ("kd:\n  alpha: 1.5", ["kd.alpha", "[0, 1]"]),
    ("kd:\n  enabled: 'yes'", ["kd.enabled", "true or false"]),
    ("kd: 3", ["kd", "mapping"]),
    ("budgets: [0]", ["budgets", "positive"]),
    ("pruning:\n  max_relus: 0", ["pruning.max_relus", "positive"]),
    ("finals:\n  budgets: [-5]", ["finals.budgets", "positive"]),
    ("ablations:\n  budget: 0", ["ablations.budget", "positive"]),
    ("ablations:\n  kd: maybe", ["ablations.kd", "true or false"]),
    ("evaluation:\n  test_subset: 0", ["evaluation.test_subset", "positive"]),
    ("train:\n  candidates:\n    init: pretrained", ["train.candidates.init", "scratch, teacher"]),
    ("train:\n  teacher:\n    init: teacher", ["train.teacher.init", "must be scratch"]),
    ("quick:\n  train:\n    teacher:\n      epoch: 1", ["quick.train.teacher.epoch", "epochs"]),
    ("- a\n- b", ["mapping"]),
    ("base: [unclosed", ["not valid YAML"]),
])
def test_config_errors_name_the_key_and_the_fix(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(UserError) as err:
        load_config(str(path))
    for word in words:
        assert word in str(err.value), str(err.value)


def test_config_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="does not exist.*resnet18-cifar.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(str(tmp_path / "empty.yaml")) == load_config()


def test_quick_overrides_apply_only_with_quick(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("quick:\n  budgets: [7]\n")
    assert load_config(str(path)).budgets == [100000, 50000, 15000]
    assert load_config(str(path), quick=True).budgets == [7]


# -- the pipeline with a fake trainer (fast, deterministic) -----------------------------------------------

def test_pipeline_orders_jobs_by_criticality_and_distils(tmp_path, monkeypatch):
    doc, fake, out = run_fake(tmp_path, monkeypatch)
    names = [c["name"] for c in fake.calls]
    assert names[:6] == ["teacher", "crit-none", "crit-s1", "crit-s2", "crit-s3", "crit-s4"]
    assert names[6:10] == ["keep-s3", "keep-s2s3", "keep-s2s3s4", "keep-s1s2s3s4"]  # criticality 3 > 2 > 4 > 1
    assert names[10:14] == [n + "-thin" for n in names[6:10]]
    crit = json.loads((out / "criticality.json").read_text())
    assert crit["order"] == ["S3", "S2", "S4", "S1"] and crit["no_relu_accuracy"] == 20.0
    teacher = str((out / "jobs" / "teacher" / "final.pt").resolve())
    assert all(c["teacher"] is None for c in fake.calls[:6])  # teacher and criticality nets: no KD
    assert all(c["teacher"] == teacher and c["config"].kd_alpha == 0.9 for c in fake.calls[6:])
    assert doc["stage_order"] == [3, 2, 4, 1] and doc["teacher"]["name"] == "teacher"
    # With accuracy rising with ReLUs, every candidate is on the frontier and nothing is pruned.
    assert len(doc["frontier"]) == len(doc["candidates"]) == len(fake.calls) - 6 and doc["pruned"] == []
    for point in doc["candidates"]:
        result = json.loads((out / "jobs" / point["name"] / "result.json").read_text())
        assert result == point and (out / point["checkpoint"]).is_file()
        assert not os.path.isabs(point["checkpoint"])


def test_pipeline_reverse_order_and_no_kd(tmp_path, monkeypatch):
    config = tiny_config(criticality={"order": "reverse"}, kd={"enabled": False}, thinning={"enabled": False},
                         reshape={"enabled": False})
    doc, fake, _ = run_fake(tmp_path, monkeypatch, config=config)
    assert [c["name"] for c in fake.calls[6:]] == ["keep-s1", "keep-s1s4", "keep-s1s2s4", "keep-s1s2s3s4"]
    assert all(c["teacher"] is None for c in fake.calls)
    assert doc["stage_order"] == [1, 4, 2, 3]


def test_pipeline_prunes_reshaped_variants_that_cannot_help(tmp_path, monkeypatch):
    def accuracy(name, spec):
        if name == "keep-s3-thin":
            return 90.0  # few ReLUs, best accuracy: every variant of a larger parent is pointless
        return by_relus(name, spec)
    doc, fake, _ = run_fake(tmp_path, monkeypatch, accuracy)
    trained = {c["name"] for c in fake.calls}
    pruned = {p["name"]: p for p in doc["pruned"]}
    assert pruned and not (set(pruned) & trained)
    assert all(p["parent"] != "keep-s3-thin" for p in pruned.values())
    best = next(c for c in doc["candidates"] if c["name"] == "keep-s3-thin")
    assert all(p["reason"].startswith("keep-s3-thin has") and p["relu_count"] >= best["relu_count"]
               for p in pruned.values())
    assert {p["name"] for p in doc["frontier"]} >= {"keep-s3-thin"}
    kept = tiny_config(pruning={"enabled": False})
    doc2, fake2, _ = run_fake(tmp_path, monkeypatch, accuracy, config=kept, out=tmp_path / "no-pruning")
    assert doc2["pruned"] == [] and len(fake2.calls) == len(fake.calls) + len(pruned)


def test_pipeline_resume_skips_finished_jobs_and_rebuilds_a_missing_record(tmp_path, monkeypatch):
    _, fake, out = run_fake(tmp_path, monkeypatch)
    (out / "jobs" / "keep-s3" / "result.json").unlink()          # killed between final.pt and the record
    (out / "jobs" / "keep-s2s3" / "final.pt").unlink()           # killed mid-job
    stamp = (out / "jobs" / "teacher" / "result.json").stat().st_mtime_ns
    doc, fake2, _ = run_fake(tmp_path, monkeypatch, resume=True)
    assert [c["name"] for c in fake2.calls] == ["keep-s2s3"] and fake2.calls[0]["resume"]
    assert (out / "jobs" / "keep-s3" / "result.json").is_file()
    assert (out / "jobs" / "teacher" / "result.json").stat().st_mtime_ns == stamp
    assert len(doc["candidates"]) == len(fake.calls) - 6


def test_pipeline_refuses_to_mix_runs(tmp_path, monkeypatch):
    run_fake(tmp_path, monkeypatch)
    with pytest.raises(UserError, match="already holds an optimize run: pass --resume"):
        run_fake(tmp_path, monkeypatch)
    with pytest.raises(UserError, match="config differ"):
        run_fake(tmp_path, monkeypatch, config=tiny_config(kd={"alpha": 0.5}), resume=True)


def test_pipeline_max_relus_cap_skips_big_candidates_not_their_small_variants(tmp_path, monkeypatch):
    # tiny base (alpha 0.125, 8x8): stage ReLUs S1 2048, S2 1024, S3 512, S4 256; order S3 > S2 > S4 > S1
    doc, fake, _ = run_fake(tmp_path, monkeypatch, config=tiny_config(pruning={"max_relus": 1000}))
    trained = [c["name"] for c in fake.calls]
    pruned = {p["name"]: p["reason"] for p in doc["pruned"]}
    assert pruned["keep-s2s3"] == "1,536 ReLUs > pruning.max_relus 1,000"
    assert pruned["keep-s1s2s3s4-thin"] == "1,920 ReLUs > pruning.max_relus 1,000"
    assert {"keep-s2s3s4", "keep-s1s2s3s4"} <= set(pruned)
    # the capped parent keep-s1s2s3s4-thin (1,920) has no accuracy to prune by: its variants under the cap
    # (a0.5 960, r0.5 576: stage 3 and 4 stay 1x1, a0.5-r0.5 288; thinned only, reshape.apply_to) are trained
    assert {"keep-s1s2s3s4-thin-a0.5", "keep-s1s2s3s4-thin-r0.5", "keep-s1s2s3s4-thin-a0.5-r0.5"} <= set(trained)
    assert all(relu_count(ModelSpec.from_dict(c["spec"])) <= 1000 for c in doc["candidates"])
    assert {"keep-s3", "keep-s3-thin", "keep-s2s3-thin", "keep-s2s3s4-thin", "keep-s2s3-thin-a0.5"} <= set(trained)
    assert not set(pruned) & set(trained)


def test_pipeline_max_relus_cap_applies_to_variants_too(tmp_path, monkeypatch):
    # cap 600: keep-s1s2s3s4-thin-a0.5 (960) is capped itself, its siblings r0.5 (576) and a0.5-r0.5 (288)
    # are not
    doc, fake, _ = run_fake(tmp_path, monkeypatch, config=tiny_config(pruning={"max_relus": 600}))
    trained = {c["name"] for c in fake.calls}
    pruned = {p["name"]: p["reason"] for p in doc["pruned"]}
    assert pruned["keep-s1s2s3s4-thin-a0.5"] == "960 ReLUs > pruning.max_relus 600"
    assert {"keep-s1s2s3s4-thin-r0.5", "keep-s1s2s3s4-thin-a0.5-r0.5"} <= trained


def test_pipeline_finals_and_ablations(tmp_path, monkeypatch):
    finals_training = {**TINY_TRAINING, "epochs": 3}
    config = tiny_config(finals={"budgets": [800, 790]}, ablations={"budget": 800}, train={"finals": finals_training})
    doc, fake, out = run_fake(tmp_path, monkeypatch, config=config)
    calls = {c["name"]: c for c in fake.calls}
    teacher = str((out / "jobs" / "teacher" / "final.pt").resolve())
    # the most accurate candidate within 800 ReLUs (accuracy rises with ReLUs here): keep-s2s3-thin, 768
    # ReLUs; both budgets pick it, so it is retrained once, with train.finals and KD
    names = [c["name"] for c in fake.calls]
    assert names[-3:] == ["final-keep-s2s3-thin", "ablation-nokd-keep-s2s3-thin", "ablation-order-keep-s1s4-thin"]
    final = calls["final-keep-s2s3-thin"]
    assert final["config"].epochs == 3 and final["teacher"] == teacher
    assert calls["ablation-nokd-keep-s2s3-thin"]["teacher"] is None
    assert calls["ablation-nokd-keep-s2s3-thin"]["config"].epochs == 1  # the search's epochs, like the pick
    assert calls["ablation-order-keep-s1s4-thin"]["teacher"] == teacher
    final_point = next(p for p in doc["candidates"] if p["name"] == "final-keep-s2s3-thin")
    assert final_point["kind"] == "final" and final_point["parent"] == "keep-s2s3-thin"
    assert final_point["relu_count"] == 768 and final_point["epochs"] == 3
    rows = {(r["question"], r["ours"]["name"]): r for r in doc["ablations"]}
    kd = rows["kd", "keep-s2s3-thin"]
    assert kd["other"]["name"] == "ablation-nokd-keep-s2s3-thin" and kd["other"]["relu_count"] == 768
    order = rows["order", "keep-s2s3-thin"]
    # the reverse order (S1 > S4 > S2 > S3) keeps S1 and S4: thinned, (2048 + 256) / 2 ReLUs
    assert order["other"]["name"] == "ablation-order-keep-s1s4-thin" and order["other"]["relu_count"] == 1152
    assert order["accuracy_gain"] == pytest.approx(order["ours"]["accuracy"] - order["other"]["accuracy"], abs=1e-4)
    # thinned vs. the culled candidate nearest in ReLU count (hand-picked from 512/1536/1792/3840)
    thinning = {r["ours"]["name"]: r["other"]["name"] for r in doc["ablations"] if r["question"] == "thinning"}
    assert thinning == {"keep-s3-thin": "keep-s3", "keep-s2s3-thin": "keep-s3", "keep-s2s3s4-thin": "keep-s2s3",
                        "keep-s1s2s3s4-thin": "keep-s2s3s4"}
    assert doc["meta"]["complete"] and load_frontier(str(out)) == json.loads(json.dumps(doc))
    text = pipeline.format_frontier_table(doc)
    assert "ablations" in text and "ablation-order-keep-s1s4-thin" in text


def test_pipeline_warm_starts_the_jobs_whose_init_is_teacher(tmp_path, monkeypatch):
    config = tiny_config(train={"candidates": {"init": "teacher"}, "finals": {"init": "teacher"}},
                         finals={"budgets": [800]}, ablations={"budget": 800})
    doc, fake, out = run_fake(tmp_path, monkeypatch, config=config)
    teacher = str((out / "jobs" / "teacher" / "final.pt").resolve())
    trained = {p["name"] for p in doc["candidates"]}  # the search candidates and the finals
    for call in fake.calls:
        warm = call["name"] in trained or call["name"].startswith("ablation-")
        assert call["init"] == (teacher if warm else None), call["name"]  # teacher and criticality: scratch
    assert all(p["init"] == "jobs/teacher/final.pt" for p in doc["candidates"])
    # the default (DeepReDuce's) trains every job from scratch
    _, fake, _ = run_fake(tmp_path, monkeypatch, out=tmp_path / "scratch")
    assert all(c["init"] is None for c in fake.calls)


def test_ablation_jobs_hand_cases():
    from deepreduce.optimize.ablations import ablation_jobs
    base = ModelSpec(alpha=0.5)
    pick = {"name": "keep-s2s3-thin-r0.5", "spec": cand.keep_only(base, (2, 3)).replace(thin="bottom", rho=0.5).to_dict()}
    jobs = ablation_jobs(pick, base, [2, 3, 1, 4], kd_enabled=True)
    assert [j.name for j in jobs] == ["ablation-nokd-keep-s2s3-thin-r0.5", "ablation-order-keep-s1s4-thin-r0.5"]
    assert [j.kd for j in jobs] == [False, True]
    # alpha 0.5, rho 0.5 (16x16 after the stem): S1 32ch 16x16, S4 256ch 2x2, thinned: (32768 + 4096) / 2
    assert relu_count(jobs[1].spec) == 18432 and jobs[1].spec.rho == 0.5 and jobs[1].spec.thin == "bottom"
    # KD off in the run: the ablation switches it on; a pick keeping every stage has no order ablation
    everything = {"name": "keep-s1s2s3s4", "spec": cand.keep_only(base, (1, 2, 3, 4)).to_dict()}
    jobs = ablation_jobs(everything, base, [2, 3, 1, 4], kd_enabled=False)
    assert [(j.name, j.kd) for j in jobs] == [("ablation-kd-keep-s1s2s3s4", True)]
    # a per_relu run is ablated against its reverse, labelled as such
    jobs = ablation_jobs(pick, base, [4, 2, 3, 1], kd_enabled=True, switch_kd=False, order_mode="per_relu")
    assert [(j.name, j.ours_setting, j.other_setting) for j in jobs] == [
        ("ablation-order-keep-s1s3-thin-r0.5", "per_relu order: keeps S2+S3", "reverse per_relu order: keeps S1+S3")]


def test_an_interrupted_run_leaves_the_frontier_so_far(tmp_path, monkeypatch):
    def dies_at_keep_s2s3(name, spec):
        if name == "keep-s2s3":
            raise KeyboardInterrupt  # what Ctrl-C mid-job looks like to the pipeline
        return by_relus(name, spec)
    with pytest.raises(KeyboardInterrupt):
        run_fake(tmp_path, monkeypatch, dies_at_keep_s2s3)
    partial = load_frontier(str(tmp_path / "run"))
    assert not partial["meta"]["complete"] and [p["name"] for p in partial["candidates"]] == ["keep-s3"]
    assert not (tmp_path / "run" / "frontier.png").exists()  # drawn when the run completes
    doc, fake, out = run_fake(tmp_path, monkeypatch, resume=True)
    assert fake.calls[0]["name"] == "keep-s2s3" and doc["meta"]["complete"]
    assert (out / "frontier.png").read_bytes()[:8] == PNG_MAGIC


def test_pipeline_with_an_external_teacher(tmp_path, monkeypatch):
    data = tiny_data()
    teacher_spec = ModelSpec(alpha=0.0625, input_size=8, num_classes=3)
    path = tmp_path / "t.pt"
    Checkpoint(teacher_spec, build_model(teacher_spec).state_dict(), data.mean, data.std, data.classes,
               {"train_seconds": 9.0, "epochs": 4}).save(str(path))
    doc, fake, _ = run_fake(tmp_path, monkeypatch, teacher=str(path),
                            config=tiny_config(reshape={"enabled": False}, thinning={"enabled": False}))
    assert "teacher" not in [c["name"] for c in fake.calls]
    assert doc["teacher"]["external"] and doc["teacher"]["checkpoint"] == str(path.resolve())
    assert all(c["teacher"] == str(path.resolve()) for c in fake.calls[5:])


def test_pipeline_trains_for_real_on_tiny_data(tmp_path):
    config = tiny_config(thinning={"enabled": False}, reshape={"alphas": [], "rhos": [0.5], "apply_to": "culled"})
    out = tmp_path / "real"
    doc = pipeline.Optimizer(str(out), tiny_data(), "folder:/tmp/tiny", config, progress=False,
                             out=lambda *_: None).run()
    assert doc["candidates"] and doc["frontier"]
    for point in doc["candidates"]:
        ckpt = load_checkpoint(str(out / point["checkpoint"]))
        assert ckpt.spec.to_dict() == point["spec"] and relu_count(ckpt.spec) == point["relu_count"]
        assert (out / "jobs" / point["name"] / "train.log").read_text().count("\n") == 1
    check_frontier_files(out)


# -- reports and the CLI ------------------------------------------------------------------------------------

def fake_point(name, cull, acc) -> dict:
    spec = ModelSpec(alpha=0.125, stem_relu=False, thin="bottom", cull=cull)
    return {"name": name, "kind": "thinned", "parent": None, "relu_count": relu_count(spec), "accuracy": acc,
            "spec": spec.to_dict(), "checkpoint": f"jobs/{name}/final.pt", "train_seconds": 2.0}


FAKE_POINTS = [("a", (1, 2, 3), 30.0), ("b", (1, 2), 45.0), ("c", (1, 4), 20.0)]  # 2,048 / 6,144 / 12,288 ReLUs


def write_fake_run(out: Path) -> dict:
    points = [fake_point(*p) for p in FAKE_POINTS]
    for p in points:
        spec = ModelSpec.from_dict(p["spec"])
        Checkpoint(spec, build_model(spec).state_dict(), [0.5] * 3, [0.25] * 3, [str(i) for i in range(10)],
                   {}).save(str(out / p["checkpoint"]))
    doc = frontier_document(points, [7000, 10], [], meta={"data": "folder:/nowhere"})
    write_reports(str(out), doc)
    return doc


def test_reports_and_frontier_command(tmp_path, capsys):
    doc = write_fake_run(tmp_path)
    assert [p["relu_count"] for p in doc["candidates"]] == [2048, 6144, 12288]
    assert [p["name"] for p in doc["frontier"]] == ["a", "b"] and doc["budget_picks"]["10"] is None
    assert doc["budget_picks"]["7000"]["name"] == "b"
    check_frontier_files(tmp_path)
    assert main(["frontier", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "* a" in text and "* b" in text and " c " not in text and "none fits" in text
    assert main(["frontier", str(tmp_path), "--all"]) == 0
    assert "  c " in capsys.readouterr().out
    assert main(["frontier", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == load_frontier(str(tmp_path))
    assert main(["frontier", str(tmp_path / "missing")]) == 2
    assert "run `deepreduce optimize" in capsys.readouterr().err


def test_frontier_of_an_unfinished_run_shows_the_jobs_in_progress(tmp_path, monkeypatch, capsys):
    write_fake_run(tmp_path)  # jobs a, b, c: final.pt written, no result.json (killed before the record)
    doc = load_frontier(str(tmp_path))
    (tmp_path / FRONTIER_JSON).write_text(json.dumps({**doc, "meta": {**doc["meta"], "complete": False}}))
    (tmp_path / "jobs" / "teacher").mkdir()  # an external --teacher: a record, no final.pt, not in progress
    for name in ("a", "b", "c", "teacher"):
        (tmp_path / "jobs" / name / "result.json").write_text("{}")
    (tmp_path / "jobs" / "keep-s9").mkdir()  # started, killed in its first epoch
    (tmp_path / "jobs" / "keep-s8").mkdir()
    (tmp_path / "jobs" / "keep-s8" / "last.pt").write_bytes(b"not a checkpoint")
    real_epoch = train_module._train_epoch

    def killed_in_epoch_2(*args, **kwargs):
        if args[7] == 1:  # (the epoch index)
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(train_module, "_train_epoch", killed_in_epoch_2)
    final_dir = tmp_path / "jobs" / "final-keep-s2"
    lines = []
    with pytest.raises(KeyboardInterrupt):
        train_module.train(ModelSpec(alpha=0.125, input_size=8, num_classes=3), tiny_data(), str(final_dir),
                           train_module.TrainConfig(epochs=2, batch_size=4), progress=False, log=lines.append)
    epoch_1 = json.loads(lines[-1])
    assert main(["frontier", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    progress = text.split("started, not finished:\n")[1].splitlines()
    assert progress == [f"  final-keep-s2: epoch 1/2, test acc {epoch_1['test_acc']:.2f}% after it, "
                        f"{epoch_1['seconds'] / 60:.1f} min per epoch, about {epoch_1['seconds'] / 3600:.1f} h to go",
                        f"  keep-s8: {tmp_path / 'jobs' / 'keep-s8' / 'last.pt'} is unreadable: delete it and "
                        "--resume retrains this job from its start",
                        "  keep-s9: no epoch finished yet"]
    (final_dir / "final.pt").write_bytes(b"")  # trained, killed before its record
    assert main(["frontier", str(tmp_path)]) == 0
    assert "final-keep-s2: trained; the next --resume records its result" in capsys.readouterr().out
    assert main(["frontier", str(tmp_path), "--json"]) == 0
    assert "started, not finished" not in capsys.readouterr().out


def test_measure_latency_without_the_secure_runtime_is_a_clear_error(tmp_path, monkeypatch, capsys):
    write_fake_run(tmp_path)
    monkeypatch.setitem(sys.modules, "secure.cli", None)  # the latency plugin's module cannot be imported
    assert main(["frontier", str(tmp_path), "--measure-latency"]) == 2
    assert "needs the secure runtime" in capsys.readouterr().err


def test_measure_latency_records_cost_per_image(tmp_path, monkeypatch, capsys):
    """The wiring through the secure layer's latency plugin (found by its entry point), with a stand-in for
    secure.tools.local.run_local (the real one is tested in test_runtime)."""
    from types import SimpleNamespace

    from deepreduce.optimize import latency
    write_fake_run(tmp_path)
    seen = []

    def run_local(plan, images):
        seen.append((plan.relu_count, images.shape, images.dtype))
        profile = SimpleNamespace(online_s=2.0, bytes_sent=3_000_000, bytes_received=1_000_000, rounds=40)
        return SimpleNamespace(profile=profile)

    import secure.tools.local
    monkeypatch.setattr(secure.tools.local, "run_local", run_local)
    data = Dataset("d", tiny_data(32, 6).train, tiny_data(32, 6).test, [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3)
    monkeypatch.setattr(latency, "load_dataset", lambda arg, progress=False: data)
    assert main(["frontier", str(tmp_path), "--measure-latency", "--images", "2"]) == 0
    assert "latency s" in capsys.readouterr().out
    assert seen == [(2048, (2, 3, 32, 32), torch.float32), (6144, (2, 3, 32, 32), torch.float32)]
    doc = load_frontier(str(tmp_path))
    for p in doc["frontier"] + [v for v in doc["budget_picks"].values() if v]:
        assert (p["latency_s"], p["mb"], p["rounds"]) == (1.0, 2.0, 40)
    assert (tmp_path / "frontier-latency.png").read_bytes()[:8] == PNG_MAGIC


def test_measure_latency_of_every_candidate_shows_where_relus_mislead(tmp_path, monkeypatch, capsys):
    """--all measures every candidate; the latency frontier and the pairs where fewer ReLUs ran slower
    (by more than 20%) are recorded and printed. Latencies per image (stand-in runtime, 2 images):
    a 2,048 ReLUs 0.9 s, b 6,144 ReLUs 0.5 s, c 12,288 ReLUs 0.76 s."""
    from types import SimpleNamespace

    from deepreduce.optimize import latency
    write_fake_run(tmp_path)
    per_image = {2048: 0.9, 6144: 0.5, 12288: 0.76}

    def run_local(plan, images):
        profile = SimpleNamespace(online_s=per_image[plan.relu_count] * len(images), bytes_sent=1e6,
                                  bytes_received=1e6, rounds=10)
        return SimpleNamespace(profile=profile)

    import secure.tools.local
    monkeypatch.setattr(secure.tools.local, "run_local", run_local)
    data = Dataset("d", tiny_data(32, 6).train, tiny_data(32, 6).test, [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3)
    monkeypatch.setattr(latency, "load_dataset", lambda arg, progress=False: data)
    assert main(["frontier", str(tmp_path), "--measure-latency", "--all", "--images", "2"]) == 0
    text = capsys.readouterr().out
    doc = load_frontier(str(tmp_path))
    assert {p["name"]: p["latency_s"] for p in doc["candidates"]} == {"a": 0.9, "b": 0.5, "c": 0.76}
    # b (0.5 s, 45%) dominates both others once latency is the cost; a is on the ReLU frontier only
    assert doc["latency_frontier"] == ["b"]
    # a is slower than b (0.9 > 1.2 * 0.5) but not by 20% more than c (0.9 < 1.2 * 0.76)
    assert doc["proxy_inversions"] == [{"fewer_relus": "a", "more_relus": "b", "relu_counts": [2048, 6144],
                                        "latency_s": [0.9, 0.5]}]
    assert "dominated once latency is the cost: a" in text and "a (2,048 ReLUs, 0.900 s) slower than b" in text


# -- subprocesses on real CIFAR-10 (slow) -----------------------------------------------------------------

@pytest.fixture
def cifar_env(cifar10_arg) -> dict:
    """Children load the real CIFAR-10 from the persistent cache (decoded once, ~20 s); cifar10_arg
    skips the test when the archive is missing."""
    return subprocess_env(DEEPREDUCE_CACHE=PERSISTENT_CACHE)


TINY_QUICK = """
quick:  # even smaller than the built-in --quick: this test runs the pipeline twice
  evaluation: {test_subset: 200}
  train:
    teacher:     {epochs: 2, batch_size: 50, subset: 300}
    criticality: {epochs: 2, batch_size: 50, subset: 300}
    candidates:  {epochs: 2, batch_size: 50, subset: 300}
  thinning: {enabled: false}
  reshape: {enabled: false}
"""


@pytest.mark.slow
def test_sigkill_then_resume_does_not_retrain_finished_jobs(tmp_path, cifar10_arg, cifar_env):
    config, out = tmp_path / "tiny.yaml", tmp_path / "run"
    config.write_text(TINY_QUICK)
    args = ["optimize", "--data", cifar10_arg, "--config", str(config), "--out", str(out), "--quick", "--no-progress"]
    proc = subprocess.Popen(python_cmd(*args), env=cifar_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(out / "jobs" / "teacher" / "result.json", proc, timeout=300)
        wait_for(out / "jobs" / "crit-none" / "last.pt", proc, timeout=300)  # the second job is mid-way
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "jobs" / "crit-none" / "final.pt").exists()
    teacher = out / "jobs" / "teacher"
    stamps = {f: (teacher / f).stat().st_mtime_ns for f in ("result.json", "final.pt")}

    again = subprocess.run(python_cmd(*args), env=cifar_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "pass --resume" in again.stderr  # no silent overwrite
    done = subprocess.run(python_cmd(*args, "--resume"), env=cifar_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert {f: (teacher / f).stat().st_mtime_ns for f in stamps} == stamps
    assert '"resumed_from_epoch": 1' in (out / "jobs" / "crit-none" / "train.log").read_text()
    assert "teacher:" in done.stdout and "budget picks" in done.stdout
    doc = check_frontier_files(out)
    assert len([c for c in doc["candidates"] if c["kind"] != "final"]) == 4 and doc["meta"]["complete"]


@pytest.mark.slow
def test_quick_pipeline_end_to_end_on_real_cifar10(tmp_path, cifar10_arg, cifar_env):
    out = tmp_path / "quick"
    t0 = time.monotonic()
    run = subprocess.run(python_cmd("optimize", "--data", cifar10_arg, "--out", str(out), "--quick"),
                         env=cifar_env, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"--quick pipeline: {seconds:.0f} s")
    doc = check_frontier_files(out)
    config = load_config(quick=True)
    assert doc["meta"]["quick"] and doc["meta"]["test_images"] == config.evaluation.test_subset
    search = [p for p in doc["candidates"] if p["kind"] != "final"]
    assert len(search) + len(doc["pruned"]) == 12
    # --quick retrains the pick within 15,000 ReLUs (finals) and ablates it (KD, and the order unless it keeps
    # every stage); the thinning rows come from the search's own candidates
    pick = best_within(search, 15000)
    assert [p["name"] for p in doc["candidates"] if p["kind"] == "final"] == [f"final-{pick['name']}"]
    questions = [(r["question"], r["ours"]["name"]) for r in doc["ablations"]]
    assert ("kd", pick["name"]) in questions and any(q == "thinning" for q, _ in questions)
    assert (("order", pick["name"]) in questions) == bool(pick["spec"]["cull"])
    assert doc["meta"]["complete"]
    assert len(doc["frontier"]) >= 2  # normally 3+; 2 frontier points is the floor even with unlucky noise
    assert all(10 <= p["accuracy"] for p in doc["frontier"][-1:])  # the best frontier model learnt something
    crit = json.loads((out / "criticality.json").read_text())
    assert sorted(crit["order"]) == ["S1", "S2", "S3", "S4"]
    assert "criticality" in run.stdout and "budget picks" in run.stdout
    listed = subprocess.run(python_cmd("frontier", str(out)), env=cifar_env, capture_output=True, text=True)
    assert listed.returncode == 0 and all(p["name"] in listed.stdout for p in doc["frontier"])
    assert "optimize" in run.stderr  # the tqdm job bar
    assert (out / FRONTIER_JSON).is_file()


@pytest.mark.slow
def test_data_parallel_run_under_torchrun(tmp_path, cifar10_arg, cifar_env):
    """Two CPU ranks (gloo) walk the same job list; rank 0 alone prints and writes the pipeline files."""
    config, out = tmp_path / "tiny.yaml", tmp_path / "ddp"
    config.write_text(TINY_QUICK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "deepreduce", "optimize", "--data", cifar10_arg, "--config", str(config), "--out", str(out),
           "--quick", "--no-progress"]
    run = subprocess.run(cmd, env={**cifar_env, "GLOO_SOCKET_IFNAME": "lo"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("budget picks") == 1 and run.stdout.count("teacher:") == 1
    doc = check_frontier_files(out)
    # the 4 culled candidates, the final of --quick's 15,000 budget and its KD ablation, on both ranks alike
    assert len([c for c in doc["candidates"] if c["kind"] != "final"]) == 4
    assert len([c for c in doc["candidates"] if c["kind"] == "final"]) == 1
    assert any(r["question"] == "kd" for r in doc["ablations"]) and doc["meta"]["complete"]
    history = [json.loads(line) for line in (out / "jobs" / "teacher" / "train.log").read_text().splitlines()]
    assert len(history) == 2 and all(h["test_acc"] is not None for h in history)
