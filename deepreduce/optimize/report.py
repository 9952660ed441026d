"""Frontier files: DIR/frontier.json (the record), frontier.csv and frontier.png (views of it).

frontier.json::

    {"format_version": 1,
     "frontier":   [point, ...],           # non-dominated candidates, fewest ReLUs first
     "candidates": [point, ...],           # every trained candidate
     "budget_picks": {"100000": point | null, ...},
     "pruned":     [{"name", "parent", "relu_count", "spec", "reason"}, ...],
     "ablations":  [row, ...],             # see ablations.py: KD, criticality order, thinning
     "teacher": point, "criticality": [row, ...],   # row: stage, accuracy, gain, ..., train_seconds
     "stage_order": [3, 2, ...],
     "meta": {..., "complete": bool}}      # false while the run is still training (rewritten per job)

after --measure-latency also "latency_frontier" (names of the points non-dominated in (latency_s,
accuracy)) and "proxy_inversions" ([{"fewer_relus", "more_relus", "relu_counts", "latency_s"}]:
where fewer ReLUs were more than 20% slower, so the ReLU count misleads as a cost proxy).

    point = {"name", "kind", "parent", "relu_count", "accuracy" (percent), "spec" (ModelSpec.to_dict()),
             "checkpoint" (relative to DIR), "train_seconds", "test_images",
             "started_at", "finished_at" (UNIX seconds: the run of the job that finished it),
             "worker" ({"host", "gpu": index or null} of that run),
             after `deepreduce frontier DIR --measure-latency`: "latency_s", "mb", "rounds"}
"""

from __future__ import annotations

import csv
import io
import json
import os

from ..errors import UserError
from ..fileio import atomic_output, atomic_write_json, atomic_write_text
from .pareto import PROXY_MARGIN, budget_picks, pareto_front, proxy_inversions

FRONTIER_JSON = "frontier.json"
FRONTIER_CSV = "frontier.csv"
FRONTIER_PNG = "frontier.png"
LATENCY_PNG = "frontier-latency.png"
FORMAT_VERSION = 1
CSV_COLUMNS = ("name", "on_frontier", "relu_count", "accuracy", "train_seconds", "kind", "parent", "alpha", "rho",
               "blocks", "cull", "thin", "checkpoint", "latency_s", "mb", "rounds")


def frontier_document(candidates: list[dict], budgets: list[int], pruned: list[dict] | None = None,
                      **extra) -> dict:
    front = pareto_front(candidates)
    return {"format_version": FORMAT_VERSION, "frontier": front,
            "candidates": sorted(candidates, key=lambda p: (p["relu_count"], p["name"])),
            "budget_picks": budget_picks(candidates, budgets), "pruned": list(pruned or []), **extra}


def add_latency_summary(doc: dict) -> None:
    """The latency frontier and the proxy's misleading pairs, over every point measured so far."""
    measured = [p for p in doc["candidates"] if p.get("latency_s") is not None]
    doc["latency_frontier"] = [p["name"] for p in pareto_front(measured, cost="latency_s")]
    doc["proxy_inversions"] = proxy_inversions(measured)


def write_reports(out_dir: str, doc: dict, plots: bool = True) -> None:
    """frontier.json (atomically), frontier.csv and, with `plots`, frontier.png (+ the latency plot when measured)."""
    atomic_write_json(os.path.join(out_dir, FRONTIER_JSON), doc)
    atomic_write_text(os.path.join(out_dir, FRONTIER_CSV), frontier_csv(doc))
    if not plots:
        return
    plot_frontier(doc, os.path.join(out_dir, FRONTIER_PNG))
    if any(p.get("latency_s") is not None for p in doc["frontier"]):
        plot_frontier(doc, os.path.join(out_dir, LATENCY_PNG), x="latency_s")


def load_frontier(out_dir: str) -> dict:
    path = os.path.join(out_dir, FRONTIER_JSON)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: run `deepreduce optimize --out {out_dir}` first "
                        "(or --resume it to finish)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a frontier file of format {FORMAT_VERSION}")
    return doc


