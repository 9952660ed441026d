"""Ring arithmetic of the fast engine against exact references (int64 torch ops, Python integers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepreduce.graph import Op
from secure.core.correlations import Layout, PackedMessage, ReluParams, message_sizes, unpack_message
from secure.core.ring import (LimbPlan, Prg, _balanced_limbs, from_plane, plan_limbs, ring_linear,
                              ring_linear_small, to_planes, truncate_share)

GEN = torch.Generator().manual_seed(0)


def uniform(*shape):
    return torch.randint(-2**63, 2**63 - 1, shape, generator=GEN)


def test_balanced_limbs_recombine_mod_2_64():
    x = torch.cat([uniform(1000), torch.tensor([-2**63, 2**63 - 1, 0, -1, 1])])
    for bits, count in ((32, 2), (22, 3), (16, 4)):
        limbs = _balanced_limbs(x, bits, count)
        assert all(limb.abs().max() <= 2 ** (bits - 1) for limb in limbs)
        total = sum(limb << (bits * i) for i, limb in enumerate(limbs))
        assert torch.equal(total, x)


def test_small_weight_conv_is_exact_against_int64_conv():
    w = torch.randint(-2**14, 2**14, (8, 6, 3, 3), generator=GEN)
    x = uniform(2, 6, 7, 7)
    params = {"stride": [2, 2], "padding": [1, 1]}
    expected = F.conv2d(x, w, stride=2, padding=1)  # int64 conv2d: exact mod 2^64, slow
    for limbs in (plan_limbs(w, "conv"), LimbPlan(2, 2), LimbPlan(3, 1), LimbPlan(4, 3), LimbPlan(2, 1, True),
                  LimbPlan(2, 3, True)):
        assert torch.equal(ring_linear_small("conv", w, x, params, limbs), expected), limbs


def test_limb_plan_keeps_float64_sums_exact():
    small = torch.full((4, 512, 3, 3), 2**9)  # ||w||_1 = 4608 * 2^9 ~ 2^21.2 > 2^21: 32-bit limbs need 2 groups
    assert plan_limbs(small, "conv", uniform_input=False) == LimbPlan(2, 2)
    huge = torch.randint(2**29, 2**30, (4, 8, 3, 3), generator=GEN)  # ||w||_1 ~ 2^36: 16-bit limbs
    plan = plan_limbs(huge, "conv")
    assert plan.count == 4
    x = uniform(1, 8, 5, 5)
    params = {"stride": [1, 1], "padding": [1, 1]}
    assert torch.equal(ring_linear_small("conv", huge, x, params, plan), F.conv2d(x, huge, padding=1))


def test_uniform_operand_needs_no_channel_groups():
    """A wide layer of trained scale (||w||_1 ~ 2^22.8, ||w||_2 ~ 2^17.1): the worst-case bound wants
    four channel groups, the Hoeffding bound for a uniform operand one conv; both exact here."""
    w = (torch.randn(16, 512, 3, 3, generator=GEN) * 2**11).round().long()
    assert plan_limbs(w, "conv", uniform_input=False).groups == 4
    assert plan_limbs(w, "conv") == LimbPlan(2, 1)
    x = uniform(2, 512, 4, 4)
    params = {"stride": [1, 1], "padding": [1, 1]}
    assert torch.equal(ring_linear_small("conv", w, x, params, LimbPlan(2, 1)), F.conv2d(x, w, padding=1))
    spiky = torch.zeros(4, 512, 3, 3, dtype=torch.long)
    spiky[:, 0, 0, 0] = 2**19  # ||w||_2 = 2^19 > 2^18.4: the statistical bound is too weak
    assert plan_limbs(spiky, "conv") == plan_limbs(spiky, "conv", uniform_input=False)


def test_full_ring_products_are_exact():
    a, b = uniform(5, 4, 3, 3), uniform(2, 4, 6, 6)
    assert torch.equal(ring_linear("conv", a, b, {"stride": [1, 1], "padding": [1, 1]}),
                       F.conv2d(b, a, padding=1))
    wa, xb = uniform(3, 10), uniform(4, 10)
    assert torch.equal(ring_linear("linear", wa, xb, {}), xb @ wa.t())
    s, x = uniform(4), uniform(2, 4, 3, 3)
    assert torch.equal(ring_linear("scale_shift", s, x, {}), x * s.view(1, -1, 1, 1))


def test_local_truncation_is_off_by_at_most_one():
    x = torch.randint(-2**40, 2**40, (10000,), generator=GEN)
    s1 = uniform(10000)
    s0 = x - s1
    got = truncate_share(s0, 16, 0) + truncate_share(s1, 16, 1)
    assert (got - (x >> 16)).abs().max() <= 1


def test_prg_is_deterministic_per_seed_and_label():
    a, b = Prg(b"\x01" * 32), Prg(b"\x02" * 32)
    assert torch.equal(a.ring("x", [5]), Prg(b"\x01" * 32).ring("x", [5]))
    assert not torch.equal(a.ring("x", [5]), a.ring("y", [5]))
    assert not torch.equal(a.ring("x", [5]), b.ring("x", [5]))
    planes = a.bits("z", 3, 4000)
    assert planes.shape == (3, 500) and planes.dtype == torch.uint8
    bits = from_plane(planes[1], 4000)
    assert set(bits.unique().tolist()) == {0, 1} and abs(bits.double().mean() - 0.5) < 0.05


def test_bit_planes_hold_each_bit_of_each_element():
    x = torch.cat([uniform(13), torch.tensor([-1, 0, 5])])
    planes = to_planes(x, 64)
    assert planes.shape == (64, 2)  # 16 elements -> 2 bytes a plane: 8 elements a byte
    for k in range(64):
        assert torch.equal(from_plane(planes[k], 16), (x >> k) & 1)


def test_dealer_message_round_trips_through_its_layout():
    ops = [Op(0, "input", "input", [], [2, 3, 3]),
           Op(1, "conv", "conv", [0], [4, 3, 3], weight="w", stride=[1, 1], padding=[1, 1]),
           Op(2, "relu", "relu", [1], [4, 3, 3], site="relu", relu_count=36)]
    layout = Layout(ops, {"w": [4, 2, 3, 3]}, ReluParams(relu_bits=8))
    spec = layout.server_message_spec(batch=2)
    msg = {k: (uniform(*shape) if kind == "ring" else torch.randint(0, 256, shape, dtype=torch.uint8, generator=GEN))
           for k, kind, shape in spec}
    packed = PackedMessage(spec)
    for k in reversed(list(msg)):  # any order: each part lands in its own slot
        packed[k] = msg[k]
    packed.check_complete()
    n_ring, n_bits = message_sizes(spec)
    assert (packed.rings.numel(), packed.bits.numel(), packed.buffer.numel()) == (n_ring, n_bits, 8 * n_ring + n_bits)
    # what the party receives: the one buffer, read as the int64 rings and then the bits
    rings, bits = packed.buffer[:8 * n_ring].clone().view(torch.int64), packed.buffer[8 * n_ring:].clone()
    back = unpack_message(spec, rings, bits)
    assert all(torch.equal(back[k], msg[k]) for k in msg)
    partial = PackedMessage(spec)
    partial[spec[0][0]] = msg[spec[0][0]]
    with pytest.raises(AssertionError, match="slots never written"):  # never send allocator leftovers
        partial.check_complete()


def test_ring_linear_refuses_a_fan_in_beyond_exact_float64():
    """ring_linear sums K products of 16-bit limbs (each below 2^30 in magnitude) in float64: exact while
    K < 2^23 (2^30 * 2^23 = 2^53). The bound is checked, not assumed: a layer at it is refused."""
    from secure.core.ring import MAX_EXACT_FAN_IN
    assert MAX_EXACT_FAN_IN == 2 ** 23
    a = torch.zeros(1, 1, dtype=torch.long).expand(2, MAX_EXACT_FAN_IN)  # K = 2^23, nothing allocated
    with pytest.raises(ValueError, match="inputs per output"):
        ring_linear("linear", a, torch.zeros(1, MAX_EXACT_FAN_IN, dtype=torch.long), {})
    # well inside it, full-range ring values give the exact product mod 2^64
    g = torch.Generator().manual_seed(0)
    w, x = (torch.randint(-2 ** 63, 2 ** 63 - 1, (1, 4096), generator=g) for _ in range(2))
    want = sum(p * q for p, q in zip(w[0].tolist(), x[0].tolist())) % 2 ** 64
    assert ring_linear("linear", w, x, {}).item() % 2 ** 64 == want
