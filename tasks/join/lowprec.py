"""Low-precision first pass of the range join: bfloat16 operands and their error bound.

The two-pass join (docs/lowprec.md has the derivation and the measurements):
scores come from a GEMM of the rows rounded to bfloat16, accumulated in float32;
a pair decides its radius bin from that score only when the score is farther than
a rigorous bound `eps` from every threshold cos(pi r); every other pair is
re-scored in float64 from the rows as stored (float16/32/64), with the very
expression the float64 reference uses. So counts and MCCS sums are those of the
float32 path exactly, whatever the first pass rounds.

Why bfloat16 and not int8 with per-row scales: both have 8 significant bits, but
bfloat16 rounds each component relative to its own size while int8 rounds it
relative to the row's largest component, so an int8 row moves ~4x farther
(|a - a^| ~ 0.006 against ~0.0016 for unit rows at D = 128) and the band of
re-scored pairs is ~4x wider (measured: 47 % of isotropic pairs against 12 %).

The bound is computed from the measured rounding of the actual rows (|a - a^| per
row), not from the worst case per component, so it holds for any rounding mode
of the float -> bfloat16 conversion, including double rounding via float32.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["to_bf16", "RowStats", "row_stats", "bf16_eps", "BF16_MAX_ABS"]

_U32 = 2.0 ** -24
# Values this large could round to inf in bfloat16 (max ~3.39e38) or overflow the
# float32 accumulator; such rows are never quantised (the caller falls back to
# the float32 path).
BF16_MAX_ABS = 2.0 ** 60


def to_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 (round to nearest even), returned as float32 values.

    Each value is a float32 whose low 16 bits are zero, so a float32 GEMM of two
    such arrays forms every product exactly (8 x 8 significant bits < 24) and only
    its float32 additions round: the numerics of a bfloat16 dot product with float32
    accumulation (AVX512-BF16, AMX, tensor cores). Inputs must be finite with
    |x| <= BF16_MAX_ABS.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (u >> np.uint32(16)) & np.uint32(1)
    r = (u + (np.uint32(0x7FFF) + lsb)) & np.uint32(0xFFFF0000)
    return r.view(np.float32)


class RowStats:
    """Norm maxima of a set of rows x (as stored) and of its bfloat16 rounding x^."""

    __slots__ = ("norm", "norm_q", "resid")

    def __init__(self, norm: float, norm_q: float, resid: float):
        self.norm = norm      # max |x|
        self.norm_q = norm_q  # max |x^|
        self.resid = resid    # max |x - x^|


def _up(v: float) -> float:
    # float64 sums of squares and sqrt err by a few ulps; a relative margin of
    # 1e-12 covers them with room to spare, so the maxima are upper bounds.
    return float(v) * (1.0 + 1e-12)


def row_stats(x: np.ndarray, xq: np.ndarray) -> RowStats:
    """RowStats of rows x (float16/32/64, as stored) and their rounding xq (float32)."""
    if x.shape[0] == 0:
        return RowStats(0.0, 0.0, 0.0)
    x64 = np.asarray(x, dtype=np.float64)
    q64 = np.asarray(xq, dtype=np.float64)
    d = x64 - q64  # exact: both are float64 values within a factor 2^-7 of each other
    n = np.einsum("ij,ij->i", x64, x64)
    nq = np.einsum("ij,ij->i", q64, q64)
    nd = np.einsum("ij,ij->i", d, d)
    return RowStats(_up(math.sqrt(n.max())), _up(math.sqrt(nq.max())), _up(math.sqrt(nd.max())))


def bf16_eps(dim: int, a: RowStats, b: RowStats) -> float:
    """Bound on |s^ - <a, b>| for every pair of rows summarised by a and b.

    s^ = fl32(sum_k a^_k b^_k), products exact, float32 additions in any order:
      |s^ - <a^, b^>| <= gamma |a^| |b^|, gamma = (D + 2) 2^-24 counted twice
                         (the float32 path's margin), plus 2 D 2^-126 for
                         products or partial sums flushed to zero;
      |<a^, b^> - <a, b>| = |<a^ - a, b^> + <a, b^ - b>| <= |a - a^| |b^| + |a| |b - b^|
                         (Cauchy-Schwarz, with the measured row residuals).
    The maxima over the rows bound every pair; 1e-12 absorbs the float64 rounding
    of the thresholds and of the comparison, as in the float32 path.
    """
    acc = 2.0 * (dim + 2) * _U32 * a.norm_q * b.norm_q + 2.0 * dim * 2.0 ** -126
    cast = a.resid * b.norm_q + a.norm * b.resid
    return cast + acc + 1e-12