def frontier_csv(doc: dict) -> str:
    on_front = {p["name"] for p in doc["frontier"]}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for p in doc["candidates"]:
        spec = p["spec"]
        writer.writerow({**{k: p.get(k) for k in CSV_COLUMNS if k in p}, "on_frontier": int(p["name"] in on_front),
                         "alpha": spec["alpha"], "rho": spec["rho"], "blocks": "-".join(map(str, spec["blocks"])),
                         "cull": "-".join(map(str, spec["cull"])), "thin": spec["thin"]})
    return buf.getvalue()


def plot_frontier(doc: dict, path: str, x: str = "relu_count") -> None:
    """Accuracy vs ReLUs (log axis) or latency: every candidate grey, the frontier highlighted and labelled.
    Against latency the line is the latency frontier (the ReLU frontier, drawn in ReLU order, zig-zags
    there); ReLU-frontier points it leaves out are marked, as that is where the ReLU proxy misleads."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    points = [p for p in doc["candidates"] if p.get(x) is not None]
    front = [p for p in doc["frontier"] if p.get(x) is not None]
    off_front = []
    if x == "latency_s" and doc.get("latency_frontier") is not None:
        off_front = dominated_in_latency(doc)
        front = sorted((p for p in points if p["name"] in doc["latency_frontier"]), key=lambda p: p[x])
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ax.scatter([max(1, p[x]) if x == "relu_count" else p[x] for p in points], [p["accuracy"] for p in points],
               c="0.7", s=22, label="candidates")
    if front:
        fx = [max(1, p[x]) if x == "relu_count" else p[x] for p in front]
        ax.plot(fx, [p["accuracy"] for p in front], "o-", c="tab:red", ms=6,
                label="frontier" if x == "relu_count" else "latency frontier")
        for px, p in zip(fx, front):
            ax.annotate(p["name"], (px, p["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if off_front:
        ax.scatter([p[x] for p in off_front], [p["accuracy"] for p in off_front], marker="x", c="tab:red", s=40,
                   label="ReLU frontier, dominated in latency")
        for p in off_front:
            ax.annotate(p["name"], (p[x], p["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if x == "relu_count":
        ax.set_xscale("log")
        ax.set_xlabel("ReLUs per image (log scale)")
    else:
        ax.set_xlabel("online latency per image (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("DeepReDuce frontier" if x == "relu_count" else "DeepReDuce frontier: accuracy vs private-inference latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right" if x == "relu_count" else "best")
    fig.tight_layout()
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# -- text tables ------------------------------------------------------------------------------

def format_frontier_table(doc: dict, show_all: bool = False) -> str:
    on_front = {p["name"] for p in doc["frontier"]}
    rows = doc["candidates"] if show_all else doc["frontier"]
    latency = any(p.get("latency_s") is not None for p in rows)
    head = f"{'':1} {'candidate':<34} {'ReLUs':>10} {'acc %':>7} {'train s':>8}"
    head += f" {'latency s':>10} {'MB':>9} {'rounds':>7}" if latency else ""
    lines = [head]
    for p in rows:
        line = (f"{'*' if p['name'] in on_front else ' ':1} {p['name']:<34} {p['relu_count']:>10,} "
                f"{p['accuracy']:>7.2f} {p.get('train_seconds') or 0:>8.1f}")
        if latency:
            line += f" {_num(p.get('latency_s'), '.3f'):>10} {_num(p.get('mb'), '.2f'):>9} {_num(p.get('rounds'), 'd'):>7}"
        lines.append(line)
    lines.append(f"({len(doc['frontier'])} frontier points of {len(doc['candidates'])} candidates"
                 f"{', ' + str(len(doc.get('pruned', []))) + ' pruned' if doc.get('pruned') else ''}; * = on the frontier)")
    if not doc.get("meta", {}).get("complete", True):
        lines.append("(the run is still in progress: this is the frontier of the jobs finished so far; "
                     "`deepreduce optimize ... --resume` continues it)")
    lines.append("")
    lines.append("budget picks:")
    for budget, pick in doc["budget_picks"].items():
        lines.append(f"  <= {int(budget):>10,} ReLUs: " +
                     (f"{pick['name']} ({pick['relu_count']:,} ReLUs, {pick['accuracy']:.2f}%)" if pick else "none fits"))
    if doc.get("latency_frontier") is not None:
        lines += ["", format_proxy_check(doc)]
    if doc.get("ablations"):
        lines += ["", format_ablation_table(doc["ablations"])]
    return "\n".join(lines)


def format_jobs_in_progress(rows: list[dict]) -> str:
    """One line per job that started but has no result yet (see pipeline.jobs_in_progress)."""
    lines = ["started, not finished:"]
    for r in rows:
        if r["trained"]:
            state = "trained; the next --resume records its result"
        elif r.get("unreadable"):
            state = f"{r['unreadable']} is unreadable: delete it and --resume retrains this job from its start"
        elif not r["epochs_done"]:
            state = "no epoch finished yet"
        else:
            left = (r["epochs"] - r["epochs_done"]) * r["seconds_per_epoch"]
            state = (f"epoch {r['epochs_done']}/{r['epochs']}, test acc {_num(r['test_acc'], '.2f')}% after it, "
                     f"{r['seconds_per_epoch'] / 60:.1f} min per epoch, about {left / 3600:.1f} h to go")
        lines.append(f"  {r['name']}{_where(r)}: {state}")
    return "\n".join(lines)


def _where(row: dict) -> str:
    """Where the job's latest run started and whether a process trains it now, e.g. ' [node-2 GPU 1, running]'."""
    w = row.get("worker")
    if not w:
        return ""
    parts = [w["host"] + ("" if w.get("gpu") is None else f" GPU {w['gpu']}")]
    if row.get("running") is not None:
        parts.append("running" if row["running"] else "not running")
    return f" [{', '.join(parts)}]"


