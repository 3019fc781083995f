"""Range join and MCCS kernels: neighbour counts of anchors against a streamed point set.

The hot path of an audit is N(a, T, r) for ~1e3 anchors against ~1e7 points at
41 radii, i.e. ~1e10 inner products, each compared against 41 thresholds
(d(a, b) <= r  <=>  <a, b> >= cos(pi r) for unit vectors).

Why this design
---------------
* The inner products are a float32 GEMM (BLAS), the only way to reach ~200 GFLOP/s.
  At D = 128 they cost ~1.5-2 s per 1e9 scores on the 2-core reference machine.
* Counting them is the problem. The obvious bucketize + bincount (np.searchsorted /
  torch.bucketize, then a per-row bincount) costs ~20-30 s per 1e9 scores here,
  13-17x the GEMM: an O(log R) branchy search per score, then a second pass and
  temporaries the size of the score tile.
  So we count in one fused numba pass per GEMM tile instead: a quantised lookup
  table over the score range (L buckets, small enough to stay in L1) maps a
  score straight to its histogram bin when its bucket holds no threshold; only
  scores in the few buckets that touch a threshold take a short comparison walk.
  Per-row histograms are interleaved 4 ways so consecutive scores that land in
  the same bin do not serialise on a store->load dependency. A cumulative sum of
  the histogram gives the counts at every radius. Measured: ~1.5 ns per score
  on one core, so GEMM + counting take ~1.6x the GEMM alone
  (benchmarks/bench_join.py).
* Threads. Each worker thread does its own GEMM tiles with single-threaded BLAS
  and then counts them with a serial nogil numba kernel. Alternating between
  BLAS's thread pool and a numba prange pool was 2-5x slower on 2 cores: each
  pool's idle threads spin on the cores the other pool needs.
* Exactness. float32 GEMM rounding is bounded by eps ~ 2 (D + 2) 2^-24 |a| |b|.
  A score farther than eps from a threshold is on the same side of it as the exact
  product, so only scores within eps of a threshold are re-decided: their inner
  product is recomputed in float64 from the input rows and tested with the very
  expression the float64 reference uses (arccos(clip(dot)) / pi <= r). The fast
  path therefore returns exactly the reference counts (ties with a float64 dot
  exactly on a threshold, where summation order decides, aside).
* Low precision (kernel "lowprec"). The same drivers with a bfloat16 first pass:
  the GEMM multiplies the rows rounded to bfloat16 (exact products, float32
  accumulation) and eps is that format's rigorous bound (tasks/join/lowprec.py,
  docs/lowprec.md), ~4e-3 instead of ~1.5e-5; the re-decision of band pairs is
  unchanged, so counts and MCCS sums are bit-identical to "fast". Opt-in: its band
  holds 12-16 % of all pairs, which costs more than the GEMM could save.
* Self pairs are excluded by global row index, never by value (duplicates of an
  anchor elsewhere in the set are real neighbours).
* MCCS sums reuse the GEMM tiles as a filter: only scores above
  cos(pi theta) - eps can contribute, and those pairs (rare unless the data
  collapses) are recomputed in float64 so the sums match the reference to
  ~1e-15 relative rather than float32's ~1e-7.

Streaming protocol: `blocks` is an iterable of (offset, block) with block a (b, d)
float16/32/64 array whose global row indices start at `offset`. Partial results
are summed, so memory is O(a x tile), independent of the number of points.

This module is pure compute (numpy + numba); orchestration lives elsewhere.
"""
from __future__ import annotations

import math
import operator

import numpy as np
from numba import njit

from modeaudit.tasks.join import lowprec as lowprec_mod
from modeaudit.tasks.join.threads import blas_threads, compute_threads, run_in_threads, shared_items

__all__ = [
    "DEFAULT_RADII",
    "NUMPY_KERNELS",
    "radius_thresholds",
    "range_counts_reference",
    "range_counts",
    "count_block",
    "mccs_sums_reference",
    "mccs_sums",
    "mccs_from_sums",
]

