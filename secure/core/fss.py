"""Distributed comparison function (DCF), vectorised over whole layers: the building block of a
one-round ReLU with function secret sharing (docs/FSS.md). Not wired into the engine yet.

What it computes
----------------
For the dealer's secret alpha in [0, 2^n) and payload beta in (Z_2^64)^k (k = 1, 2 or 3; default
beta = 1), `keygen` returns two keys k0, k1 such that for every n-bit x

    eval(0, k0, x) + eval(1, k1, x) = beta * [x < alpha]        (mod 2^64, per word, exactly)

while each key alone is pseudorandom and independent of alpha and beta. Both work on N comparisons at
once: alpha, beta and x are arrays, a key holds N independent DCF keys as a handful of arrays.

Construction
------------
The DCF of Boyle, Chandran, Gilboa, Gupta, Ishai, Kumar, Rathee, "Function Secret Sharing for
Mixed-Mode and Fixed-Point Secure Computation", Eurocrypt 2021 (ePrint 2020/1392), its DCF (Gen< and
Eval<): a GGM-style binary tree over the n bits of x, most significant first, with the
Boyle-Gilboa-Ishai (CCS 2016) correction words (s_CW, t_CW^L, t_CW^R) per level, plus a per-level
group correction V_CW that accumulates beta on the paths that leave alpha's path to the left while
alpha's bit is 1, and a final correction CW^(n+1) on the leaf seed. Party b starts with t = b and
adds (-1)^b times the converted values along its path. The algebra below follows the paper's
construction step by step (names as there: Keep/Lose, V_alpha, ...).

PRG
---
G(s) for a 128-bit seed s, per direction d in {L=0, R=1}: B = 1 + (64k + 1 + 127) // 128 blocks
(2 for k = 1, 3 for k = 2 and k = 3),

    block_{d,j} = AES_K(s ^ c_{d,j}) ^ s ^ c_{d,j},   c_{d,j} = (2j + d) * (1 + 2^64)  (in both words)

block_{d,0} is the child seed s^d (all 128 bits), the following blocks give v^d (k words) and t^d (the
low bit of word k; for k = 3 the leaf seed gets a third word from one more block). K is a fixed public AES-128 key (`FIXED_KEY`, a hash of a label). This is the
fixed-key Matyas-Meyer-Oseas construction with distinct tweaks (Google's distributed_point_functions
uses the same kind of fixed-key hash, after Guo, Katz, Wang, Yu, "Efficient and Secure Multiparty
Computation from Fixed-Key Block Ciphers", S&P 2020). With a *public* key it is a PRG in the
random-permutation model for AES_K: an adversary who never queries the permutation (either way) at
one of the 2B secret points s ^ c_{d,j} sees 2B outputs of a random permutation at distinct points,
each masked by its input; over T expanded seeds and q queries it errs with probability about
(qT + T^2) 2B / 2^128. The feed-forward "^ s ^ c" is what makes it one-way: without it an inverse query
on an output returns the seed. This is not a reduction to "AES is a PRF" under a secret key: LLAMA /
EzPC key AES with the seed itself (standard assumption, one key schedule per seed), which no
maintained Python library vectorises over arrays of keys. The tweak lets Eval expand only the child
x selects, in one AES call per level and chunk. Security parameter lambda = 128 (seeds are full
128-bit strings; the t bit comes from a separate block, not from the seed's low bit).

Key layout (`to_bytes` / `from_bytes`, all little-endian, structure of arrays)
-----------------------------------------------------------------------------
    header   16 bytes: b"DCF1", party u8, n_bits u8, k u8, 0 u8, N u64
    seed     N * 16            root seed s_b^(0) (the only part that differs between k0 and k1)
    s_cw     n * N * 16        per level seed correction
    v_cw     n * N * 8k        per level group correction V_CW (k words)
    t_cw     n * 2 * ceil(N/8) per level control-bit corrections t_CW^L, t_CW^R, bit-packed over N
                               (element e at bit e % 8 of byte e // 8)
    cw_last  N * 8k            CW^(n+1)

    key_size(N, n, k) = 16 + N * (16 + 8k + n * (16 + 8k)) + 2 n ceil(N / 8)  bytes

i.e. 24 + 24n + n/4 bytes per comparison for k = 1 (N a multiple of 8): 412 (n=16), 509 (20), 606
(24), 800 (32), 1576 (64); the in-memory `DcfKey` holds exactly these arrays (t_cw packed), and
`from_bytes` wraps a buffer without copying it.

Speed (docs/FSS.md has the measurements): every level is a handful of numpy passes over uint64 views
of a chunk of comparisons (`CHUNK`, sized for the L2 cache) plus one `update_into` of AES-ECB into a
preallocated buffer (a fresh `update` result costs page faults: 6x slower); no Python loop over
elements, a Python loop over levels and chunks.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

LAMBDA = 128
FIXED_KEY = hashlib.sha256(b"deepreduce-pi/secure/core/fss: fixed-key AES for the DCF PRG, v1").digest()[:16]
MAGIC = b"DCF1"
HEADER = 16
_U64 = np.dtype("<u8")


def _blocks(k: int) -> int:
    """AES blocks per direction: one for the child seed, then enough for k words of v plus the t bit."""
    return 1 + (64 * k + 1 + 127) // 128


def packed_size(n: int) -> int:
    return (n + 7) // 8


def key_size(count: int, n_bits: int, k: int = 1) -> int:
    """Exact byte size of one serialised key for `count` comparisons (see the module docstring)."""
    return HEADER + count * (16 + 8 * k + n_bits * (16 + 8 * k)) + 2 * n_bits * packed_size(count)


@dataclass
class DcfKey:
    """One party's keys for N comparisons. k0 and k1 of one `keygen` share every array but `seed`."""
    party: int
    n_bits: int
    seed: np.ndarray      # uint8 [N, 16]
    s_cw: np.ndarray      # uint8 [n, N, 16]
    v_cw: np.ndarray      # uint64 [n, N, k]
    t_cw: np.ndarray      # uint8 [n, 2, ceil(N/8)], packed bits (L, R), little bit order
    cw_last: np.ndarray   # uint64 [N, k]

    @property
    def count(self) -> int:
        return self.seed.shape[0]

    @property
    def k(self) -> int:
        return self.cw_last.shape[1]

    @property
    def nbytes(self) -> int:
        return key_size(self.count, self.n_bits, self.k)


