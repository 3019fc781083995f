"""Range join and MCCS kernels in torch: the GPU path (and its CPU twin, for tests).

Same public semantics as `modeaudit.tasks.join.kernels.range_counts` / `modeaudit.tasks.join.kernels.mccs_sums`: the
same block protocol (an iterable of (offset, block) pairs, or one bare 2-d array
at offset 0), self pairs excluded by global row index, counts exactly equal to
`join.range_counts_reference` and MCCS sums equal to `join.mccs_sums_reference`
to float64 rounding, bit-for-bit reproducible for any tiling or block split. It runs on any torch device;
`device="cuda"` is the point, `device="cpu"` exists so the logic is tested on
machines without a GPU (use the numba kernels of tasks/join/kernels.py for CPU work:
they are several times faster there).

This module imports torch at the top: it is only imported once the torch backend
has been chosen (tasks/join/backend.py is the one place that chooses).

Why this design
---------------
* Data movement. The anchors (~1e3 rows) go to the device once per call; each
  block goes once (from page-locked memory with a non-blocking copy on CUDA, the
  next block being read and pinned by a helper thread while the device works on
  the current one). Everything else happens on the device and only the (a, R)
  counts or (a,) sums come back. Work runs in tiles of at most `anchor_tile` x
  `tile` scores (default 1024 x 65536 = 64 Mi scores: 256 MiB of float32 scores
  plus ~3 x that in temporaries), so device memory is bounded independently of
  the block size.
* GEMM precision. `half=True` multiplies float16 copies on the tensor cores with
  float32 accumulation and output, `torch.mm(a16, b16.T, out_dtype=torch.float32)`
  (torch >= 2.8 on CUDA). Where that overload is missing (torch's CPU build,
  older CUDA builds) the fallback is `(a16 @ b16.T).float()`: a float16 *output*,
  whose rounding (2^-11 relative) widens the band of scores that must be
  re-decided (see eps below) -- correct, just more float64 work. `half=False` is
  a float32 GEMM. `half=None` (the default) means: on CUDA, float16 for every
  block whose values (and the anchors') are float16 numbers -- the run store keeps
  embeddings as float16, so there the cast loses nothing and the band stays
  narrow (~3e-5) -- and float32 otherwise; on the CPU always float32. Casting
  float32 data to float16 would widen the band to ~1.3e-3 at D = 128, which on
  the default radius grid is several percent of all scores to re-evaluate in
  float64: far more than the tensor cores save on a GEMM that is not the
  bottleneck anyway (the counting passes over the score tile are).
* Exactness. Every GEMM score s is within eps of the exact inner product x of
  the rows *as given* (never of their float16 casts: the contract is equality
  with the float64 reference computed from the inputs). eps is derived in
  `_eps` from the row norms |a|, |b| (maxima over the anchors / the block):
    - input rounding: a row rounded to float16 moves by at most
      da = 2^-11 |a| + 2^-25 sqrt(D) (relative rounding of normal numbers plus
      half the float16 subnormal spacing), zero if the row already is float16;
      by Cauchy-Schwarz |<a^, b^> - <a, b>| <= da |b^| + |a| db;
      with float32 inputs the cast is folded into the accumulation term below,
      except under TF32 / bf16 "fast float32" matmul modes, which round the
      inputs to 2^-11 / 2^-8 relative and are accounted for the same way;
    - accumulation: float32 sums of D products err by at most
      (D + 2) 2^-24 |a^| |b^|; counted 2x for IEEE float32 GEMMs (as in
      tasks/join/kernels.py) and 4x for tensor-core GEMMs, which may truncate instead
      of rounding when they align the addends of a block FMA;
    - output rounding (float16 fallback only): 2^-11 |s| + 2^-25, and more if
      cuBLAS may reduce split-K partial sums in float16;
    - plus 1e-12 for the float64 reference's own rounding and for the
      arccos / cos round trip between a distance and a threshold.
  For unit vectors at D = 128: ~1.6e-5 (float32 GEMM), ~3.1e-5 (float16 GEMM
  of float16 data), ~1.3e-3 (float16 GEMM of float32/64 data). A score farther
  than eps from every threshold is on the same side of each threshold as the
  exact product, so only scores within eps of some threshold are re-decided:
  their inner product is recomputed in float64 on the device from the rows as
  given and tested with the reference's own expression,
  arccos(clip(dot, -1, 1)) / pi <= r. Ties (a float64 dot exactly on a
  threshold, where the summation order decides) aside, the counts therefore
  equal the reference's exactly.
* Counting. thresholds c_r = cos(pi r), ascending. For a score tile,
  lo = searchsorted(c - eps, s) and hi = searchsorted(c + eps, s) (thresholds
  rounded outward to float32). Where lo == hi no threshold lies within eps of
  s, and lo is the number of thresholds the pair passes; where lo != hi the
  score is in the band and goes to the exact path. A per-row histogram over
  "number of thresholds passed" (scatter_add_ into (a, R+1); band scores are
  sent to bin 0, which counts nothing) plus the exact band pairs
  (index_put_ with accumulate) and a reverse cumulative sum give the counts.
  Integer atomics are deterministic, so nothing here depends on scheduling.
* Self pairs are excluded by index, not by value: their score is set to -inf
  before binning, so they pass nothing, are never in the band, and are never an
  MCCS candidate (duplicates of an anchor elsewhere in the set still count).
* MCCS sums. Only scores >= cos(pi theta) - eps can be within theta; those pairs
  (rare unless the data collapse) are all recomputed in float64 and contribute
  s = expm1(theta - d) / expm1(theta) for d < theta. Float addition is not
  associative and float64 atomics (index_add_ on CUDA) are not deterministic,
  so the terms are summed *exactly*: each term (in [0, 1]) is split into five
  32-bit limbs of a 160-bit fixed-point number (1 integer limb, 4 fraction
  limbs: resolution 2^-128, which holds every term >= 2^-76 without loss --
  a nonzero term is >= ~2^-54 unless theta is absurdly small, and a smaller one
  would lose only its bits below 2^-128), the limbs are added with int64
  index_add_ (associative, so any order or tiling gives the same bits; carries
  are normalised after each chunk of <= 2^22 pairs, so the int64 limbs never
  overflow), and each anchor's total is rounded to float64 once, at the end,
  exactly (Python int division). The result is the correctly rounded exact sum
  of the float64 terms: bit-identical for any tiling, block split or thread
  count, and within ~1e-16 relative of the reference's pairwise sum. (Across
  devices only the terms themselves can differ, by an ulp: CUDA and the CPU
  evaluate arccos / expm1 with different math libraries.)
* The float64 dot products of re-decided pairs are a fixed pairwise tree over
  the (zero-padded to 2^k) components, built from elementwise ops only, so a
  pair's dot product has the same bits whichever tile, chunk or device computed
  it (a torch.sum reduction picks its strategy from the tensor's shape).
  Elementwise float64 ops are IEEE correctly rounded on both devices.
"""
from __future__ import annotations