# The kernels of this module (tasks/join/backend.py adds the torch ones).
NUMPY_KERNELS = ("fast", "lowprec", "reference")

DEFAULT_RADII = np.round(np.arange(0.10, 0.505, 0.01), 2)

# GEMM tile shape (anchor rows x point rows). On the 2-core reference machine
# (a=1001, D=128) every shape from 256x1024 to 1024x4096 ran within 3 % of the
# others; 128 x 8192 lost 5 %. The 4 MB score tile lives in L2/L3, which the
# counting pass reads far faster than the ~3 GB/s it needs.
_ANCHOR_TILE = 512
_ROW_TILE = 2048

# Lookup-table resolution: 8192 int16 entries = 16 KB, half of L1d. Buckets are
# 2.4e-4 wide, so with eps ~ 1.5e-5 (D=128) each threshold poisons ~1-2 buckets.
_LUT_SIZE = 8192
# The table covers [-1 - pad, 1 + pad]; float16 inputs are not exactly unit
# norm, so scores can stray past +-1. Anything outside takes the slow walk.
_LUT_PAD = 1.0 / 64
# Guard (in score units) so that the float32 rounding of the bucket index
# (< 3e-7 here) can never put a score in a bucket whose entry does not cover it.
_LUT_GUARD = 1e-6

_U32 = 2.0 ** -24


# ----------------------------------------------------------------------------
# validation helpers


def radius_thresholds(radii) -> np.ndarray:
    """Score thresholds cos(pi * r) (float64) for a radius grid.

    `radii` must be 1-d, finite, strictly increasing and inside the open interval
    (0, 1); otherwise ValueError. The thresholds come out strictly decreasing.
    """
    r = np.asarray(radii, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"radii must be a 1-d array, got shape {r.shape}")
    if r.size == 0:
        raise ValueError("radii must not be empty")
    if not np.all(np.isfinite(r)):
        raise ValueError("radii must be finite (found NaN or inf)")
    if np.any(r <= 0.0) or np.any(r >= 1.0):
        raise ValueError(f"radii must lie in the open interval (0, 1); got min {r.min()}, max {r.max()}")
    if r.size > 1 and np.any(np.diff(r) <= 0):
        raise ValueError("radii must be strictly increasing")
    c = np.cos(np.pi * r)
    if c.size > 1 and np.any(np.diff(c) >= 0):
        # Two radii closer than float64 can resolve after cos(pi r).
        raise ValueError("radii are too close together: their thresholds cos(pi r) coincide")
    return c


def _check_theta(theta) -> float:
    try:
        t = float(theta)
    except (TypeError, ValueError):
        raise ValueError(f"theta must be a number in (0, 1], got {theta!r}") from None
    if not math.isfinite(t) or not (0.0 < t <= 1.0):
        raise ValueError(f"theta must be a finite number in (0, 1], got {theta!r}")
    return t


def _check_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (rows x dim), got shape {x.shape}")
    if x.dtype.kind != "f":
        if x.dtype.kind in "iub":
            x = x.astype(np.float64)
        else:
            raise ValueError(f"{name} must hold floating point numbers, got dtype {x.dtype}")
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_pair(anchors, points, pname: str = "points"):
    a = _check_matrix(anchors, "anchors")
    p = _check_matrix(points, pname)
    if a.shape[1] != p.shape[1]:
        raise ValueError(f"anchors have width {a.shape[1]} but {pname} have width {p.shape[1]}")
    return a, p


