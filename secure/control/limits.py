"""Model-stealing limits of pi-server: a label-only head and per-client query quotas.

Label-only mode
    Revealing the logits lets a client fit a copy of the model with far fewer queries than labels
    alone. `label_only_plan` appends a head to the plan, computed under encryption like every other
    layer, that turns the logits l (N x K) into

        y_i = ReLU(S l_i - max_j S l_j + eps)        (S = 64, eps = 2**-6)

    The maximum is a tournament of max(a, b) = a + ReLU(b - a) (K - 1 ReLUs, ceil(log2 K) levels);
    only y is revealed to the client (through a last identity layer: the fast engine reveals the
    output of a linear layer). y is eps (up to fixed-point rounding) at the arg-max and 0 everywhere
    else, so the client learns the label and nothing about the margins, except that a class whose
    logit is within eps / S = 2**-12 of the maximum also shows (and shows its gap). eps is 64 times
    the engines' fixed-point resolution (2**-12), above the rounding of the tournament's layers.
    The head costs K - 1 + K ReLUs per image and 3 ceil(log2 K) + 4 small linear layers.

Query quotas
    `QueryLimiter` counts classified images per client over a sliding window. With role credentials
    a client is its certificate (secure.control.auth.accept_control), otherwise its IP address: with
    one shared token every holder can claim any identity, so the address is the only thing a quota
    can hold on to.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from deepreduce.errors import ProjectError

LABEL_SCALE = 64.0
LABEL_EPSILON = 2.0 ** -6


def label_only_plan(plan, epsilon: float = LABEL_EPSILON, scale: float = LABEL_SCALE):
    """A new SecurePlan whose output is the label-only head above (its own plan hash)."""
    import torch

    from deepreduce.graph import Op
    from secure.core.plan import SecurePlan
    ops = list(plan.ops)
    tensors = dict(plan.tensors)
    logits = len(ops) - 1
    k = int(ops[logits].shape[0])
    added = 0

    def op(kind, inputs, name, shape, **fields):
        ops.append(Op(len(ops), kind, name, inputs, shape, **fields))
        return len(ops) - 1

    def linear(x, weight, bias, name):
        tensors[f"label.{name}.w"] = weight.to(torch.float32).contiguous()
        tensors[f"label.{name}.b"] = bias.to(torch.float32).contiguous()
        return op("linear", [x], f"label.{name}", [int(weight.shape[0])],
                  weight=f"label.{name}.w", bias=f"label.{name}.b")

    def relu(x, name, n):
        nonlocal added
        added += n
        return op("relu", [x], f"label.{name}", [n], site=f"label.{name}", relu_count=n)

    value, n, level = linear(logits, scale * torch.eye(k), torch.zeros(k), "scale"), k, 0
    while n > 1:  # one tournament level: max(a, b) = a + relu(b - a), an odd one out passes through
        level += 1
        pairs, odd = n // 2, n % 2
        diff, keep, lift = torch.zeros(pairs, n), torch.zeros(pairs + odd, n), torch.zeros(pairs + odd, pairs)
        for i in range(pairs):
            diff[i, 2 * i], diff[i, 2 * i + 1] = -1.0, 1.0
            keep[i, 2 * i] = 1.0
            lift[i, i] = 1.0
        if odd:
            keep[pairs, n - 1] = 1.0
        h = relu(linear(value, diff, torch.zeros(pairs), f"max{level}.diff"), f"max{level}", pairs)
        a = linear(value, keep, torch.zeros(pairs + odd), f"max{level}.keep")
        b = linear(h, lift, torch.zeros(pairs + odd), f"max{level}.lift")
        value, n = op("add", [a, b], f"label.max{level}", [pairs + odd]), pairs + odd
    shifted = linear(logits, scale * torch.eye(k), torch.full((k,), epsilon), "shift")
    minus_max = linear(value, -torch.ones(k, 1), torch.zeros(k), "broadcast")
    onehot = relu(op("add", [shifted, minus_max], "label.margin", [k]), "onehot", k)
    linear(onehot, torch.eye(k), torch.zeros(k), "out")
    return SecurePlan(ops=ops, tensors=tensors, input_shape=plan.input_shape, classes=list(plan.classes),
                      mean=list(plan.mean), std=list(plan.std), spec=plan.spec,
                      relu_count=int(plan.relu_count) + added)


def labels_from_head(values, epsilon: float = LABEL_EPSILON) -> list[dict]:
    """Per image: the arg-max of the revealed head output and how many other classes tie with it."""
    out = []
    for row in values:
        best = max(range(len(row)), key=lambda i: row[i])
        out.append({"class_index": best, "ties": sum(1 for v in row if v > epsilon / 2) - 1})
    return out


# -- query quotas -------------------------------------------------------------------------------------

class QuotaExceeded(ProjectError):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Ticket:
    key: str
    at: float
    n: int


class QueryLimiter:
    """At most `max_queries` images per client key in any `window_s` seconds (None: no limit)."""

    def __init__(self, max_queries: int | None, window_s: float, clock=time.monotonic):
        self.max_queries, self.window_s, self.clock = max_queries, window_s, clock
        self._used: dict[str, deque] = {}
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        for key in list(self._used):
            q = self._used[key]
            while q and q[0].at <= now - self.window_s:
                q.popleft()
            if not q:
                del self._used[key]

    def reserve(self, key: str, n: int) -> Ticket | None:
        if self.max_queries is None:
            return None
        with self._lock:
            now = self.clock()
            self._prune(now)
            q = self._used.setdefault(key, deque())
            used = sum(t.n for t in q)
            if used + n > self.max_queries:
                if not q:
                    del self._used[key]
                freed, wait = used + n - self.max_queries, self.window_s
                for t in q:  # the earliest time enough of the window has expired
                    freed -= t.n
                    if freed <= 0:
                        wait = t.at + self.window_s - now
                        break
                wait = max(1.0, math.ceil(wait))
                raise QuotaExceeded(f"query limit reached: {used} of {self.max_queries} images in the last "
                                    f"{self.window_s:g} s are used and this session asks for {n}; "
                                    f"retry after {wait:g} s", wait)
            ticket = Ticket(key, now, n)
            q.append(ticket)
            return ticket

    def refund(self, ticket: Ticket | None) -> None:
        if ticket is None:
            return
        with self._lock:
            q = self._used.get(ticket.key)
            if q is not None and ticket in q:
                q.remove(ticket)

    def settle(self, ticket: Ticket | None, used: int | None) -> None:
        """A warm session's reservation ends: keep the `used` images it classified, give back the rest
        (None: unknown, the session failed: keep it all)."""
        if ticket is None or used is None:
            return
        with self._lock:
            ticket.n = min(ticket.n, max(0, int(used)))
            q = self._used.get(ticket.key)
            if q is not None and ticket in q and ticket.n == 0:
                q.remove(ticket)

    def left(self, key: str) -> int | None:
        if self.max_queries is None:
            return None
        with self._lock:
            self._prune(self.clock())
            return self.max_queries - sum(t.n for t in self._used.get(key, ()))
