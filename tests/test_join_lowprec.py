"""The low-precision first pass (tasks/join/lowprec.py, kernel "lowprec"): its bfloat16
rounding, its error bound, and the re-check band around the thresholds.

test_join.py runs every exactness test of the join through "lowprec" as well; these
tests aim at what only the low-precision pass has: a band ~300x wider than float32's."""
from __future__ import annotations

import math

import numpy as np
import pytest

from modeaudit.tasks.join import backend
from modeaudit.tasks.join import kernels as join
from modeaudit.tasks.join import lowprec
from modeaudit.tasks.join.kernels import DEFAULT_RADII, mccs_sums, radius_thresholds, range_counts, \
    range_counts_reference
from test_join import _point_at, _unit  # the exactness tests' own data helpers


def _bf16_scores(a, b):
    """The first pass's scores: float32 GEMM of the bfloat16 roundings."""
    return lowprec.to_bf16(a) @ lowprec.to_bf16(b).T


def _eps(a, b):
    aq, bq = lowprec.to_bf16(a), lowprec.to_bf16(b)
    return lowprec.bf16_eps(a.shape[1], lowprec.row_stats(a, aq), lowprec.row_stats(b, bq))


def _bf16_by_comparison(x):
    """bfloat16 rounding by another route: the two bfloat16 neighbours of each value,
    the nearer one in float64, ties to the even one."""
    u = x.view(np.uint32)
    down = (u & np.uint32(0xFFFF0000)).view(np.float32)             # toward zero
    up = ((u & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)  # away from zero
    dd = np.abs(x.astype(np.float64) - down)
    du = np.abs(up.astype(np.float64) - x)
    even_down = ((u >> np.uint32(16)) & np.uint32(1)) == 0
    return np.where((dd < du) | ((dd == du) & even_down), down, up)


def test_to_bf16_rounds_to_nearest_even():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32),
                        # exact ties between two bfloat16 numbers: even wins, both directions
                        np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -130, 0.0], np.float32)])
    got = lowprec.to_bf16(x)
    assert got.tobytes() == _bf16_by_comparison(x).tobytes()
    assert got[-5] == 1.0 and got[-4] == 1 + 4 * 2 ** -8 and got[-3] == -1.0  # the ties went to even
    # every value has 8 significant bits: its low 16 float32 bits are zero
    assert not np.any(got.view(np.uint32) & 0xFFFF)
    assert np.all(np.abs(got.astype(np.float64) - x) <= 2.0 ** -8 * np.abs(x))


@pytest.mark.parametrize("kind", ["isotropic", "near-duplicates", "non-unit-float16"])
def test_bound_holds_for_every_pair_and_is_not_vacuous(kind):
    rng = np.random.default_rng(1)
    d = 128
    a = _unit(rng.standard_normal((64, d)))
    if kind == "isotropic":
        b = _unit(rng.standard_normal((3000, d)))
    elif kind == "near-duplicates":
        b = _unit(a[rng.integers(0, 64, 3000)] + 1e-4 * rng.standard_normal((3000, d)))
    else:
        b = (_unit(rng.standard_normal((3000, d))) * rng.uniform(0.97, 1.03, (3000, 1))).astype(np.float16)
    err = np.abs(_bf16_scores(a, b).astype(np.float64) - a @ b.astype(np.float64).T)
    eps = _eps(a, b)
    assert err.max() <= eps
    # the bound is of the size the derivation says: 8 significant bits, not float32's 24
    assert 1e-3 < eps < 8e-3 and err.max() > eps / 20