def _check_ids(anchor_ids, n_anchors: int) -> np.ndarray:
    """Anchor global row ids as int64; -1 (matches no row) where there are none."""
    if anchor_ids is None:
        return np.full(n_anchors, -1, dtype=np.int64)
    ids = np.asarray(anchor_ids)
    if ids.ndim != 1 or ids.shape[0] != n_anchors:
        raise ValueError(f"anchor_ids must be 1-d with one id per anchor ({n_anchors}), got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"anchor_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("anchor_ids must be non-negative global row indices")
    return ids


def _iter_blocks(blocks):
    # A bare array is accepted as one block at offset 0, for convenience.
    if isinstance(blocks, np.ndarray):
        yield 0, blocks
        return
    for item in blocks:
        try:
            offset, block = item
            offset = operator.index(offset)
        except (TypeError, ValueError):
            raise ValueError("blocks must yield (offset, block) pairs with an integer offset") from None
        if offset < 0:
            raise ValueError(f"block offset must be >= 0, got {offset}")
        yield offset, block


def _exact_copy(x: np.ndarray) -> np.ndarray:
    """The inputs' values in a dtype numba reads losslessly (float16 -> float32)."""
    if x.dtype == np.float64 or x.dtype == np.float32:
        return np.ascontiguousarray(x)
    if x.dtype == np.float16:
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float64)


def _max_norm(x: np.ndarray) -> float:
    if x.shape[0] == 0:
        return 0.0
    return float(np.sqrt(np.max(np.einsum("ij,ij->i", x, x, dtype=np.float64))))


def _gemm_eps(dim: int, norm_a: float, norm_b: float) -> float:
    # |fl32(a32.b32) - a.b| <= (dim + 2) u |a| |b| (1 + O(dim u)) for any summation
    # order, FMA or not, including the float64 -> float32 cast of the inputs.
    # Factor 2 covers the O(dim u) term and leaves headroom; a tiny absolute floor
    # absorbs the float64 rounding of the threshold and of the comparison itself.
    return _round_eps(2.0 * (dim + 2) * _U32 * norm_a * norm_b + 1e-12)


def _round_eps(eps: float) -> float:
    # Rounded up to a power of 2^(1/8) (a larger eps is as exact, just a little
    # slower) so that blocks with slightly different norms share one lookup table.
    return float(2.0 ** (math.ceil(8.0 * math.log2(eps)) / 8.0))


# ----------------------------------------------------------------------------
# float64 references


def range_counts_reference(anchors, points, radii, *, anchor_ids=None, point_offset=0) -> np.ndarray:
    """Brute-force float64 neighbour counts, int64 (a, R).

    counts[i, r] = #{j : arccos(clip(<anchors[i], points[j]>, -1, 1)) / pi <= radii[r]}
    with both inputs cast to float64, excluding the pair where
    anchor_ids[i] == point_offset + j (self pairs are excluded by index, not by
    value). anchor_ids=None excludes nothing. Memory O(a * b): for tests and small sets.
    """
    radii = np.asarray(radii, dtype=np.float64)
    radius_thresholds(radii)
    a, p = _check_pair(anchors, points)
    ids = _check_ids(anchor_ids, a.shape[0])
    out = np.zeros((a.shape[0], radii.size), dtype=np.int64)
    if a.shape[0] == 0 or p.shape[0] == 0:
        return out
    dist = arccos_over_pi(a.astype(np.float64) @ p.astype(np.float64).T)
    local = ids - int(point_offset)
    rows = np.nonzero((local >= 0) & (local < p.shape[0]))[0]
    dist[rows, local[rows]] = np.inf
    for k, r in enumerate(radii):
        out[:, k] = np.count_nonzero(dist <= r, axis=1)
    return out


def _mccs_terms(dist: np.ndarray, theta: float) -> np.ndarray:
    return (np.exp(np.maximum(0.0, theta - dist)) - 1.0) / (np.exp(theta) - 1.0)


