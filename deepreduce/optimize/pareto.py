"""Pareto selection over (ReLU count: lower is better, accuracy: higher is better).

Points are dicts with ``relu_count`` and ``accuracy`` (and usually ``name``); they are returned
unchanged, never copied, so callers can match them by identity.
"""

from __future__ import annotations


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b on both axes and strictly better on one."""
    no_worse = a["relu_count"] <= b["relu_count"] and a["accuracy"] >= b["accuracy"]
    better = a["relu_count"] < b["relu_count"] or a["accuracy"] > b["accuracy"]
    return no_worse and better


def pareto_front(points: list[dict]) -> list[dict]:
    """The non-dominated points, fewest ReLUs first.

    Of several identical (ReLU count, accuracy) points only the first by name is kept, so the
    frontier never lists the same trade-off twice.
    """
    ordered = sorted(points, key=lambda p: (p["relu_count"], -p["accuracy"], str(p.get("name", ""))))
    front, best = [], float("-inf")
    for p in ordered:
        if p["accuracy"] > best:  # more ReLUs than every point kept so far: must be strictly more accurate
            front.append(p)
            best = p["accuracy"]
    return front


def best_within(points: list[dict], budget: int) -> dict | None:
    """The most accurate point with relu_count <= budget (ties: fewer ReLUs, then name)."""
    fitting = [p for p in points if p["relu_count"] <= budget]
    if not fitting:
        return None
    return min(fitting, key=lambda p: (-p["accuracy"], p["relu_count"], str(p.get("name", ""))))


def budget_picks(points: list[dict], budgets: list[int]) -> dict[str, dict | None]:
    """Budget (as a string: JSON object keys) -> the best point within it, or None."""
    return {str(b): best_within(points, b) for b in budgets}


def prune_reason(variant: dict, parent: dict, trained: list[dict]) -> str | None:
    """Why training `variant` (a shrunk `parent`) is pointless, or None if it may improve the frontier.

    A reshaped variant is not expected to beat its parent's accuracy. If some trained point has no
    more ReLUs than the variant and is more accurate than the parent, the variant would be dominated.
    """
    for p in sorted(trained, key=lambda p: (p["relu_count"], -p["accuracy"])):
        if p["relu_count"] <= variant["relu_count"] and p["accuracy"] > parent["accuracy"]:
            return (f"{p['name']} has {p['relu_count']:,} <= {variant['relu_count']:,} ReLUs and "
                    f"{p['accuracy']:.2f}% > {parent['accuracy']:.2f}% of the parent {parent['name']}")
    return None