class _Aes:
    """Fixed-key AES-128-ECB over whole uint64 arrays, written into a reusable buffer.

    `mmo(inp, out)` sets out = AES_K(inp) ^ inp block by block. ECB keeps no state between calls, so
    one encryptor serves every call (not thread-safe: one instance per thread)."""

    def __init__(self):
        self._enc = Cipher(algorithms.AES(FIXED_KEY), modes.ECB()).encryptor()

    @staticmethod
    def buffer(shape) -> np.ndarray:
        """A uint64 array of `shape` whose base has the 16 spare bytes `update_into` asks for."""
        n = int(np.prod(shape))
        raw = np.empty(8 * n + 16, dtype=np.uint8)
        return raw[: 8 * n].view(np.uint64).reshape(shape)

    def mmo(self, inp: np.ndarray, out: np.ndarray) -> np.ndarray:
        base = out.base if out.base is not None else out
        if (out.shape != inp.shape or not (out.flags.c_contiguous and inp.flags.c_contiguous)
                or out.ctypes.data != base.ctypes.data or base.nbytes < inp.nbytes + 15):
            raise ValueError("mmo needs contiguous arrays, out from _Aes.buffer")
        self._enc.update_into(memoryview(inp).cast("B"), memoryview(base).cast("B"))
        np.bitwise_xor(out, inp, out=out)
        return out


_LOCAL = threading.local()


def _aes() -> _Aes:
    """This thread's AES context."""
    if not hasattr(_LOCAL, "aes"):
        _LOCAL.aes = _Aes()
    return _LOCAL.aes


def _random_bytes(rng, n: int) -> bytes:
    """os.urandom when rng is None; else rng.bytes(n) (numpy Generator: tests only, not a CSPRNG),
    or rng(n) for any callable returning bytes (e.g. a seeded cryptographic PRG)."""
    if rng is None:
        return os.urandom(n)
    if hasattr(rng, "bytes"):
        return rng.bytes(n)
    return rng(n)