def mccs_sums_reference(anchors, points, theta, *, anchor_ids=None, point_offset=0) -> np.ndarray:
    """Brute-force float64 MCCS sums, float64 (a,).

    sums[i] = sum_j s(anchors[i], points[j]) with
    s(a, b) = (exp(max(0, theta - d(a, b))) - 1) / (exp(theta) - 1),
    d = arccos(clip(<a, b>, -1, 1)) / pi, self pairs excluded by index as in
    range_counts_reference. This is the sum, not the mean: see mccs_from_sums.
    """
    theta = _check_theta(theta)
    a, p = _check_pair(anchors, points)
    ids = _check_ids(anchor_ids, a.shape[0])
    out = np.zeros(a.shape[0], dtype=np.float64)
    if a.shape[0] == 0 or p.shape[0] == 0:
        return out
    dist = arccos_over_pi(a.astype(np.float64) @ p.astype(np.float64).T)
    local = ids - int(point_offset)
    rows = np.nonzero((local >= 0) & (local < p.shape[0]))[0]
    dist[rows, local[rows]] = np.inf
    return _mccs_terms(dist, theta).sum(axis=1)


def mccs_from_sums(sums, n) -> np.ndarray:
    """MCCS = 1 / (1 - ln(sums / n)), and 0 where sums == 0.

    `n` is the number of points the sums ran over (scalar or one per anchor); if
    an anchor belongs to C and was excluded, the caller passes n - 1 for it.
    """
    s = np.asarray(sums, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), s.shape)
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError("sums must be finite and non-negative")
    if np.any(n <= 0):
        raise ValueError("n must be positive")
    if np.any(s > n * (1.0 + 1e-12)):
        # every term s(a, b) is at most 1, so a larger sum means a wrong n
        raise ValueError("sums exceed n: each term is at most 1, so n must count the points summed over")
    out = np.zeros(s.shape, dtype=np.float64)
    pos = s > 0
    out[pos] = 1.0 / (1.0 - np.log(s[pos] / n[pos]))
    return out


# ----------------------------------------------------------------------------
# numba kernels: serial and nogil, run from the drivers' worker threads (see
# "Threads" in the module docstring).


@njit(cache=True, nogil=True)
def _acos_over_pi_flat(x, out):
    for i in range(x.size):
        v = x[i]
        if v > 1.0:
            v = 1.0
        elif v < -1.0:
            v = -1.0
        out[i] = math.acos(v) / math.pi


def arccos_over_pi(dots) -> np.ndarray:
    """arccos(clip(dots, -1, 1)) / pi in float64 with the scalar libm acos.

    Every angular distance this package computes from a float64 inner product goes
    through libm's acos (here, in the join kernels' `_exact_dist` and in the tie
    rules of `stats.modes`): numpy's vectorised arccos differs from it in the last
    bit for ~10% of inputs, by CPU, so a reference or a decision made with it would
    disagree with the kernels on exact ties.
    """
    d = np.asarray(dots, dtype=np.float64)
    flat = np.ascontiguousarray(d.reshape(-1))
    out = np.empty_like(flat)
    _acos_over_pi_flat(flat, out)
    return out.reshape(d.shape)


@njit(cache=True, nogil=True)
def _exact_dist(A, i, B, j):
    """d(A[i], B[j]) in float64, by the same expression as the reference."""
    # Four accumulators: without fastmath LLVM keeps one dependency chain
    # (FMA latency per element); a fixed order also keeps the result deterministic.
    n = A.shape[1]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= n:
        s0 += np.float64(A[i, k]) * np.float64(B[j, k])
        s1 += np.float64(A[i, k + 1]) * np.float64(B[j, k + 1])
        s2 += np.float64(A[i, k + 2]) * np.float64(B[j, k + 2])
        s3 += np.float64(A[i, k + 3]) * np.float64(B[j, k + 3])
        k += 4
    while k < n:
        s0 += np.float64(A[i, k]) * np.float64(B[j, k])
        k += 1
    dot = (s0 + s1) + (s2 + s3)
    if dot > 1.0:
        dot = 1.0
    elif dot < -1.0:
        dot = -1.0
    return math.acos(dot) / math.pi


