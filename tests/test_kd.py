"""The knowledge-distillation loss against a hand computation with plain tensor math."""

from __future__ import annotations

import math

import pytest
import torch

from deepreduce.kd import kd_loss


def hand_kd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float, alpha: float) -> float:
    """alpha * T^2 * mean_i KL(p_i || q_i) + (1 - alpha) * mean_i -log softmax(s_i)[y_i], element by element."""
    n, k = s.shape
    kl_total, ce_total = 0.0, 0.0
    for i in range(n):
        ps = [math.exp(v / T) for v in t[i].tolist()]
        qs = [math.exp(v / T) for v in s[i].tolist()]
        p = [v / sum(ps) for v in ps]           # teacher's softened distribution
        q = [v / sum(qs) for v in qs]           # student's softened distribution
        kl_total += sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in range(k))
        e = [math.exp(v) for v in s[i].tolist()]
        ce_total += -math.log(e[int(y[i])] / sum(e))
    return alpha * T * T * kl_total / n + (1 - alpha) * ce_total / n


@pytest.mark.parametrize("T, alpha", [(4.0, 0.9), (1.0, 0.5), (2.5, 0.0), (3.0, 1.0), (0.5, 0.3)])
def test_kd_loss_matches_hand_computation(T, alpha):
    g = torch.Generator().manual_seed(int(T * 10 + alpha * 100))
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    got = kd_loss(s, t, y, temperature=T, alpha=alpha)
    assert got.shape == ()
    assert got.item() == pytest.approx(hand_kd(s, t, y, T, alpha), rel=1e-10, abs=1e-12)


def test_kd_loss_float32_and_direction():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    y = torch.tensor([1, 2, 3, 4])
    assert kd_loss(s, t, y, 4.0, 0.9).item() == pytest.approx(hand_kd(s.double(), t.double(), y, 4.0, 0.9), rel=1e-5)
    # KL(teacher || student), not the reverse: swapping the roles changes the soft term.
    soft = lambda a, b: kd_loss(a, b, y, 2.0, 1.0).item()  # noqa: E731
    assert soft(s, t) != pytest.approx(soft(t, s), rel=1e-3)
    # A student that matches the teacher has no soft loss; only the hard term remains.
    assert kd_loss(t, t, y, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(t, y).item()
    assert kd_loss(t, t, y, 4.0, 0.25).item() == pytest.approx(0.75 * ce, rel=1e-5)


def test_kd_gradient_pulls_student_towards_teacher():
    t = torch.tensor([[4.0, 0.0, -4.0]])
    s = torch.zeros(1, 3, requires_grad=True)
    kd_loss(s, t, torch.tensor([0]), 2.0, 1.0).backward()
    # d/ds of T^2 KL(p||q) = T (q - p): negative where the teacher puts more mass.
    T = 2.0
    p = torch.softmax(t / T, 1)
    q = torch.softmax(s.detach() / T, 1)
    assert torch.allclose(s.grad, T * (q - p), atol=1e-6)
