"""Arithmetic in the ring Z_2^64 for the fast engine: fixed-point encoding, exact ring linear layers,
local truncation, a seeded cryptographic PRG and bit packing.

int64 tensors are ring elements (two's complement wraps mod 2^64). Exact ring products are computed
with float64 convolutions on limbs: torch's int64 conv2d is exact but about 30x slower than float64
on this CPU, and a float64 sum is exact while every partial sum stays below 2^53.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Fixed point: a product carries ACT_BITS + WEIGHT_BITS = 28 fractional bits; local truncation fails
# with probability about |product| / 2^64 per element, so that sum is kept small. With 28 bits, the
# split 12/16 gave the smallest logit error in a plaintext simulation of the shipped model (max 0.007
# against float64 on 32 inputs; 16/12: 0.034): weight rounding dominates activation rounding.
ACT_BITS = 12
WEIGHT_BITS = 16
_EXACT = 2.0 ** 53


def encode(x: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(x.double() * (1 << bits)).long()


def decode(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x.double() / (1 << bits)


def truncate_share(share: torch.Tensor, bits: int, party: int) -> torch.Tensor:
    """SecureML local truncation: the shares of x become shares of x / 2^bits up to 1 unit, except
    with probability about |x| / 2^63 (a share pair that wraps), which callers keep small."""
    return share >> bits if party == 0 else -((-share) >> bits)


# -- linear layers ------------------------------------------------------------------------------

def apply_linear(kind: str, w: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
    """The bilinear map of one plan op: conv, per-channel scale, or fully connected."""
    if kind == "conv":
        return F.conv2d(x, w, stride=params["stride"], padding=params["padding"],
                        dilation=params.get("dilation", 1), groups=params.get("groups", 1))
    if kind == "scale_shift":
        return x * w.view(1, -1, *([1] * (x.dim() - 2)))
    if kind == "linear":
        return x @ w.t()
    raise ValueError(f"not a linear op: {kind!r}")


def _balanced_limbs(x: torch.Tensor, bits: int, count: int) -> list[torch.Tensor]:
    """x = sum(limb_i * 2^(bits*i)) mod 2^64 with every limb in [-2^(bits-1), 2^(bits-1))."""
    limbs, rest = [], x
    for i in range(count):
        if i == count - 1:
            limbs.append(rest)  # what is left fits: |rest| < 2^(64 - bits*i - 1)
            break
        low = ((rest + (1 << (bits - 1))) & ((1 << bits) - 1)) - (1 << (bits - 1))
        limbs.append(low)
        rest = (rest - low) >> bits
    return limbs


@dataclass(frozen=True)
class LimbPlan:
    """How to compute w * x exactly: x in `count` balanced limbs, the input channels in `groups`;
    `channels_last` only changes speed (see `prefer_channels_last`)."""
    count: int
    groups: int
    channels_last: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


# A float64 sum of w_k * u_k is exact while every partial sum stays below 2^53. Worst case that
# needs ||w||_1 * 2^(b-1) <= 2^53 for limbs of b bits, which wide trained layers miss (channel
# groups, smaller GEMMs). But the server's operand F = X - B is uniform over the ring (B is a fresh
# uniform mask), so its limbs are independent and uniform, and by Hoeffding a partial sum reaches
# t = 2^53 - 2^48 (its mean, under ||w||_1 / 2, is far smaller) with probability at most
# 2 exp(-2 t^2 / (2^(2b) ||w||_2^2)). With ||w||_2 at most 2^18.4 that is below 2^-96 per partial
# sum (a batch-64 ResNet18 query computes under 2^41 of them); trained and random-init layers are
# near 2^16-2^17, so one conv on two 32-bit limbs suffices. docs/PROTOCOL.md has the argument.
STAT_FAILURE_BITS = 96


def plan_limbs(w: torch.Tensor, kind: str, uniform_input: bool = True, conv_groups: int = 1) -> LimbPlan:
    """The cheapest split for which float64 partial sums stay exact: two 32-bit limbs in one conv
    when the operand is uniform and ||w||_2 is small enough (see above); otherwise the worst-case
    bound (one bit of margin), with the input channels in groups where that allows 32-bit limbs.
    A grouped conv (`conv_groups` > 1) is never split by channels: its weight's input axis holds
    each group's own channels, so equal chunks of weight and input would not line up."""
    if uniform_input and _stat_exact(w, kind, 32):
        return LimbPlan(2, 1)
    for groups in (1, 2, 4, 8):
        if kind == "conv" and w.shape[1] % groups:
            break
        if groups > 1 and (kind != "conv" or conv_groups > 1):
            break
        if _limb_bits(w, kind, groups) >= 32:
            return LimbPlan(2, groups)
    return LimbPlan(math.ceil(64 / min(_limb_bits(w, kind, 1), 63)), 1)