import math
import operator
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from modeaudit.tasks.join import kernels as join

__all__ = ["range_counts_torch", "mccs_sums_torch", "DEFAULT_TILE", "DEFAULT_TILE_ELEMENTS"]

DEFAULT_TILE = 65536             # block rows per score tile
DEFAULT_TILE_ELEMENTS = 1 << 26  # anchor rows x block rows per score tile (256 MiB float32)

_U16 = 2.0 ** -11   # float16 unit roundoff
_ETA16 = 2.0 ** -25  # half the float16 subnormal spacing
_U32 = 2.0 ** -24
_F16_MAX = 65504.0
_EXACT_CHUNK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 22}  # pairs x padded width per float64 chunk
_MAX_CHUNK_PAIRS = 1 << 22       # keeps int64 limb sums far from overflow (< 2^31 per chunk)
_LIMB_BITS = 32
_N_LIMBS = 5                     # 1 integer limb + 4 fraction limbs of 32 bits
_STAT_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------
# device capabilities


def _resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU "
                               "(torch.cuda.is_available() is False); use device='cpu' or the numba kernels")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


_mm_out_dtype_cache: dict = {}
_cache_lock = threading.Lock()


def _mm_out_dtype_supported(dev: torch.device) -> bool:
    """Whether torch.mm(float16, float16, out_dtype=float32) runs on this device."""
    key = (dev.type, dev.index)
    with _cache_lock:
        if key in _mm_out_dtype_cache:
            return _mm_out_dtype_cache[key]
    try:
        x = torch.ones((2, 8), dtype=torch.float16, device=dev)
        r = torch.mm(x, x.T, out_dtype=torch.float32)
        ok = r.dtype == torch.float32 and bool((r == 8).all())
    except (NotImplementedError, RuntimeError, TypeError):
        ok = False
    with _cache_lock:
        _mm_out_dtype_cache[key] = ok
    return ok


