"""Interleaved A/B latency of two checkouts: the same secure inference, alternating, medians and ratios.

    python scripts/ab_latency.py --a 743dd1b --b . --plan demo/model.plan --alternations 20 --json-out ab.json
    python scripts/ab_latency.py --a main~3 --b . --alpha 1 --alternations 20      # random-weight full ResNet18
    python scripts/ab_latency.py --a 743dd1b --b . --plan demo/model.plan --b-args "--relu-protocol fss"

Single runs on a shared machine spread by 25% or more, so a speed target is a ratio measured in one run:
each alternation runs `python -m secure.measure` once in each checkout (order A B, then B A, so that
drift in the machine's load hits both), all three parties on 127.0.0.1, batch 1 unless --batch-size.
A revision other than "." is checked out into a temporary git worktree (removed afterwards) and runs
with the same virtualenv, its own code first on PYTHONPATH. Prints a table; --json-out writes every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("online_s_per_image", "mb_sent_per_image", "mb_received_per_image", "rounds", "offline_s")


def checkout(rev: str, tmp: Path) -> Path:
    if rev == ".":
        return ROOT
    path = tmp / f"rev-{len(list(tmp.iterdir()))}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def measure_once(tree: Path, measure_args: list[str], out: Path, timeout_s: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "secure.measure", *measure_args, "--json-out", str(out)], cwd=tree, env=env,
                   check=True, timeout=timeout_s, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def order(alternations: int) -> list[str]:
    """A B, B A, A B, ...: each side runs first in half of the alternations."""
    return [side for k in range(alternations) for side in (("a", "b") if k % 2 == 0 else ("b", "a"))]


def summary(runs: dict[str, list[dict]]) -> dict:
    med = {side: {f: statistics.median(r[f] for r in rs) for f in FIGURES} for side, rs in runs.items()}
    return {"median": med, "ratio_b_over_a": {f: med["b"][f] / med["a"][f] if med["a"][f] else None for f in FIGURES}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="the baseline: a git revision, or . for the working tree")
    p.add_argument("--b", default=".", help="the candidate (default: the working tree)")
    p.add_argument("--alternations", type=int, default=20)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one measurement may take")
    p.add_argument("--json-out")
    p.add_argument("--b-args", default="", help="more secure.measure flags for B only, e.g. \"--relu-protocol fss\" "
                   "(flags the baseline does not know)")
    args, measure_args = p.parse_known_args(argv)  # the rest goes to secure.measure (--plan, spec flags, ...)
    if args.alternations < 1:
        print("error: --alternations must be at least 1", file=sys.stderr)
        return 2
    measure_args = [str(Path(a).resolve()) if a.endswith(".plan") else a for a in measure_args]
    tmp = Path(tempfile.mkdtemp(prefix="ab-latency-"))
    trees: dict[str, Path] = {}
    try:
        trees = {"a": checkout(args.a, tmp), "b": checkout(args.b, tmp)}
        runs = {"a": [], "b": []}
        for i, side in enumerate(order(args.alternations)):
            extra = shlex.split(args.b_args) if side == "b" else []
            runs[side].append(measure_once(trees[side], measure_args + extra, tmp / f"run-{i}.json", args.timeout))
            print(f"{i + 1}/{2 * args.alternations} {side}: {runs[side][-1]['online_s_per_image']:.4f} s online",
                  file=sys.stderr, flush=True)
    finally:
        for tree in {t for t in trees.values() if t != ROOT}:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"a": args.a, "b": args.b, "alternations": args.alternations, "measure_args": measure_args,
           "b_args": args.b_args,
           **summary(runs), "runs": runs}
    print(f"{'figure':<24} {'A ' + args.a:>16} {'B ' + args.b:>16} {'B / A':>8}")
    for f in FIGURES:
        ratio = doc["ratio_b_over_a"][f]
        print(f"{f:<24} {doc['median']['a'][f]:>16.4f} {doc['median']['b'][f]:>16.4f} "
              f"{'-' if ratio is None else f'{ratio:.3f}':>8}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