def _stat_exact(w: torch.Tensor, kind: str, bits: int) -> bool:
    """Hoeffding: P(|partial sum| >= t) <= 2 exp(-2 t^2 / (2^(2 bits) ||w_o||_2^2)) <= 2^-STAT_FAILURE_BITS."""
    wd = w.double()
    if kind == "scale_shift":  # no sums: the worst case is all there is
        return float(wd.abs().max()) * 2.0 ** (bits - 1) <= 2.0 ** 52
    l2_sq = float(wd.flatten(1).pow(2).sum(1).max())
    t = 2.0 ** 53 - 2.0 ** 48
    exponent = 2 * t * t / (2.0 ** (2 * bits) * max(l2_sq, 1.0))  # bound = 2 exp(-exponent)
    return exponent >= (STAT_FAILURE_BITS + 1) * math.log(2)


def _limb_bits(w: torch.Tensor, kind: str, groups: int) -> int:
    absw = w.abs().double()
    if kind == "scale_shift":
        l1 = absw.max()
    else:
        l1 = max(chunk.flatten(1).sum(1).max() for chunk in absw.chunk(groups, dim=1))
    return int(math.floor(52 - math.log2(max(float(l1), 1.0)))) + 1  # ||w||_1 * 2^(bits-1) <= 2^52


def ring_linear_small(kind: str, w: torch.Tensor, x: torch.Tensor, params: dict, limbs: LimbPlan) -> torch.Tensor:
    """w * x mod 2^64 for a small-integer w (the server's encoded weights, int64 or already float64)
    and any ring x."""
    bits = math.ceil(64 / limbs.count)
    stacked = torch.cat(_balanced_limbs(x, bits, limbs.count)).to(torch.float64, memory_format=limbs.memory_format)
    wd = w.to(torch.float64, memory_format=limbs.memory_format)  # no copy when the caller keeps it so
    if limbs.groups == 1:
        y = apply_linear(kind, wd, stacked, params)
    else:  # exact per channel group, summed in the ring
        y = sum(apply_linear(kind, wg, xg, params).long()
                for wg, xg in zip(wd.chunk(limbs.groups, dim=1), stacked.chunk(limbs.groups, dim=1)))
    y = y.to(torch.long, memory_format=torch.contiguous_format)
    parts = y.chunk(limbs.count)
    out = parts[0]
    for i in range(1, limbs.count):
        out = out + (parts[i] << (bits * i))
    return out


def prefer_channels_last(input_shape) -> bool:
    """Float64 convolutions here (2 threads, two limbs as a batch of 2, one ResNet18 conv each):
    channels-last took 4.5 vs 8.5 ms at 512 channels 4x4, 2.8 vs 4.1 at 256 8x8, the same at
    128 16x16, 4.3 vs 3.9 at 64 32x32 (the layout changes cost more than they save there)."""
    return input_shape[-1] * input_shape[-2] <= 16 * 16


MAX_EXACT_FAN_IN = 1 << 23  # ring_linear: K products of 16-bit limbs sum exactly in float64 while K < 2^23


def ring_linear(kind: str, a: torch.Tensor, b: torch.Tensor, params: dict) -> torch.Tensor:
    """a * b mod 2^64 for arbitrary ring a (weight-shaped) and b (input-shaped): 16-bit limbs of
    both, the 10 limb products that survive mod 2^64 (|sum| < 2^15 * 2^15 * K < 2^53 for K < 2^23)."""
    fan_in = 1 if kind == "scale_shift" else a[0].numel()  # K: the terms of one output's dot product
    if fan_in >= MAX_EXACT_FAN_IN:
        raise ValueError(f"a {kind} layer with {fan_in:,} inputs per output is beyond the exact float64 "
                         f"limb products (at most {MAX_EXACT_FAN_IN - 1:,}): split the layer")
    al = _balanced_limbs(a, 16, 4)
    bl = torch.cat(_balanced_limbs(b, 16, 4)).double()
    out = None
    for i in range(4):
        y = apply_linear(kind, al[i].double(), bl[: (4 - i) * len(b)], params).long().chunk(4 - i)
        for j in range(4 - i):
            term = y[j] << (16 * (i + j))
            out = term if out is None else out + term
    return out


def linear_params(op) -> dict:
    """The geometry `apply_linear` needs from a plan op (conv: stride, padding, dilation, groups)."""
    return {"stride": op.stride, "padding": op.padding, "dilation": op.dilation or [1, 1], "groups": op.groups or 1}


# -- local maps on shares ------------------------------------------------------------------------
# Every party applies these to its own share: the results are shares of the map of the value.

def mul_public(share: torch.Tensor, factor: float, party: int) -> torch.Tensor:
    """Shares of x * factor for a public float: exact for an integer factor (a ring product), else
    factor in WEIGHT_BITS fixed point and a local truncation (error: one unit of 2^-ACT_BITS plus
    |x| * 2^-(WEIGHT_BITS + 1) from rounding the factor), as after a linear layer."""
    if float(factor).is_integer():
        return share * int(factor)
    return truncate_share(share * int(round(factor * (1 << WEIGHT_BITS))), WEIGHT_BITS, party)


