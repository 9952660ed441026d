"""Pareto selection over (cost: lower is better, accuracy: higher is better).

The cost is ``relu_count`` unless a function says otherwise (``cost="latency_s"``: the measured
private-inference latency). Points are dicts with the cost key and ``accuracy`` (and usually
``name``); they are returned unchanged, never copied, so callers can match them by identity.
"""

from __future__ import annotations


def dominates(a: dict, b: dict, cost: str = "relu_count") -> bool:
    """a is at least as good as b on both axes and strictly better on one."""
    no_worse = a[cost] <= b[cost] and a["accuracy"] >= b["accuracy"]
    better = a[cost] < b[cost] or a["accuracy"] > b["accuracy"]
    return no_worse and better


def pareto_front(points: list[dict], cost: str = "relu_count") -> list[dict]:
    """The non-dominated points, cheapest first.

    Of several identical (cost, accuracy) points only the first by name is kept, so the frontier
    never lists the same trade-off twice.
    """
    ordered = sorted(points, key=lambda p: (p[cost], -p["accuracy"], str(p.get("name", ""))))
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


# How much slower the model with fewer ReLUs must be before the pair counts as the proxy misleading:
# latency noise on a shared machine stays below 20%.
PROXY_MARGIN = 0.2


def proxy_inversions(points: list[dict], margin: float = PROXY_MARGIN) -> list[dict]:
    """Where the ReLU count misleads as a latency proxy: pairs of measured points in which the one
    with fewer ReLUs is slower, by more than `margin`, so linear layers, not ReLUs, decide there."""
    measured = sorted((p for p in points if p.get("latency_s") is not None), key=lambda p: (p["relu_count"], p["name"]))
    return [{"fewer_relus": a["name"], "more_relus": b["name"], "relu_counts": [a["relu_count"], b["relu_count"]],
             "latency_s": [a["latency_s"], b["latency_s"]]}
            for i, a in enumerate(measured) for b in measured[i + 1:]
            if a["relu_count"] < b["relu_count"] and a["latency_s"] > (1 + margin) * b["latency_s"]]