def _mm_f16_f32(a16: torch.Tensor, b16: torch.Tensor) -> torch.Tensor:
    """a16 @ b16.T with float32 accumulation and output (tensor cores on CUDA)."""
    return torch.mm(a16, b16.T, out_dtype=torch.float32)


def _flag(obj, name, default):
    try:
        return getattr(obj, name)
    except Exception:  # noqa: BLE001 - a backend flag that cannot be read: assume the worst
        return default


def _fp32_input_unit(dev: torch.device) -> float:
    """Relative rounding a float32 GEMM may apply to its inputs on this device:
    0 for IEEE float32, 2^-11 under TF32, 2^-8 where bfloat16 may be used."""
    prec = torch.get_float32_matmul_precision()
    if dev.type == "cuda":
        new = str(_flag(torch.backends.cuda.matmul, "fp32_precision", "none"))
        if new == "bf16":
            return 2.0 ** -8
        if prec == "medium":
            return 2.0 ** -8
        if new == "tf32" or prec == "high" or _flag(torch.backends.cuda.matmul, "allow_tf32", True):
            return 2.0 ** -11
        return 0.0
    mk = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    new = str(_flag(mk, "fp32_precision", "none")) if mk is not None else "none"
    if prec == "highest" and new in ("none", "ieee"):
        return 0.0
    return 2.0 ** -8  # oneDNN may use bf16 (or bf16x3, TF32): assume the coarsest