def _hadamard(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def test_band_pairs_are_rechecked_exactly():
    """Points at distance r + delta with |delta| from 1e-3 down to 1e-12, and pairs exactly
    on the r = 0.5 threshold (rows of a Hadamard matrix: entries +-1/8, so their inner
    product is exactly 0 in any summation order and in bfloat16, and d = 0.5 exactly):
    the bfloat16 scores misplace many of them, the re-check must not."""
    rng = np.random.default_rng(2)
    d = 64
    had = _hadamard(d)
    anchors = np.concatenate([_unit(rng.standard_normal((12, d))), had[:4]])
    deltas = [1e-3, -1e-3, 1e-4, -1e-4, 1e-6, -1e-6, 1e-12, -1e-12]
    pts = np.array([_point_at(rng, anchors[i % 12], r + dl)
                    for i, r in enumerate(DEFAULT_RADII) for dl in deltas for _ in range(2)])
    points = np.concatenate([pts, had, _unit(rng.standard_normal((400, d)))])
    assert join.arccos_over_pi(had[0] @ had[1]) == 0.5 == DEFAULT_RADII[-1]
    for dtype in (np.float64, np.float32):
        a, p = anchors.astype(dtype), points.astype(dtype)
        ref = range_counts_reference(a, p, DEFAULT_RADII)
        s = _bf16_scores(a, p).astype(np.float64)
        naive = np.stack([(s >= c).sum(axis=1) for c in radius_thresholds(DEFAULT_RADII)], axis=1)
        assert np.any(naive != ref)  # the first pass alone is wrong here
        assert np.all(ref[12:, -1] - ref[12:, -2] >= d - 1)  # the exact ties at r = 0.5 are counted
        assert np.any(naive[12:, -1] != ref[12:, -1])
        np.testing.assert_array_equal(range_counts(a, [(0, p)], DEFAULT_RADII, kernel="lowprec"), ref)


def test_clustered_data_counts_and_sums_equal_the_float32_path():
    """Tight clusters put most scores of a cluster's pairs near the small radii, where
    the thresholds are closest together in score (0.01 apart): most pairs are in the band."""
    rng = np.random.default_rng(3)
    d = 32
    centres = _unit(rng.standard_normal((4, d)))
    x = _unit(centres[rng.integers(0, 4, 2500)] + rng.uniform(0.05, 0.5, (2500, 1)) *
              rng.standard_normal((2500, d)) / math.sqrt(d)).astype(np.float16)
    a, ids = x[:80].astype(np.float32), np.arange(80)
    blocks = [(0, x[:1000]), (1000, x[1000:])]
    fast = range_counts(a, blocks, DEFAULT_RADII, anchor_ids=ids)
    low = range_counts(a, blocks, DEFAULT_RADII, anchor_ids=ids, kernel="lowprec")
    np.testing.assert_array_equal(low, fast)
    np.testing.assert_array_equal(low, range_counts_reference(a, x, DEFAULT_RADII, anchor_ids=ids))
    assert (low[:, 0] > 0).mean() > 0.5 and low[:, -1].max() < len(x)
    # the band is wide here: the re-check decides a good share of the pairs
    s = _bf16_scores(a, x).astype(np.float64)
    near = np.min(np.abs(s[:, :, None] - radius_thresholds(DEFAULT_RADII)), axis=2) <= _eps(a, x)
    assert near.mean() > 0.1
    for theta in (0.1, 0.3):
        f = mccs_sums(a, blocks, theta, anchor_ids=ids)
        assert np.count_nonzero(f) > 40
        assert mccs_sums(a, blocks, theta, anchor_ids=ids, kernel="lowprec").tobytes() == f.tobytes()


def test_rows_too_large_for_bfloat16_fall_back_to_float32():
    big = np.array([[3e38, 0.0], [0.0, 1.0]], np.float32)
    unit = np.array([[1.0, 0.0], [0.6, 0.8]])
    # anchors unit, block huge (and the other way round): both still exact
    np.testing.assert_array_equal(range_counts(unit, [(0, big)], DEFAULT_RADII, kernel="lowprec"),
                                  range_counts_reference(unit, big, DEFAULT_RADII))
    np.testing.assert_array_equal(range_counts(big, [(0, unit)], DEFAULT_RADII, kernel="lowprec"),
                                  range_counts_reference(big, unit, DEFAULT_RADII))


def test_backend_dispatches_lowprec_and_auto_never_picks_it(monkeypatch):
    rng = np.random.default_rng(4)
    x = _unit(rng.standard_normal((600, 16))).astype(np.float32)
    assert backend.resolve_kernel("lowprec") == "lowprec"
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    assert backend.resolve_kernel("auto") == "fast"
    np.testing.assert_array_equal(
        backend.range_counts(x[:20], [(0, x)], DEFAULT_RADII, anchor_ids=np.arange(20), kernel="lowprec"),
        range_counts_reference(x[:20], x, DEFAULT_RADII, anchor_ids=np.arange(20)))
    assert (backend.mccs_sums(x[:20], [(0, x)], 0.3, kernel="lowprec").tobytes()
            == join.mccs_sums(x[:20], [(0, x)], 0.3).tobytes())


def test_parallel_driver_over_fixed_blocks_equals_fast(tmp_path):
    """Through tasks/join/parallel.py (the audit's path: fixed 65,536-row reduction blocks,
    a bound per block), counts equal and MCCS sums are bit-identical to "fast"."""
    from modeaudit.tasks.join import parallel
    from modeaudit.tasks.join.sources import REDUCE_ROWS, Source
    rng = np.random.default_rng(6)
    n = REDUCE_ROWS + 4000  # two reduction blocks
    x = _unit(rng.standard_normal((n, 16))).astype(np.float32)
    x[REDUCE_ROWS + 7] = x[3]  # a duplicate in the second block
    np.save(tmp_path / "t.npy", x)
    src = Source("npy", str(tmp_path / "t.npy"), n, 16)
    a, ids = x[:8], np.arange(8)
    got = {k: (parallel.range_counts(None, a, src, DEFAULT_RADII, anchor_ids=ids, kernel=k),
               parallel.mccs_sums(None, a, src, 0.3, anchor_ids=ids, kernel=k)) for k in ("fast", "lowprec")}
    np.testing.assert_array_equal(got["lowprec"][0], got["fast"][0])
    assert got["lowprec"][1].tobytes() == got["fast"][1].tobytes()
    assert got["fast"][0][3, 0] >= 1 and np.count_nonzero(got["fast"][1]) == 8


def _torch_cuda():
    # backend.gpu_available() imports torch only where NVIDIA device nodes exist: a
    # CPU machine skips without paying for the import.
    if not backend.gpu_available():
        pytest.skip("no CUDA GPU: the tensor-core first pass cannot run here (its CPU twin is tested above)")


@pytest.mark.gpu
def test_cuda_low_precision_first_pass_equals_lowprec():
    """On a GPU the same two-pass design runs in float16 on the tensor cores
    (torch_kernels, half=True): its counts and the numba lowprec counts must agree."""
    _torch_cuda()
    from modeaudit.tasks.join import torch_kernels as jt
    rng = np.random.default_rng(5)
    x = _unit(rng.standard_normal((5000, 128))).astype(np.float32)
    got = jt.range_counts_torch(x[:100], [(0, x)], DEFAULT_RADII, anchor_ids=np.arange(100), device="cuda",
                                half=True)
    np.testing.assert_array_equal(got, range_counts(x[:100], [(0, x)], DEFAULT_RADII, anchor_ids=np.arange(100),
                                                    kernel="lowprec"))