def sum_pool2d(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """The window sums of avg_pool2d (zero padding included), exact in the ring: int64 slices added
    (no float conv: shares are full 64-bit)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = F.pad(x, (pw, pw, ph, ph))
    oh, ow = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = torch.zeros(*x.shape[:2], oh, ow, dtype=x.dtype)
    for di in range(kh):
        for dj in range(kw):
            out += xp[:, :, di: di + sh * (oh - 1) + 1: sh, dj: dj + sw * (ow - 1) + 1: sw]
    return out


def pool_windows(height: int, width: int, kernel, stride, padding) -> torch.Tensor:
    """[outputs, kernel elements] indices into a flattened H x W map, one row per max-pool window in
    C order. A slot in the padding (which never wins a max) points at the window's first real
    element instead: a duplicate leaves the max unchanged and keeps every row kernel-long."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    rows = (torch.arange(oh) * sh - ph).view(-1, 1, 1, 1) + torch.arange(kh).view(1, 1, -1, 1)
    cols = (torch.arange(ow) * sw - pw).view(1, -1, 1, 1) + torch.arange(kw).view(1, 1, 1, -1)
    rows, cols = rows.expand(oh, ow, kh, kw).reshape(oh * ow, -1), cols.expand(oh, ow, kh, kw).reshape(oh * ow, -1)
    real = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    index = rows * width + cols
    first = index.gather(1, real.long().argmax(1, keepdim=True))  # torch's padding < kernel/2: never empty
    return torch.where(real, index, first)


# -- randomness ---------------------------------------------------------------------------------

class Prg:
    """Deterministic cryptographic randomness from a 32-byte seed: SHAKE-256 of (seed, label).
    Two holders of a seed (the dealer and one party) derive the same values without sending them."""

    def __init__(self, seed: bytes):
        self.seed = seed

    def _bytes(self, label: str, n: int) -> np.ndarray:
        return np.frombuffer(hashlib.shake_256(self.seed + label.encode()).digest(max(n, 1)), dtype=np.uint8)[:n]

    def ring(self, label: str, shape) -> torch.Tensor:
        n = math.prod(shape)
        return torch.from_numpy(self._bytes(label, 8 * n).view(np.int64).copy()).view(*shape)

    def bits(self, label: str, planes: int, n: int) -> torch.Tensor:
        """`planes` random bit planes for n elements, packed: uint8 [planes, ceil(n/8)]."""
        nb = packed_size(n)
        return torch.from_numpy(self._bytes(label, planes * nb).copy()).view(planes, nb)


# -- bit planes ---------------------------------------------------------------------------------
# A bit tensor of n elements by w bits is held as w packed planes, uint8 [w, ceil(n/8)], element e
# at bit e % 8 of byte e // 8: XOR and AND work on 8 elements a byte, a carry level picks planes
# with a slice, and what goes on the wire is already packed (fewer bits really mean fewer bytes).

def to_planes(x: torch.Tensor, count: int) -> torch.Tensor:
    """Bits 0..count-1 of every int64 in x (flattened) as packed planes [count, ceil(n/8)]: per byte
    of the word, an 8x8 bit-matrix transpose of 8 elements at once (30x faster than unpack/pack)."""
    flat = x.reshape(-1).contiguous().numpy()
    if flat.size % 8:
        flat = np.concatenate([flat, np.zeros(8 - flat.size % 8, dtype=np.int64)])
    raw = flat.view(np.uint8).reshape(-1, 8, 8)  # [groups of 8 elements, element, byte]
    nbytes = (count + 7) // 8
    out = np.empty((nbytes * 8, raw.shape[0]), dtype=np.uint8)
    for b in range(nbytes):
        words = _transpose8(np.ascontiguousarray(raw[:, :, b]).view(np.uint64).reshape(-1))
        out[8 * b: 8 * b + 8] = words.view(np.uint8).reshape(-1, 8).T
    return torch.from_numpy(out[:count])


_T = [(np.uint64(s), np.uint64(m)) for s, m in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC),
                                                 (28, 0x00000000F0F0F0F0))]


def _transpose8(w: np.ndarray) -> np.ndarray:
    """Transpose each uint64 as an 8x8 bit matrix (byte i, bit j) -> (byte j, bit i) (Hacker's Delight 7-3)."""
    for shift, mask in _T:
        t = (w ^ (w >> shift)) & mask
        w = w ^ t ^ (t << shift)
    return w


def from_plane(plane: torch.Tensor, n: int) -> torch.Tensor:
    """One packed plane -> n bits as int64 0/1."""
    return torch.from_numpy(np.unpackbits(plane.numpy(), bitorder="little")[:n].astype(np.int64))


def packed_size(n: int) -> int:
    return (n + 7) // 8