def _half_fallback_extra_unit(dev: torch.device) -> float | None:
    """Extra relative error of the float16-output fallback GEMM beyond its final
    rounding; None where float16 accumulation is allowed (then half is refused)."""
    if dev.type != "cuda":
        return 0.0
    if _flag(torch.backends.cuda.matmul, "allow_fp16_accumulation", False):
        return None
    if _flag(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", True):
        # split-K partial sums may be rounded to float16 and added in float16;
        # allow for up to 8 such partial roundings
        return 16.0 * _U16
    return 0.0


# ----------------------------------------------------------------------------
# the error bound


def _eps(dim: int, norm_a: float, norm_b: float, *, mode: str, a_exact16: bool = True,
         b_exact16: bool = True, in_unit: float = 0.0, out_extra: float = 0.0) -> float:
    """Bound on |GEMM score - <a, b>| for rows of norm <= norm_a, norm_b (see module doc).

    mode "fp32": float32 GEMM (inputs rounded to float32 and, when in_unit > 0,
    to a coarser TF32/bf16 format inside the GEMM). mode "fp16": float16 inputs,
    float32 accumulation and output. mode "fp16-out16": float16 output as well.
    """
    sd = math.sqrt(dim)
    if mode == "fp32":
        eps = 2.0 * (dim + 2) * _U32 * norm_a * norm_b
        if in_unit:
            da, db = in_unit * norm_a, in_unit * norm_b
            cast = da * (norm_b + db) + norm_a * db
            eps = 1.25 * cast + 2.0 * eps * (1.0 + in_unit) ** 2
        return eps + 1e-12
    da = 0.0 if a_exact16 else _U16 * norm_a + _ETA16 * sd
    db = 0.0 if b_exact16 else _U16 * norm_b + _ETA16 * sd
    na, nb = norm_a + da, norm_b + db
    cast = da * nb + norm_a * db
    acc = 4.0 * (dim + 2) * _U32 * na * nb
    eps = 1.25 * cast + acc
    if mode == "fp16-out16":
        eps += (_U16 + out_extra) * (na * nb + acc) * 1.01 + _ETA16
    elif mode != "fp16":
        raise ValueError(f"unknown GEMM mode {mode!r}")
    return eps + 1e-12


def _band_thresholds(thr_asc: np.ndarray, eps: float, dev: torch.device):
    """float32 thresholds c - eps rounded down and c + eps rounded up (ascending)."""
    lo = np.nextafter((thr_asc - eps).astype(np.float32), np.float32(-np.inf))
    hi = np.nextafter((thr_asc + eps).astype(np.float32), np.float32(np.inf))
    return (torch.from_numpy(np.ascontiguousarray(lo)).to(dev),
            torch.from_numpy(np.ascontiguousarray(hi)).to(dev))


# ----------------------------------------------------------------------------
# input handling


def _anchor_array(anchors) -> np.ndarray:
    if isinstance(anchors, torch.Tensor):
        anchors = anchors.detach().cpu().numpy()
    a = join._check_matrix(anchors, "anchors")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def _iter_blocks(blocks):
    if isinstance(blocks, torch.Tensor):
        yield 0, blocks
        return
    yield from join._iter_blocks(blocks)


def _host_block(block, width: int):
    """Validate a block's shape and dtype (values are checked on the device) and
    return it as a CPU or device torch tensor of a floating dtype."""
    if isinstance(block, torch.Tensor):
        t = block.detach()
        if t.ndim != 2:
            raise ValueError(f"block must be a 2-d array (rows x dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            if t.dtype.is_complex:
                raise ValueError(f"block must hold floating point numbers, got dtype {t.dtype}")
            t = t.to(torch.float64)
        elif t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.to(torch.float64)  # bfloat16 and friends: exact in float64
    else:
        b = np.asarray(block)
        if b.ndim != 2:
            raise ValueError(f"block must be a 2-d array (rows x dim), got shape {b.shape}")
        if b.dtype.kind != "f":
            if b.dtype.kind in "iub":
                b = b.astype(np.float64)
            else:
                raise ValueError(f"block must hold floating point numbers, got dtype {b.dtype}")
        elif b.dtype not in (np.float16, np.float32, np.float64):
            b = b.astype(np.float64)
        if not b.dtype.isnative:
            b = b.astype(b.dtype.newbyteorder("="))
        t = torch.from_numpy(np.ascontiguousarray(b))
    if t.shape[1] != width:
        raise ValueError(f"anchors have width {width} but block have width {t.shape[1]}")
    return t


def _prefetched(items, prepare, enabled: bool):
    """Yield prepare(item) for every item; with enabled, the next item is fetched
    and prepared on a helper thread while the caller works on the current one."""
    if not enabled:
        for item in items:
            yield prepare(item)
        return
    it = iter(items)
    sentinel = object()

    def fetch():
        item = next(it, sentinel)
        return sentinel if item is sentinel else prepare(item)

    with ThreadPoolExecutor(1, thread_name_prefix="join-torch-prefetch") as ex:
        fut = ex.submit(fetch)
        while True:
            cur = fut.result()
            if cur is sentinel:
                return
            fut = ex.submit(fetch)
            yield cur


def _check_tile(tile, name):
    try:
        t = operator.index(tile)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {tile!r}") from None
    if t <= 0:
        raise ValueError(f"{name} must be a positive integer, got {tile!r}")
    return t


# ----------------------------------------------------------------------------
# float64 re-evaluation


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tree_dot(x: torch.Tensor, y: torch.Tensor, width: int) -> torch.Tensor:
    """Row-wise float64 dot products by a fixed pairwise tree (width = 2^k >= D)."""
    p = x * y
    if p.shape[1] != width:
        p = torch.nn.functional.pad(p, (0, width - p.shape[1]))
    w = width
    while w > 1:
        w //= 2
        p = p[:, :w] + p[:, w:2 * w]
    return p[:, 0]


def _dist(dot: torch.Tensor) -> torch.Tensor:
    """d = arccos(clip(dot, -1, 1)) / pi, the reference's expression."""
    return torch.arccos(dot.clamp(-1.0, 1.0)) / math.pi


def _to_limbs(t: torch.Tensor) -> torch.Tensor:
    """Non-negative float64 terms as 5 int64 limbs: floor(t), then 4 x 32 fraction bits.

    Every step is exact in float64 (scaling by 2^32, floor, and the fractional part
    of a float are all representable); bits below 2^-128 are dropped."""
    out = torch.empty((t.shape[0], _N_LIMBS), dtype=torch.int64, device=t.device)
    q = torch.floor(t)
    out[:, 0] = q.to(torch.int64)
    r = t - q
    scale = float(1 << _LIMB_BITS)
    for k in range(1, _N_LIMBS):
        r = r * scale
        q = torch.floor(r)
        out[:, k] = q.to(torch.int64)
        r = r - q
    return out


def _normalise_limbs(acc: torch.Tensor) -> None:
    mask = (1 << _LIMB_BITS) - 1
    for k in range(_N_LIMBS - 1, 0, -1):
        carry = acc[:, k] >> _LIMB_BITS
        acc[:, k] &= mask
        acc[:, k - 1] += carry


def _limbs_to_float(acc: np.ndarray) -> np.ndarray:
    """Correctly rounded float64 value of each row's fixed-point limbs."""
    out = np.empty(acc.shape[0], dtype=np.float64)
    den = 1 << (_LIMB_BITS * (_N_LIMBS - 1))
    for i, row in enumerate(acc.tolist()):
        v = 0
        for limb in row:
            v = (v << _LIMB_BITS) + limb
        out[i] = v / den  # int / int: correctly rounded
    return out


def _scatter_count(hist: torch.Tensor, idx: torch.Tensor) -> None:
    """hist[i, idx[i, j]] += 1 for all i, j (integer atomics: deterministic)."""
    ones = torch.ones((), dtype=hist.dtype, device=hist.device).expand(idx.shape)
    try:
        hist.scatter_add_(1, idx, ones)
    except RuntimeError:
        if idx.dtype == torch.int64:
            raise
        hist.scatter_add_(1, idx.long(), ones)  # torch < 2.8: int64 indices only


# ----------------------------------------------------------------------------
# the join


class _TorchJoin:
    """One streamed join: anchors on the device, tiling, GEMM mode choice, eps."""

    def __init__(self, anchors: np.ndarray, ids: np.ndarray, device, half, tile, anchor_tile):
        self.dev = _resolve_device(device)
        self.cuda = self.dev.type == "cuda"
        # None: float16 on CUDA where it is lossless (decided per block in plan())
        self.half_auto = half is None and self.cuda
        self.half = self.half_auto or bool(half)
        self.tile = _check_tile(DEFAULT_TILE if tile is None else tile, "tile")
        na, dim = anchors.shape
        if anchor_tile is None:
            anchor_tile = max(1, DEFAULT_TILE_ELEMENTS // self.tile)
        self.anchor_tile = _check_tile(anchor_tile, "anchor_tile")
        self.na, self.dim = na, dim
        self.width = _pow2(dim)
        self.ids = ids
        self.norm_a = join._max_norm(anchors.astype(np.float64, copy=False))
        maxabs = float(np.max(np.abs(anchors))) if anchors.size else 0.0
        self.a_fits16 = maxabs <= _F16_MAX
        with np.errstate(over="ignore"):
            self.a_exact16 = anchors.dtype == np.float16 or (
                self.a_fits16 and bool(np.array_equal(anchors.astype(np.float16).astype(anchors.dtype), anchors)))
        a_dev = torch.from_numpy(anchors).to(self.dev)
        self.a64 = a_dev.to(torch.float64)
        self._a_gemm = {}
        self._a_src = a_dev
        self.mm_out32 = self.half and _mm_out_dtype_supported(self.dev)
        self.fallback_extra = None if not self.half or self.mm_out32 else _half_fallback_extra_unit(self.dev)
        self.fp32_in_unit = _fp32_input_unit(self.dev)

    def a_gemm(self, dtype):
        if dtype not in self._a_gemm:
            self._a_gemm[dtype] = self._a_src.to(dtype).contiguous()
        return self._a_gemm[dtype]

    # -- blocks ---------------------------------------------------------------

    def prepare(self, item):
        """(offset, block) -> (offset, host tensor), pinned when bound for CUDA.
        Runs on the prefetch thread: host work only."""
        offset, block = item
        t = _host_block(block, self.dim)
        if self.cuda and t.device.type == "cpu" and t.shape[0] > 0:
            t = t.pin_memory()
        return offset, t

    def upload(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.dev:
            return t.contiguous()
        return t.to(self.dev, non_blocking=self.cuda and t.is_pinned()).contiguous()

    def block_stats(self, b: torch.Tensor, want16: bool):
        """(max row norm, max |x|, every value float16-exact); ValueError on NaN/inf."""
        rows = max(1, _STAT_CHUNK_ELEMENTS // max(1, b.shape[1]))
        norms, absmax, finite, exact = [], [], [], []
        for s in range(0, b.shape[0], rows):
            x = b[s:s + rows]
            x64 = x.to(torch.float64)
            norms.append((x64 * x64).sum(dim=1).max())
            absmax.append(x64.abs().max())
            finite.append(torch.isfinite(x).all())
            if want16 and b.dtype != torch.float16:
                exact.append((x.to(torch.float16).to(x.dtype) == x).all())
        n2, amax, fin = (float(v) for v in torch.stack([
            torch.stack(norms).max(), torch.stack(absmax).max(),
            torch.stack(finite).all().to(torch.float64)]).cpu())
        if fin != 1.0:
            raise ValueError("block contains NaN or inf")
        ex = b.dtype == torch.float16 or (bool(torch.stack(exact).all()) if exact else False)
        return math.sqrt(n2), amax, ex

    def plan(self, b: torch.Tensor):
        """(GEMM input dtype, eps) for this block; validates its values."""
        norm_b, amax_b, b_exact16 = self.block_stats(b, self.half)
        use16 = self.half and self.a_fits16 and amax_b <= _F16_MAX and (self.mm_out32 or self.fallback_extra is not None)
        if self.half_auto:  # only where lossless and with float32 output (no wide band)
            use16 = use16 and self.mm_out32 and self.a_exact16 and b_exact16
        if use16:
            mode = "fp16" if self.mm_out32 else "fp16-out16"
            eps = _eps(self.dim, self.norm_a, norm_b, mode=mode, a_exact16=self.a_exact16,
                       b_exact16=b_exact16, out_extra=self.fallback_extra or 0.0)
            return torch.float16, eps
        eps = _eps(self.dim, self.norm_a, norm_b, mode="fp32", in_unit=self.fp32_in_unit)
        return torch.float32, eps

    def gemm(self, a_g: torch.Tensor, b_g: torch.Tensor) -> torch.Tensor:
        if a_g.dtype == torch.float16:
            if self.mm_out32:
                return _mm_f16_f32(a_g, b_g)
            return torch.mm(a_g, b_g.T).float()
        return torch.mm(a_g, b_g.T)

    def tiles(self, b: torch.Tensor, offset: int, gdtype):
        """Yield (r0, c0, bt, sims) with self pairs set to -inf, column tiles outermost."""
        a_g = self.a_gemm(gdtype)
        nb = b.shape[0]
        for c0 in range(0, nb, self.tile):
            bt = b[c0:c0 + self.tile]
            bg = bt if bt.dtype == gdtype else bt.to(gdtype)
            g0 = offset + c0
            local = self.ids - g0
            for r0 in range(0, self.na, self.anchor_tile):
                r1 = min(self.na, r0 + self.anchor_tile)
                sims = self.gemm(a_g[r0:r1], bg)
                loc = local[r0:r1]
                rows = np.nonzero((loc >= 0) & (loc < bt.shape[0]))[0]
                if rows.size:
                    sims[torch.from_numpy(rows).to(self.dev), torch.from_numpy(loc[rows]).to(self.dev)] = -math.inf
                yield r0, c0, bt, sims

    def exact_pairs(self, pairs: torch.Tensor, r0: int, bt: torch.Tensor):
        """Yield (anchor rows, float64 distances) for (local row, local col) pairs, in chunks."""
        elements = _EXACT_CHUNK_ELEMENTS["cuda" if self.cuda else "cpu"]
        chunk = max(1, min(_MAX_CHUNK_PAIRS, elements // self.width))
        for s in range(0, pairs.shape[0], chunk):
            p = pairs[s:s + chunk]
            ai = p[:, 0] + r0
            dot = _tree_dot(self.a64[ai], bt[p[:, 1]].to(torch.float64), self.width)
            yield ai, _dist(dot)


def _blocks_for(join_, blocks, prefetch):
    enabled = join_.cuda if prefetch is None else bool(prefetch)
    if isinstance(blocks, (np.ndarray, torch.Tensor)) or (isinstance(blocks, (list, tuple)) and len(blocks) < 2):
        enabled = False  # nothing to overlap (tasks/join/parallel.py passes one block per call)
    return _prefetched(_iter_blocks(blocks), join_.prepare, enabled)


def range_counts_torch(anchors, blocks, radii, *, anchor_ids=None, device="cuda", half=None,
                       tile=None, anchor_tile=None, prefetch=None) -> np.ndarray:
    """Streamed neighbour counts N(anchor, X, r), int64 (a, R), computed with torch.

    Same contract as modeaudit.tasks.join.kernels.range_counts: `blocks` yields (offset, block)
    pairs (a bare 2-d array or tensor is one block at offset 0), anchor_ids[i]
    is anchor i's global row index (that pair is not counted), and the result
    equals join.range_counts_reference exactly. Blocks may be numpy arrays or
    torch tensors (on the CPU or already on `device`).

    device: "cuda" (or "cuda:N") or "cpu". half: float16 GEMM with float32
    accumulation (None: on CUDA for blocks of float16 values, see the module
    doc). tile / anchor_tile: block rows / anchor rows per score tile
    (defaults 65536 and 2^26 // tile). prefetch: read and pin the next block on
    a helper thread (None: on CUDA, for iterables of blocks). half, tile,
    anchor_tile and prefetch change speed and memory, never the result.
    """
    radii = np.asarray(radii, dtype=np.float64)
    thr_desc = join.radius_thresholds(radii)
    a = _anchor_array(anchors)
    ids = join._check_ids(anchor_ids, a.shape[0])
    R = radii.size
    jn = _TorchJoin(a, ids, device, half, tile, anchor_tile)
    dev = jn.dev
    thr_asc = thr_desc[::-1].copy()
    radii_dev = torch.from_numpy(radii).to(dev)
    with torch.inference_mode():
        hist = torch.zeros((a.shape[0], R + 1), dtype=torch.int64, device=dev)
        band_cache: dict = {}
        for offset, host in _blocks_for(jn, blocks, prefetch):
            if host.shape[0] == 0:
                continue
            b = jn.upload(host)
            gdtype, eps = jn.plan(b)
            if a.shape[0] == 0:
                continue
            if eps not in band_cache:
                band_cache = {eps: _band_thresholds(thr_asc, eps, dev)}
            t_lo, t_hi = band_cache[eps]
            for r0, _c0, bt, sims in jn.tiles(b, offset, gdtype):
                lo = torch.searchsorted(t_lo, sims, right=True, out_int32=True)
                hi = torch.searchsorted(t_hi, sims, right=True, out_int32=True)
                del sims
                band = lo != hi
                del hi
                lo.masked_fill_(band, 0)  # bin 0 (passes no radius) counts nothing
                _scatter_count(hist[r0:r0 + lo.shape[0]], lo)
                del lo
                pairs = band.nonzero()
                del band
                for ai, d in jn.exact_pairs(pairs, r0, bt):
                    passed = R - torch.searchsorted(radii_dev, d, right=False)
                    hist.index_put_((ai, passed), torch.ones_like(ai), accumulate=True)
        # counts[:, r] = #pairs passing >= R - r thresholds: reverse cumulative sum
        rev = hist.flip(1).cumsum(1)  # rev[:, k] = sum of hist[:, R - k:]
        counts = rev[:, :R]
        return counts.cpu().numpy().astype(np.int64, copy=False)


def mccs_sums_torch(anchors, blocks, theta, *, anchor_ids=None, device="cuda", half=None,
                    tile=None, anchor_tile=None, prefetch=None) -> np.ndarray:
    """Streamed MCCS sums (not means) per anchor, float64 (a,), computed with torch.

    Same contract as modeaudit.tasks.join.kernels.mccs_sums (see range_counts_torch for the
    arguments). The result is the correctly rounded exact sum of the float64
    terms, so it is bit-identical for any tiling, block split or thread count,
    and agrees with join.mccs_sums_reference to ~1e-16 relative.
    """
    theta = join._check_theta(theta)
    a = _anchor_array(anchors)
    ids = join._check_ids(anchor_ids, a.shape[0])
    jn = _TorchJoin(a, ids, device, half, tile, anchor_tile)
    dev = jn.dev
    denom = math.expm1(theta)
    c_theta = math.cos(math.pi * theta)
    with torch.inference_mode():
        acc = torch.zeros((a.shape[0], _N_LIMBS), dtype=torch.int64, device=dev)
        for offset, host in _blocks_for(jn, blocks, prefetch):
            if host.shape[0] == 0:
                continue
            b = jn.upload(host)
            gdtype, eps = jn.plan(b)
            if a.shape[0] == 0:
                continue
            # Round down so the float32 test keeps every score the float64 test would.
            cut = float(np.nextafter(np.float32(c_theta - eps), np.float32(-np.inf)))
            for r0, _c0, bt, sims in jn.tiles(b, offset, gdtype):
                pairs = (sims >= cut).nonzero()
                del sims
                for ai, d in jn.exact_pairs(pairs, r0, bt):
                    keep = d < theta
                    if not bool(keep.any()):
                        continue
                    ai, d = ai[keep], d[keep]
                    terms = torch.expm1(theta - d) / denom
                    acc.index_add_(0, ai, _to_limbs(terms))
                    _normalise_limbs(acc)
        return _limbs_to_float(acc.cpu().numpy())
