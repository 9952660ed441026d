"""The distributed comparison function of secure/core/fss.py: exactness, key statistics, serialisation,
and the one-round ReLU algebra that docs/FSS.md plans on top of it."""

from __future__ import annotations

import numpy as np
import pytest

from secure.core import fss

U64 = np.uint64
WIDTHS = [1, 2, 7, 16, 20, 24, 32, 63, 64]


def top(n: int) -> int:
    return (1 << n) - 1


def rand(rng, n: int, size) -> np.ndarray:
    return rng.integers(0, top(n), size=size, dtype=U64, endpoint=True)


def special_alphas(rng, n: int, count: int) -> np.ndarray:
    a = rand(rng, n, count)
    edge = [0, 1, 2, top(n), top(n) - 1, 1 << (n - 1), (1 << (n - 1)) - 1, (1 << (n - 1)) + 1]
    a[: len(edge)] = np.array([e & top(n) for e in edge], dtype=U64)
    return a


def inputs_around(rng, alpha: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """x per element: alpha itself, its neighbours, the domain's ends, values with the top bit set."""
    m = U64(top(n))
    N = alpha.size
    return {
        "alpha": alpha.copy(),
        "alpha-1": (alpha - U64(1)) & m,
        "alpha+1": (alpha + U64(1)) & m,
        "zero": np.zeros(N, dtype=U64),
        "max": np.full(N, top(n), dtype=U64),
        "top bit": rand(rng, n, N) | U64(1 << (n - 1)),
        "random": rand(rng, n, N),
    }


def shares(k0, k1, x, **kw):
    return fss.eval(0, k0, x, **kw), fss.eval(1, k1, x, **kw)


@pytest.mark.parametrize("n", WIDTHS)
def test_shares_add_up_to_the_comparison(n):
    rng = np.random.default_rng(n)
    alpha = special_alphas(rng, n, 600)
    k0, k1 = fss.keygen(alpha, n, rng)
    for name, x in inputs_around(rng, alpha, n).items():
        y0, y1 = shares(k0, k1, x)
        assert y0.dtype == U64 and y0.shape == alpha.shape, name
        np.testing.assert_array_equal(y0 + y1, (x < alpha).astype(U64), err_msg=name)


@pytest.mark.parametrize("n", [5, 20, 64])
def test_payloads(n):
    """beta * [x < alpha] for a per-element payload of one to three ring elements, mod 2^64 (three: the
    engine's FSS ReLU; its third word comes from one more block of the leaf seed)."""
    rng = np.random.default_rng(100 + n)
    N = 777
    alpha = special_alphas(rng, n, N)
    for beta in (rand(rng, 64, N), rand(rng, 64, (N, 2)), rand(rng, 64, (N, 3)), -np.arange(N, dtype=np.int64)):
        k0, k1 = fss.keygen(alpha, n, rng, beta=beta)
        b = np.asarray(beta).astype(U64).reshape(N, -1)
        for name, x in inputs_around(rng, alpha, n).items():
            y0, y1 = shares(k0, k1, x)
            want = b * (x < alpha).astype(U64)[:, None]
            np.testing.assert_array_equal((y0 + y1).reshape(N, -1), want, err_msg=name)


def test_chunks_and_threads_change_nothing():
    rng = np.random.default_rng(7)
    n, N = 20, 1001  # not a multiple of 8: the last chunk's packed t_cw byte is shared
    alpha, x = rand(rng, n, N), rand(rng, n, N)
    for beta in (None, rand(rng, 64, (N, 3))):
        want = (x < alpha).astype(U64)[:, None] * (1 if beta is None else beta)
        ref = fss.keygen(alpha, n, np.random.default_rng(1), beta=beta)
        for chunk, threads in ((8, 1), (24, 2), (5000, 1), (200, 3)):
            k0, k1 = fss.keygen(alpha, n, np.random.default_rng(1), beta=beta, chunk=chunk, threads=threads)
            assert fss.to_bytes(k0) == fss.to_bytes(ref[0]) and fss.to_bytes(k1) == fss.to_bytes(ref[1])
            y0, y1 = shares(k0, k1, x, chunk=chunk, threads=threads)
            np.testing.assert_array_equal(y0, fss.eval(0, ref[0], x))
            np.testing.assert_array_equal((y0 + y1).reshape(N, -1), want)


def test_one_party_output_looks_uniform():
    """A party's shares are uniform-looking 64-bit values, whatever the comparison's result."""
    rng = np.random.default_rng(3)
    n, N = 16, 8192
    alpha = rand(rng, n, N)
    x = rand(rng, n, N)
    k0, k1 = fss.keygen(alpha, n, rng)
    lt = x < alpha
    assert 0.3 < lt.mean() < 0.7
    for party, key in ((0, k0), (1, k1)):
        y = fss.eval(party, key, x)
        assert np.isin(y, [0, 1]).sum() == 0
        assert len(np.unique(y)) == N
        bits = ((y[:, None] >> np.arange(64, dtype=U64)) & U64(1)).astype(float)  # [N, 64]
        assert np.all(np.abs(bits.mean(0) - 0.5) < 0.05)
        # the same statistics whether x < alpha or not
        assert np.all(np.abs(bits[lt].mean(0) - bits[~lt].mean(0)) < 0.08)


def test_keys_do_not_show_alpha():
    rng = np.random.default_rng(5)
    n, N = 16, 8192
    alpha = rand(rng, n, N)
    k0, k1 = fss.keygen(alpha, n, rng)
    assert not np.any(np.all(k0.seed == k1.seed, axis=1))          # the two keys differ everywhere
    assert k0.s_cw is k1.s_cw and k0.v_cw is k1.v_cw                  # ... only in the root seed
    tcw = np.unpackbits(k0.t_cw, axis=-1, count=N, bitorder="little").astype(float)  # [n, 2, N]
    scw_bit = (k0.s_cw[:, :, 0] & 1).astype(float)                    # [n, N]
    vcw_top = (k0.v_cw[:, :, 0] >> U64(63)).astype(float)
    last_top = (k0.cw_last[:, 0] >> U64(63)).astype(float)
    assert abs(last_top.mean() - 0.5) < 0.05
    for i in range(n):
        ai = ((alpha >> U64(n - 1 - i)) & U64(1)).astype(bool)
        for name, stat in (("tL", tcw[i, 0]), ("tR", tcw[i, 1]), ("s_cw", scw_bit[i]), ("v_cw", vcw_top[i])):
            assert abs(stat.mean() - 0.5) < 0.05, (i, name)
            assert abs(stat[ai].mean() - stat[~ai].mean()) < 0.08, (i, name)  # no correlation with alpha_i


def test_same_randomness_other_alpha():
    """With the same root seeds, keys for different alphas share the seeds and nothing else that
    would tell the alphas apart: their correction words are equally balanced."""
    n, N = 20, 4096
    lo = fss.keygen(np.zeros(N, dtype=U64), n, np.random.default_rng(9))
    hi = fss.keygen(np.full(N, top(n), dtype=U64), n, np.random.default_rng(9))
    np.testing.assert_array_equal(lo[0].seed, hi[0].seed)
    assert not np.array_equal(lo[0].s_cw, hi[0].s_cw)
    for key in (lo[0], hi[0]):
        tcw = np.unpackbits(key.t_cw, axis=-1, count=N, bitorder="little")
        assert abs(tcw.mean() - 0.5) < 0.02
        assert abs(key.s_cw.mean() - 127.5) < 1.0
    x = np.random.default_rng(10).integers(0, top(n), N, dtype=U64, endpoint=True)
    np.testing.assert_array_equal(sum(shares(*lo, x)), np.zeros(N, dtype=U64))
    np.testing.assert_array_equal(sum(shares(*hi, x)), (x < U64(top(n))).astype(U64))


PER_COMPARISON = {16: 412, 20: 509, 24: 606, 32: 800, 64: 1576}  # 24 + 24n + n/4 bytes, k = 1


@pytest.mark.parametrize("n", sorted(PER_COMPARISON))
def test_serialisation_round_trip_and_size(n):
    rng = np.random.default_rng(n)
    for N, k in ((8000, 1), (13, 1), (13, 2), (0, 1)):
        alpha = rand(rng, n, N)
        beta = None if k == 1 else rand(rng, 64, (N, 2))
        k0, k1 = fss.keygen(alpha, n, rng, beta=beta)
        for key in (k0, k1):
            raw = fss.to_bytes(key)
            assert len(raw) == fss.key_size(N, n, k) == key.nbytes
            assert len(raw) == 16 + N * (16 + 8 * k + n * (16 + 8 * k)) + 2 * n * ((N + 7) // 8)
            back = fss.from_bytes(raw)
            assert (back.party, back.n_bits, back.count, back.k) == (key.party, n, N, k)
            for f in ("seed", "s_cw", "v_cw", "t_cw", "cw_last"):
                np.testing.assert_array_equal(getattr(back, f), getattr(key, f))
            assert fss.to_bytes(back) == raw
        if N:
            x = rand(rng, n, N)
            y = fss.eval(0, fss.from_bytes(fss.to_bytes(k0)), x) + fss.eval(1, fss.from_bytes(fss.to_bytes(k1)), x)
            want = (x < alpha).astype(U64)
            np.testing.assert_array_equal(y.reshape(N, -1), want[:, None] * (1 if k == 1 else beta))
    assert fss.key_size(8000, n) - 16 == 8000 * PER_COMPARISON[n]


def test_bad_keys_and_inputs():
    rng = np.random.default_rng(0)
    k0, k1 = fss.keygen(rand(rng, 8, 16), 8, rng)
    raw = fss.to_bytes(k0)
    with pytest.raises(ValueError):
        fss.from_bytes(raw[:-1])
    with pytest.raises(ValueError):
        fss.from_bytes(b"XXXX" + raw[4:])
    with pytest.raises(ValueError):
        fss.eval(1, k0, np.zeros(16, dtype=U64))          # party 0's key
    with pytest.raises(ValueError):
        fss.eval(0, k0, np.zeros(15, dtype=U64))          # one input per key
    with pytest.raises(ValueError):
        fss.eval(0, k0, np.full(16, 256, dtype=U64))      # outside [0, 2^8)
    with pytest.raises(ValueError):
        fss.keygen(np.array([256], dtype=U64), 8)
    with pytest.raises(ValueError):
        fss.keygen(np.zeros(4, dtype=U64), 8, beta=np.zeros((4, 4), dtype=U64))


def test_os_randomness_by_default():
    alpha = np.arange(64, dtype=U64)
    a0, _ = fss.keygen(alpha, 8)
    b0, _ = fss.keygen(alpha, 8)
    assert not np.array_equal(a0.seed, b0.seed)


# -- the one-round ReLU of docs/FSS.md, simulated locally ------------------------------------------

def relu_one_round(x: np.ndarray, n: int, rng):
    """ReLU on additive shares of x (int64 ring values with |x| < 2^(n-1)), as docs/FSS.md plans it:
    dealer: r in Z_2^64, rho = r mod 2^(n-1), m = bit n-1 of r; a DCF on n-1 bits with alpha = rho and
    payload (1 - 2m, (1 - 2m) r); additive shares of r, m and r*m.
    online: each party opens x_j + r_j (one round); then everything is local."""
    N = x.size
    H = U64(1 << (n - 1))
    x = x.astype(np.int64).view(U64)
    x0 = rand(rng, 64, N)
    x1 = x - x0
    # dealer
    r = rand(rng, 64, N)
    rho, m = r & (H - U64(1)), (r >> U64(n - 1)) & U64(1)
    sgn = U64(1) - U64(2) * m                                           # 1 - 2m in Z_2^64
    k0, k1 = fss.keygen(rho, n - 1, rng, beta=np.stack([sgn, sgn * r], axis=1))

    def split(v):
        v0 = rand(rng, 64, N)
        return v0, v - v0
    r_sh, m_sh, rm_sh = split(r), split(m), split(r * m)
    # online: the only round
    xh = (x0 + r_sh[0]) + (x1 + r_sh[1])                               # x + r, public to both
    p = (xh >> U64(n - 1)) & U64(1)
    u = xh & (H - U64(1))
    out = []
    for j, key in ((0, k0), (1, k1)):
        y = fss.eval(j, key, u)                                         # shares of (1-2m)c, (1-2m)r c
        e = m_sh[j] + y[:, 0]                                           # e = m xor c
        re = rm_sh[j] + y[:, 1]                                         # r e
        d = (U64(2) * p - U64(1)) * e + ((U64(1) - p) if j == 0 else U64(0))   # d = [x >= 0]
        rd = (U64(1) - p) * r_sh[j] + (U64(2) * p - U64(1)) * re
        out.append(xh * d - rd)
    return out


@pytest.mark.parametrize("n", [8, 20, 32])
def test_one_round_relu_plan(n):
    rng = np.random.default_rng(11 + n)
    H = 1 << (n - 1)
    x = rng.integers(-H, H, size=3000, dtype=np.int64)
    x[:6] = [0, -1, 1, H - 1, -H, -H + 1]
    y0, y1 = relu_one_round(x, n, rng)
    np.testing.assert_array_equal((y0 + y1).view(np.int64), np.maximum(x, 0))