def _as_u64(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint64:
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got {a.dtype}")
        a = a.astype(np.uint64)  # two's complement for negative int64 (ring elements)
    return np.ascontiguousarray(a.reshape(-1))


def _check_bits(a: np.ndarray, n_bits: int, name: str):
    if not 1 <= n_bits <= 64:
        raise ValueError(f"n_bits must be in 1..64, got {n_bits}")
    if n_bits < 64 and a.size and int(a.max()) >> n_bits:
        raise ValueError(f"{name} has values outside [0, 2^{n_bits})")


def _signed(z: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """(-1)^t * z for a mask neg = 0 - t (all ones where t = 1), broadcast over trailing words."""
    return (z ^ neg) - neg


CHUNK = 16384  # comparisons per pass: a chunk's working set (~1.5 MB) stays in a core's L2 cache


def _in_threads(run, starts, threads: int):
    """run(starts) over `threads` interleaved shares of the chunk starts (chunks are independent and
    write disjoint slices; numpy and `update_into` release the GIL on these array sizes)."""
    starts = list(starts)
    if threads <= 1 or len(starts) <= 1:
        run(starts)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(run, starts[j::threads]) for j in range(threads)]:
            f.result()


def keygen(alpha, n_bits: int, rng=None, beta=None, chunk: int | None = None,
           threads: int = 1) -> tuple[DcfKey, DcfKey]:
    """Keys of f(x) = beta * [x < alpha] for N comparisons at once (BCGGIK21, Gen<).

    alpha: N integers in [0, 2^n_bits); beta: None (= 1), N ring elements, or [N, k] with k <= 3;
    rng: None for os.urandom, else see `_random_bytes`. The root seeds are the only randomness.
    Like `eval`, every level is vectorised over a chunk of comparisons (default `CHUNK`), chunks
    optionally spread over `threads` threads."""
    alpha = _as_u64(alpha, "alpha")
    _check_bits(alpha, n_bits, "alpha")
    N, n = alpha.size, n_bits
    if beta is None:
        beta = np.ones((N, 1), dtype=np.uint64)
    else:
        beta = np.asarray(beta)
        beta = _as_u64(beta, "beta").reshape(N, 1 if beta.ndim < 2 else beta.shape[1])
    k = beta.shape[1]
    if k not in (1, 2, 3):
        raise ValueError("payloads of 1 to 3 ring elements are supported")
    root = np.frombuffer(_random_bytes(rng, 2 * N * 16), dtype=np.uint8).reshape(2, N, 16)
    s_cw = np.empty((n, N, 16), dtype=np.uint8)
    v_cw = np.empty((n, N, k), dtype=np.uint64)
    t_cw = np.empty((n, 2, packed_size(N)), dtype=np.uint8)
    cw_last = np.empty((N, k), dtype=np.uint64)
    chunk = chunk or CHUNK
    chunk = max(8, chunk - chunk % 8)

    def run(starts):
        for lo in starts:
            _keygen_chunk(alpha, beta, root, n, lo, min(N, lo + chunk), s_cw, v_cw, t_cw, cw_last)

    _in_threads(run, range(0, N, chunk), threads)
    # each key gets its own copy of its root seeds (a view would keep the other party's seeds alive)
    return (DcfKey(0, n, root[0].copy(), s_cw, v_cw, t_cw, cw_last),
            DcfKey(1, n, root[1].copy(), s_cw, v_cw, t_cw, cw_last))


def _keygen_chunk(alpha, beta, root, n, lo, hi, s_cw, v_cw, t_cw, cw_last):
    """Gen< for comparisons lo..hi: both parties' paths along alpha, all levels (names as in the paper)."""
    C, k = hi - lo, beta.shape[1]
    B = _blocks(k)
    one = np.uint64(1)
    al = alpha[lo:hi]
    be = beta[lo:hi]
    s = root[:, lo:hi].view(np.uint64).reshape(2, C, 2).copy()         # s_b^(i-1), b = 0, 1
    t = np.zeros((2, C), dtype=np.uint64)                              # t_b^(i-1): t_0 = 0, t_1 = 1
    t[1] = 1
    v_alpha = np.zeros((C, k), dtype=np.uint64)
    s_cw64 = s_cw.view(np.uint64).reshape(n, -1, 2)
    tweak = np.arange(2, dtype=np.uint64)[:, None] + np.uint64(2) * np.arange(B, dtype=np.uint64)  # c_{d,j}
    aes = _aes()
    inp = np.empty((2, 2, B, C, 2), dtype=np.uint64)                    # [b, d, j, C, words]
    out = _Aes.buffer(inp.shape)
    am2 = np.empty((C, 2), dtype=np.uint64)
    m2 = np.empty((2, C, 2), dtype=np.uint64)
    pl, ph = lo // 8, (hi + 7) // 8
    for i in range(n):
        a = (al >> np.uint64(n - 1 - i)) & one                          # alpha_i
        am = np.negative(a)                                             # all ones where alpha_i = 1
        am2[:, 0] = am                                                  # doubled over the seed's words
        am2[:, 1] = am
        np.bitwise_xor(s[:, None, None], tweak[None, :, :, None, None], out=inp)
        aes.mmo(inp, out)
        seed = out[:, :, 0]                                             # [b, d, C, 2]
        # the words after the seed block, in order: v is words 0..k-1, t the low bit of word k
        words = out[:, :, 1] if B == 2 else np.moveaxis(out[:, :, 1:], 2, -2).reshape(2, 2, C, 2 * (B - 1))
        v = words[..., :k]                                              # [b, d, C, k]
        tt = words[..., k] & one                                        # [b, d, C]
        # Keep = R where alpha_i = 1, else L: y ^ ((y ^ z) & mask) picks z under the mask
        d = (seed[:, 0] ^ seed[:, 1]) & am2
        s_keep, s_lose = seed[:, 0] ^ d, seed[:, 1] ^ d                 # [b, C, 2]
        d = (v[:, 0] ^ v[:, 1]) & (am2 if k == 2 else am[:, None])
        v_keep, v_lose = v[:, 0] ^ d, v[:, 1] ^ d                       # [b, C, k]
        scw = s_cw64[i, lo:hi]
        np.bitwise_xor(s_lose[0], s_lose[1], out=scw)                   # s_CW = s_0^Lose ^ s_1^Lose
        # V_CW = (-1)^t1 [Convert(v_1^Lose) - Convert(v_0^Lose) - V_alpha + (beta if Lose = L)]
        inner = v_lose[1] - v_lose[0] - v_alpha + (be & am[:, None])
        v_cw[i, lo:hi] = _signed(inner, np.negative(t[1])[:, None])
        # V_alpha <- V_alpha - Convert(v_1^Keep) + Convert(v_0^Keep) + (-1)^t1 V_CW, the last = inner
        v_alpha += v_keep[0] - v_keep[1] + inner
        tl = tt[0, 0] ^ tt[1, 0] ^ a ^ one                              # t_CW^L
        tr = tt[0, 1] ^ tt[1, 1] ^ a                                    # t_CW^R
        t_cw[i, :, pl:ph] = np.packbits(np.stack([tl, tr]).astype(np.uint8), axis=-1, bitorder="little")
        t_keep_cw = tl ^ ((tl ^ tr) & am)
        t_keep = tt[:, 0] ^ ((tt[:, 0] ^ tt[:, 1]) & am)                # [b, C]
        # s_b <- s_b^Keep ^ t_b s_CW;  t_b <- t_b^Keep ^ t_b t_CW^Keep
        np.negative(t, out=m2[:, :, 0])
        m2[:, :, 1] = m2[:, :, 0]
        np.bitwise_and(m2, scw, out=m2)
        np.bitwise_xor(s_keep, m2, out=s)
        t = t_keep ^ (t_keep_cw & t)
    # CW^(n+1) = (-1)^t1 [Convert(s_1^(n)) - Convert(s_0^(n)) - V_alpha]; Convert = the seed's first k words
    cw_last[lo:hi] = _signed(_convert(s[1], k) - _convert(s[0], k) - v_alpha, np.negative(t[1])[:, None])


def _convert(s: np.ndarray, k: int) -> np.ndarray:
    """Convert a leaf seed (uint64 [C, 2]) to k ring words: the seed's words for k <= 2; for k = 3 a
    third word from one more fixed-key block under a tweak no tree level uses (c = 2B)."""
    if k <= 2:
        return s[:, :k]
    inp = np.ascontiguousarray(s) ^ np.uint64(2 * _blocks(k))
    out = _Aes.buffer(inp.shape)
    _aes().mmo(inp, out)
    return np.concatenate([s, out[:, :1]], axis=1)


def eval(party: int, key: DcfKey, x, chunk: int = CHUNK, threads: int = 1) -> np.ndarray:  # noqa: A001
    """This party's additive shares (mod 2^64) of beta * [x < alpha] (BCGGIK21, Eval<).

    x: N integers in [0, 2^n_bits), element e compared under key e. Returns uint64 [N] for k = 1,
    [N, k] otherwise. Only the child that x selects is expanded: B AES blocks per level and element.

    Every level is vectorised over a chunk of `chunk` comparisons (all levels of one chunk, then the
    next chunk): the same numpy passes as over all N at once, but on arrays that stay in cache.
    threads > 1 spreads the chunks over that many threads."""
    if party not in (0, 1) or party != key.party:
        raise ValueError(f"key of party {key.party} evaluated as party {party}")
    x = _as_u64(x, "x")
    N, k = key.count, key.k
    if x.size != N:
        raise ValueError(f"{x.size} inputs for {N} keys")
    _check_bits(x, key.n_bits, "x")
    chunk = max(8, chunk - chunk % 8) if chunk < N else max(N, 1)  # multiple of 8: t_cw packs 8 a byte
    acc = np.zeros((N, k), dtype=np.uint64)

    def run(starts):
        ws = _EvalSpace(min(chunk, N), k)
        for lo in starts:
            _eval_chunk(party, key, x, lo, min(N, lo + chunk), acc, ws)

    _in_threads(run, range(0, N, chunk), threads)
    if party:
        np.negative(acc, out=acc)
    return acc[:, 0].copy() if k == 1 else acc


class _EvalSpace:
    """Buffers of one chunk, reused by every level and chunk (fresh large arrays cost page faults)."""

    def __init__(self, C: int, k: int):
        B = _blocks(k)
        self.x2 = np.empty((C, 2), dtype=np.uint64)
        self.inp = np.empty((B, C, 2), dtype=np.uint64)
        self.out = _Aes.buffer((B, C, 2))
        self.bit2 = np.empty((C, 2), dtype=np.uint64)
        self.bit8 = np.empty(C, dtype=np.uint8)
        self.t8 = np.empty(C, dtype=np.uint8)
        self.t64 = np.empty(C, dtype=np.uint64)
        self.m2 = np.empty((C, 2), dtype=np.uint64)
        self.sel = np.empty(C, dtype=np.uint8)
        self.tmp_s = np.empty((C, 2), dtype=np.uint64)
        self.tmp_v = np.empty((C, k), dtype=np.uint64)


def _eval_chunk(party: int, key: DcfKey, x: np.ndarray, lo: int, hi: int, acc: np.ndarray, ws: _EvalSpace):
    n, k, C = key.n_bits, key.k, hi - lo
    B = _blocks(k)
    tb, tw = 1 + k // 2, k % 2  # t: the low bit of word k after the seed block (block 1 + k // 2)
    aes = _aes()
    # Per-element scalars (x_i, the mask of t) are used "doubled", one copy per 64-bit word of a
    # seed, so that every pass over the [C, 2] seed arrays is a contiguous elementwise operation:
    # a broadcast [C, 2] op [C, 1] runs numpy's inner loop two elements at a time (2-3x slower).
    x2, inp, out, bit2, bit8 = ws.x2[:C], ws.inp[:, :C], ws.out[:, :C], ws.bit2[:C], ws.bit8[:C]
    t8, t64, m2, sel, tmp_s = ws.t8[:C], ws.t64[:C], ws.m2[:C], ws.sel[:C], ws.tmp_s[:C]
    if C < ws.x2.shape[0]:  # the last, shorter chunk: contiguous buffers of its own length
        inp, out = np.empty((B, C, 2), dtype=np.uint64), _Aes.buffer((B, C, 2))
    x2[:, 0] = x[lo:hi]
    x2[:, 1] = x[lo:hi]
    s = key.seed[lo:hi].view(np.uint64).reshape(C, 2)
    s_cw = key.s_cw.view(np.uint64).reshape(n, -1, 2)
    t8[:] = party                                                         # t^(0) = b
    a = acc[lo:hi]
    acc_v, tmp_v = (a[:, 0], ws.tmp_v[:C, 0]) if k == 1 else (a, ws.tmp_v[:C])
    pl, ph = lo // 8, (hi + 7) // 8
    for i in range(n):
        np.right_shift(x2, np.uint64(n - 1 - i), out=bit2)
        np.bitwise_and(bit2, np.uint64(1), out=bit2)                      # x_i, doubled
        np.bitwise_xor(s, bit2, out=inp[0])                               # s ^ c_{x_i, 0}
        for j in range(1, B):
            np.bitwise_xor(inp[0], np.uint64(2 * j), out=inp[j])          # s ^ c_{x_i, j}
        aes.mmo(inp, out)
        s_new, t_new = out[0], out[tb, :, tw]
        np.copyto(t64, t8)
        np.negative(t64, out=t64)                                         # all ones where t^(i-1) = 1
        np.copyto(m2[:, 0], t64)
        np.copyto(m2[:, 1], t64)
        # s <- s^x ^ t * s_CW
        np.bitwise_and(s_cw[i, lo:hi], m2, out=tmp_s)
        np.bitwise_xor(s_new, tmp_s, out=s_new)
        # V <- V + v^x + t * V_CW   (the sign (-1)^b is applied once, at the end)
        if k == 1:
            np.add(acc_v, out[1, :, 0], out=acc_v)
            np.bitwise_and(key.v_cw[i, lo:hi, 0], t64, out=tmp_v)
        elif k == 2:
            np.add(acc_v, out[1], out=acc_v)
            np.bitwise_and(key.v_cw[i, lo:hi], m2, out=tmp_v)
        else:  # words 0, 1 of block 1 and word 0 of block 2
            np.add(acc_v[:, :2], out[1], out=acc_v[:, :2])
            np.add(acc_v[:, 2], out[2, :, 0], out=acc_v[:, 2])
            np.bitwise_and(key.v_cw[i, lo:hi], t64[:, None], out=tmp_v)
        np.add(acc_v, tmp_v, out=acc_v)
        # t <- t^x ^ t * t_CW^{x_i}
        np.copyto(bit8, bit2[:, 0], casting="unsafe")
        bits = np.unpackbits(key.t_cw[i, :, pl:ph], axis=-1, count=C, bitorder="little")
        np.bitwise_xor(bits[0], bits[1], out=sel)
        np.bitwise_and(sel, bit8, out=sel)
        np.bitwise_xor(sel, bits[0], out=sel)
        np.bitwise_and(sel, t8, out=sel)
        np.bitwise_and(t_new, np.uint64(1), out=t8, casting="unsafe")
        np.bitwise_xor(t8, sel, out=t8)
        s = s_new
    # V <- V + Convert(s^(n)) + t^(n) * CW^(n+1)
    np.copyto(t64, t8)
    np.negative(t64, out=t64)
    np.add(a, _convert(s, k), out=a)
    np.add(a, key.cw_last[lo:hi] & t64[:, None], out=a)


# -- serialisation ---------------------------------------------------------------------------

def to_bytes(key: DcfKey) -> bytes:
    """The flat layout of the module docstring; len() == key_size(N, n, k)."""
    out = np.empty(key.nbytes, dtype=np.uint8)
    write_key(key, out)
    return out.tobytes()


def write_key(key: DcfKey, out: np.ndarray) -> None:
    """Write `to_bytes(key)` into `out` (uint8, exactly key.nbytes long) with no intermediate copy: the
    dealer writes each key straight into the message it sends."""
    N, n, k = key.count, key.n_bits, key.k
    if out.dtype != np.uint8 or out.ndim != 1 or out.size != key_size(N, n, k):
        raise ValueError(f"a DCF key of {key_size(N, n, k)} bytes needs a uint8 buffer of that size")
    out[:HEADER] = np.frombuffer(MAGIC + bytes([key.party, n, k, 0]) + int(N).to_bytes(8, "little"), np.uint8)
    pos = HEADER
    for part in (key.seed, key.s_cw, key.v_cw.astype(_U64, copy=False), key.t_cw, key.cw_last.astype(_U64, copy=False)):
        raw = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
        out[pos: pos + raw.size] = raw
        pos += raw.size
    assert pos == out.size


def from_bytes(buf) -> DcfKey:
    """Inverse of `to_bytes`; the arrays are read-only views of buf (no copy)."""
    mv = memoryview(buf).cast("B")
    if len(mv) < HEADER or bytes(mv[:4]) != MAGIC:
        raise ValueError("not a DCF key")
    party, n, k, _ = mv[4], mv[5], mv[6], mv[7]
    N = int.from_bytes(mv[8:16], "little")
    if party not in (0, 1) or not 1 <= n <= 64 or k not in (1, 2, 3):
        raise ValueError("bad DCF key header")
    if len(mv) != key_size(N, n, k):
        raise ValueError(f"DCF key of {len(mv)} bytes, expected {key_size(N, n, k)}")
    pos = HEADER

    def take(nbytes, dtype, shape):
        nonlocal pos
        a = np.frombuffer(mv, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=pos)
        pos += nbytes
        return a.reshape(shape)

    seed = take(16 * N, np.uint8, (N, 16))
    s_cw = take(16 * n * N, np.uint8, (n, N, 16))
    v_cw = take(8 * k * n * N, _U64, (n, N, k))
    t_cw = take(2 * n * packed_size(N), np.uint8, (n, 2, packed_size(N)))
    cw_last = take(8 * k * N, _U64, (N, k))
    if sys.byteorder != "little":  # native uint64 for the arithmetic
        v_cw, cw_last = v_cw.astype(np.uint64), cw_last.astype(np.uint64)
    return DcfKey(party, n, seed, s_cw, v_cw, t_cw, cw_last)


# -- benchmark -------------------------------------------------------------------------------

def bench(counts=(557_056, 14_336), widths=(16, 20, 32, 64), k: int = 1, reps: int = 1, threads: int = 1):
    """Keygen and eval (party 0) times; prints one line per (N, n). No assertions."""
    import time
    rng = np.random.default_rng(0)
    rows = []
    w0, w1 = keygen(np.arange(64, dtype=np.uint64), 8, rng)   # warm-up: first-call costs are not counted
    eval(0, w0, np.arange(64, dtype=np.uint64))
    for N in counts:
        for n in widths:
            hi = np.uint64((1 << n) - 1) if n < 64 else np.uint64(2**64 - 1)
            alpha = rng.integers(0, hi, size=N, dtype=np.uint64, endpoint=True)
            x = rng.integers(0, hi, size=N, dtype=np.uint64, endpoint=True)
            beta = None if k == 1 else rng.integers(0, 2**64 - 1, size=(N, k), dtype=np.uint64, endpoint=True)
            gen, ev = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                k0, k1 = keygen(alpha, n, rng, beta, threads=threads)
                t1 = time.perf_counter()
                y0 = eval(0, k0, x, threads=threads)
                t2 = time.perf_counter()
                gen.append(t1 - t0)
                ev.append(t2 - t1)
            y1 = eval(1, k1, x)
            want = (x < alpha).astype(np.uint64)
            ok = np.array_equal(y0 + y1, want) if k == 1 else np.array_equal(y0 + y1, beta * want[:, None])
            g, e = min(gen), min(ev)
            row = dict(N=N, n=n, k=k, threads=threads, keygen_ms=1e3 * g, eval_ms=1e3 * e,
                       keygen_ms_level=1e3 * g / n, eval_ms_level=1e3 * e / n, key_bytes=key_size(N, n, k),
                       bytes_per_cmp=key_size(N, n, k) / N, correct=bool(ok))
            rows.append(row)
            print(f"N={N:>7} n={n:>2} k={k} threads={threads}:"
                  f" keygen {row['keygen_ms']:8.1f} ms ({row['keygen_ms_level']:6.2f}/level)"
                  f"  eval {row['eval_ms']:8.1f} ms ({row['eval_ms_level']:6.2f}/level)"
                  f"  key {row['key_bytes'] / 2**20:8.1f} MiB ({row['bytes_per_cmp']:.1f} B/cmp)"
                  f"  correct={ok}", flush=True)
            del k0, k1
    return rows


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m secure.core.fss",
                                 description="DCF keygen/eval benchmark (docs/FSS.md)")
    ap.add_argument("--bench", action="store_true", help="time keygen and eval")
    ap.add_argument("--counts", default="557056,14336")
    ap.add_argument("--widths", default="16,20,32,64")
    ap.add_argument("--k", type=int, default=1, help="payload words (1 or 2)")
    ap.add_argument("--reps", type=int, default=1, help="report the fastest of this many runs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not args.bench:
        ap.print_help()
        return 0
    bench(tuple(int(c) for c in args.counts.split(",")), tuple(int(w) for w in args.widths.split(",")),
          args.k, args.reps, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