@njit(cache=True, nogil=True)
def _walk(x, q, thr, radii, eps, A, i, B, j):
    """Bin of score x (float64 of the float32 score) of pair (A[i], B[j]), walking the
    thresholds from q, which the caller knows the pair fails. The bin is the number
    of radii the pair fails; thresholds within eps of x are decided in float64."""
    R = thr.shape[0]
    dist = -1.0
    while q < R:
        c = thr[q]
        if x >= c + eps:
            break
        if x >= c - eps:
            if dist < 0.0:
                dist = _exact_dist(A, i, B, j)
            if dist <= radii[q]:
                break
        q += 1
    return q


@njit(cache=True, nogil=True, inline="always")
def _lookup(s, lut, lo, scale, top):
    # float32 arithmetic on purpose: its rounding (< 1e-6 in score units) is
    # covered by the guard the table was built with. Scores outside the table's
    # range clamp into the edge buckets, which always take the walk.
    t = (s - lo) * scale
    t = min(max(t, np.float32(0.0)), top)
    return np.int64(lut[np.uint32(t)])


@njit(cache=True, nogil=True)
def _full_bin(s, lut, lo, scale, thr, radii, eps, A, i, B, j):
    """The bin _count_rows assigns to score s of pair (A[i], B[j]), by the same steps."""
    e = _lookup(s, lut, lo, scale, np.float32(lut.shape[0] - 1))
    if e >= 0:
        return e
    return _walk(np.float64(s), -e - 1, thr, radii, eps, A, i, B, j)


@njit(cache=True, nogil=True)
def _count_rows(sims, hist, row0, col_local, col_global, ids,
                lut, lo, scale, thr, radii, eps, A, B):
    """Add the bins of a score tile into hist (a, 4, R+1).

    sims[i, j] is the float32 score of anchor row0 + i and block row col_local + j
    (global row col_global + j).
    """
    tb = sims.shape[1]
    R = thr.shape[0]
    top = np.float32(lut.shape[0] - 1)
    pend_j = np.empty(tb, dtype=np.int64)
    pend_q = np.empty(tb, dtype=np.int64)
    for i in range(sims.shape[0]):
        ai = row0 + i
        srow = sims[i]
        h = hist[ai]
        npend = 0
        for j in range(tb):
            s = srow[j]
            e = _lookup(s, lut, lo, scale, top)
            if e < 0:
                # The float64 walk is cheap; a threshold within eps defers the
                # pair. Calling the exact dot product from this loop, however
                # rarely, made LLVM generate a 6x slower loop.
                x = np.float64(s)
                q = -e - 1
                while q < R:
                    c = thr[q]
                    if x >= c + eps:
                        break
                    if x >= c - eps:
                        pend_j[npend] = j
                        pend_q[npend] = q
                        npend += 1
                        q = -1
                        break
                    q += 1
                e = q
            if e >= 0:
                # 4 interleaved sub-histograms: runs of equal bins would otherwise
                # serialise on the store->load of one counter.
                h[j & 3, e] += 1
        for p in range(npend):
            j = pend_j[p]
            h[0, _walk(np.float64(srow[j]), pend_q[p], thr, radii, eps, A, ai, B, col_local + j)] += 1
        # Self pair: recompute the bin it got (same steps, same answer) and remove it.
        sc = ids[ai] - col_global
        if sc >= 0 and sc < tb:
            h[0, _full_bin(srow[sc], lut, lo, scale, thr, radii, eps, A, ai, B, col_local + sc)] -= 1