def dominated_in_latency(doc: dict) -> list[dict]:
    """The measured ReLU-frontier points that the latency frontier leaves out: where the proxy misleads."""
    return [p for p in doc["frontier"] if p.get("latency_s") is not None and p["name"] not in doc["latency_frontier"]]


def format_proxy_check(doc: dict) -> str:
    """How the ReLU frontier compares with the frontier of measured latency."""
    off = [p["name"] for p in dominated_in_latency(doc)]
    lines = ["ReLU count as a latency proxy (measured points only):",
             f"  latency frontier: {', '.join(doc['latency_frontier']) or 'none'}",
             f"  on the ReLU frontier but dominated once latency is the cost: {', '.join(off) or 'none'}"]
    inversions = doc.get("proxy_inversions") or []
    lines.append(f"  pairs where fewer ReLUs ran more than {100 * PROXY_MARGIN:g}% slower: {len(inversions)}")
    for inv in inversions[:10]:
        (ra, rb), (la, lb) = inv["relu_counts"], inv["latency_s"]
        lines.append(f"    {inv['fewer_relus']} ({ra:,} ReLUs, {la:.3f} s) slower than {inv['more_relus']} "
                     f"({rb:,} ReLUs, {lb:.3f} s)")
    if len(inversions) > 10:
        lines.append(f"    ... {len(inversions) - 10} more in frontier.json")
    return "\n".join(lines)


def format_ablation_table(rows: list[dict]) -> str:
    """One line per comparison: this run's setting against the alternative, same epochs."""
    lines = ["ablations (ours vs. the alternative, same training epochs; gain = accuracy difference):",
             f"{'question':<9} {'ours':<36} {'ReLUs':>9} {'acc %':>6}   {'alternative':<36} {'ReLUs':>9} "
             f"{'acc %':>6} {'gain':>6}"]
    for r in rows:
        o, a = r["ours"], r["other"]
        lines.append(f"{r['question']:<9} {o['name']:<36} {o['relu_count']:>9,} {o['accuracy']:>6.2f}   "
                     f"{a['name']:<36} {a['relu_count']:>9,} {a['accuracy']:>6.2f} {r['accuracy_gain']:>+6.2f}")
    return "\n".join(lines)


def format_criticality_table(table: list[dict], no_relu_accuracy: float) -> str:
    lines = [f"{'stage':<6} {'ReLUs':>10} {'acc %':>7} {'gain':>7} {'gain/1K ReLUs':>14}"]
    for row in table:
        lines.append(f"{row['name']:<6} {row['relu_count']:>10,} {row['accuracy']:>7.2f} {row['gain']:>+7.2f} "
                     f"{row['gain_per_1k_relus']:>14.4f}")
    lines.append(f"no-ReLU network: {no_relu_accuracy:.2f}%; order (most critical first): "
                 + " > ".join(r["name"] for r in table))
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