@njit(cache=True, nogil=True)
def _mccs_rows(sims, sums, row0, col_local, col_global, ids,
               cut, theta, denom, A, B):
    """Add s(a, b) over the pairs of a score tile into sums (a,).

    Only scores above `cut` (float32, at most cos(pi theta) - eps) can be within
    theta; those pairs get their distance in float64.
    """
    tb = sims.shape[1]
    cand = np.empty(tb, dtype=np.int64)
    for i in range(sims.shape[0]):
        ai = row0 + i
        srow = sims[i]
        n = 0
        for j0 in range(0, tb, 128):
            j1 = min(j0 + 128, tb)
            # Branch-free count first (LLVM vectorises it): most chunks hold no
            # candidate at all, and the branchy gather below is 4x slower.
            hits = 0
            for j in range(j0, j1):
                hits += srow[j] > cut
            if hits == 0:
                continue
            for j in range(j0, j1):
                if srow[j] > cut:
                    cand[n] = j
                    n += 1
        if n == 0:
            continue
        sc = ids[ai] - col_global
        acc = 0.0
        for p in range(n):
            j = cand[p]
            if j != sc:
                d = _exact_dist(A, ai, B, col_local + j)
                if d < theta:
                    acc += math.expm1(theta - d) / denom
        sums[ai] += acc


# ----------------------------------------------------------------------------
# fast path drivers


def _n_workers() -> int:
    # Our tile threads each call BLAS: that pays only where BLAS itself is single-threaded
    # (Dask workers, whose BLAS is pinned to one thread at start). Elsewhere BLAS's own
    # threads run the GEMM and one thread counts: this library never changes the BLAS
    # thread count of a process (other threads' results would change with it).
    return max(1, compute_threads() // blas_threads())


class _Lut:
    """Bucket table for one threshold set and one eps.

    An entry >= 0 is the bin of every score in the bucket, for sure. An entry < 0
    is -(q + 1) where the first q thresholds are surely failed; the walk goes on from there.
    """

    def __init__(self, thr: np.ndarray, eps: float, size: int = _LUT_SIZE):
        R = thr.size
        if R + 1 > np.iinfo(np.int16).max:
            raise ValueError(f"at most {np.iinfo(np.int16).max - 1} radii are supported, got {R}")
        pad = max(_LUT_PAD, 4.0 * eps)
        self.lo = np.float32(-1.0 - pad)
        self.scale = np.float32(size / (2.0 + 2.0 * pad))
        edges = float(self.lo) + np.arange(size + 1, dtype=np.float64) / float(self.scale)
        lower = edges[:-1] - _LUT_GUARD
        upper = edges[1:] + _LUT_GUARD
        # thresholds every score of the bucket surely fails: thr - eps > upper
        q_sure = R - np.searchsorted((thr - eps)[::-1], upper, side="right")
        # thresholds some score of the bucket may fail: thr + eps > lower
        q_maybe = R - np.searchsorted((thr + eps)[::-1], lower, side="right")
        lut = np.where(q_sure == q_maybe, q_sure, -q_sure - 1)
        lut[0] = lut[-1] = -1  # clamped out-of-range scores land here: walk from 0
        self.table = lut.astype(np.int16)


class _FastJoin:
    """One streamed join: the anchors in both precisions, the ids, the thread plan.

    With lowprec, the GEMM's operands are the rows rounded to bfloat16 (see
    tasks/join/lowprec.py) and eps is that format's bound: more pairs fall in the
    band and are re-decided in float64, the results are the same.
    """

    def __init__(self, anchors: np.ndarray, ids: np.ndarray, lowprec: bool = False):
        self.a_exact = _exact_copy(anchors)
        self.norm_a = _max_norm(self.a_exact)
        self.a32 = np.ascontiguousarray(anchors, dtype=np.float32)
        self.a_lp = None
        if lowprec and (self.a32.size == 0 or float(np.abs(self.a32).max()) <= lowprec_mod.BF16_MAX_ABS):
            aq = lowprec_mod.to_bf16(self.a32)
            self.a_lp = (aq, lowprec_mod.row_stats(self.a_exact, aq))
        self.ids = ids
        self.workers = _n_workers()
        self._luts: dict = {}

    def lut(self, thr, eps) -> _Lut:
        key = (thr.tobytes(), eps)
        if key not in self._luts:
            self._luts[key] = _Lut(thr, eps)
        return self._luts[key]

    def _run(self, b32, acc, kernel, a32=None):
        """Tile anchors x block and call kernel(sims, r0, c0, acc_of_worker) per tile.

        Each worker thread owns an accumulator copy and does its own GEMMs (several
        threads only where BLAS is single-threaded, see _n_workers).
        Tiles are handed out one at a time: a core busy with something else just
        takes fewer of them.
        """
        a32 = self.a32 if a32 is None else a32
        na, nb = a32.shape[0], b32.shape[0]
        tiles = [(r0, c0) for c0 in range(0, nb, _ROW_TILE) for r0 in range(0, na, _ANCHOR_TILE)]
        n = min(self.workers, len(tiles))
        todo = shared_items(tiles)

        def work(acc_w):
            buf = np.empty((min(na, _ANCHOR_TILE), min(nb, _ROW_TILE)), dtype=np.float32)
            for r0, c0 in todo():
                at = a32[r0:r0 + _ANCHOR_TILE]
                bt = b32[c0:c0 + _ROW_TILE]
                sims = buf[:at.shape[0], :bt.shape[0]]
                np.matmul(at, bt.T, out=sims)
                kernel(sims, r0, c0, acc_w)

        if n <= 1:
            work(acc)
            return
        parts = [np.zeros_like(acc) for _ in range(n)]
        run_in_threads(work, parts)
        for p in parts:
            acc += p

    def _block(self, block):
        """The anchors and the block for the GEMM (float32 arrays), the block for the
        exact dot products, and eps."""
        b32 = np.ascontiguousarray(block, dtype=np.float32)
        b_exact = b32 if block.dtype in (np.float16, np.float32) else _exact_copy(block)
        if self.a_lp is not None and float(np.abs(b32).max()) <= lowprec_mod.BF16_MAX_ABS:
            aq, a_stats = self.a_lp
            bq = lowprec_mod.to_bf16(b32)
            eps = lowprec_mod.bf16_eps(block.shape[1], a_stats, lowprec_mod.row_stats(b_exact, bq))
            return aq, bq, b_exact, _round_eps(eps)
        eps = _gemm_eps(block.shape[1], self.norm_a, _max_norm(b_exact))
        return self.a32, b32, b_exact, eps

    def count_into(self, hist, block, offset, thr, radii):
        if block.shape[0] == 0 or hist.shape[0] == 0:
            return
        a32, b32, b_exact, eps = self._block(block)
        lut = self.lut(thr, eps)

        def kernel(sims, r0, c0, h):
            _count_rows(sims, h, r0, c0, offset + c0, self.ids,
                        lut.table, lut.lo, lut.scale, thr, radii, eps, self.a_exact, b_exact)

        self._run(b32, hist, kernel, a32)

    def mccs_into(self, sums, block, offset, theta):
        if block.shape[0] == 0 or sums.shape[0] == 0:
            return
        a32, b32, b_exact, eps = self._block(block)
        # Round down so the float32 test keeps every score the float64 test would.
        cut = np.nextafter(np.float32(math.cos(math.pi * theta) - eps), np.float32(-np.inf))
        denom = math.expm1(theta)

        # Float sums depend on the order of addition: each column tile adds into its
        # own slot and the slots are summed in tile order, so the result does not
        # depend on how many threads ran or which thread took which tile.
        slots = np.zeros(((b32.shape[0] + _ROW_TILE - 1) // _ROW_TILE, sums.shape[0]))

        def kernel(sims, r0, c0, _unused):
            _mccs_rows(sims, slots[c0 // _ROW_TILE], r0, c0, offset + c0, self.ids,
                       cut, theta, denom, self.a_exact, b_exact)

        self._run(b32, np.zeros(1), kernel, a32)
        for slot in slots:
            sums += slot


def _hist_to_counts(hist: np.ndarray) -> np.ndarray:
    R = hist.shape[2] - 1
    return np.cumsum(hist.sum(axis=1), axis=1)[:, :R].astype(np.int64, copy=False)


def count_block(anchors32, block32, radii, *, anchor_ids=None, offset=0) -> np.ndarray:
    """Fast-path neighbour counts of one block, int64 (a, R); equal to range_counts_reference.

    The GEMM runs in float32; near-threshold scores are re-decided in float64 from
    the arrays as given (pass float64 arrays to be exact w.r.t. float64 inputs).
    `offset` is the global row index of block32[0], used for self-exclusion.
    """
    radii = np.asarray(radii, dtype=np.float64)
    thr = radius_thresholds(radii)
    a, b = _check_pair(anchors32, block32, "block")
    join = _FastJoin(a, _check_ids(anchor_ids, a.shape[0]))
    hist = np.zeros((a.shape[0], 4, radii.size + 1), dtype=np.int64)
    join.count_into(hist, b, int(offset), thr, radii)
    return _hist_to_counts(hist)


def range_counts(anchors, blocks, radii, *, anchor_ids=None, kernel: str = "fast") -> np.ndarray:
    """Streamed neighbour counts N(anchor, X, r) for every anchor and radius, int64 (a, R).

    `blocks` yields (offset, block) pairs (a bare 2-d array means one block at
    offset 0); counts of all blocks are summed. anchor_ids[i] is the global row
    index of anchor i inside X (that single pair is not counted), None if the
    anchors are not part of X. kernel="fast" (float32 GEMM + exact correction),
    "lowprec" (bfloat16 GEMM + exact correction, see tasks/join/lowprec.py) or
    "reference" (float64 brute force per block); all give identical counts.
    """
    radii = np.asarray(radii, dtype=np.float64)
    thr = radius_thresholds(radii)
    a = _check_matrix(anchors, "anchors")
    if kernel not in NUMPY_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(NUMPY_KERNELS)}, got {kernel!r}")
    ids = _check_ids(anchor_ids, a.shape[0])
    if kernel == "reference":
        out = np.zeros((a.shape[0], radii.size), dtype=np.int64)
        for offset, block in _iter_blocks(blocks):
            _, b = _check_pair(a, block, "block")
            out += range_counts_reference(a, b, radii, anchor_ids=anchor_ids, point_offset=offset)
        return out
    join = _FastJoin(a, ids, lowprec=kernel == "lowprec")
    hist = np.zeros((a.shape[0], 4, radii.size + 1), dtype=np.int64)
    for offset, block in _iter_blocks(blocks):
        _, b = _check_pair(a, block, "block")
        join.count_into(hist, b, offset, thr, radii)
    return _hist_to_counts(hist)


def mccs_sums(anchors, blocks, theta, *, anchor_ids=None, kernel: str = "fast") -> np.ndarray:
    """Streamed MCCS sums (not means) per anchor, float64 (a,); see mccs_sums_reference.

    Same block protocol and self-exclusion as range_counts. The fast path agrees
    with the reference to ~1e-15 relative (only the summation order differs);
    "lowprec" returns the fast path's sums bit for bit (the same float64 terms,
    added in the same order: its wider filter only adds pairs beyond theta).
    """
    theta = _check_theta(theta)
    a = _check_matrix(anchors, "anchors")
    if kernel not in NUMPY_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(NUMPY_KERNELS)}, got {kernel!r}")
    ids = _check_ids(anchor_ids, a.shape[0])
    sums = np.zeros(a.shape[0], dtype=np.float64)
    join = _FastJoin(a, ids, lowprec=kernel == "lowprec") if kernel != "reference" else None
    for offset, block in _iter_blocks(blocks):
        _, b = _check_pair(a, block, "block")
        if join is None:
            sums += mccs_sums_reference(a, b, theta, anchor_ids=anchor_ids, point_offset=offset)
        else:
            join.mccs_into(sums, b, offset, theta)
    return sums
