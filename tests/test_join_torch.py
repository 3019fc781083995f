"""Torch range-join / MCCS kernels (tasks/join/torch_kernels.py) and the backend switch (tasks/join/backend.py).

The torch kernels must give exactly join.range_counts_reference's counts and
join.mccs_sums_reference's sums (rtol 1e-9, bit-identical across tilings). Here
they run on torch's CPU device; the tests marked `gpu` repeat the essentials on
CUDA and are skipped without a GPU.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from modeaudit.tasks.join import backend
from modeaudit.tasks.join import kernels as join
from modeaudit.tasks.join.kernels import DEFAULT_RADII, mccs_sums_reference, radius_thresholds, range_counts_reference

torch = pytest.importorskip("torch")
jt = pytest.importorskip("modeaudit.tasks.join.torch_kernels")


# ----------------------------------------------------------------------------
# data helpers (as in tests/test_join.py)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng, n, d, n_centres=6, max_tan=3.0):
    """Unit vectors around a few centres at angles spread over [0, atan(max_tan)],
    so pair distances cover the whole radius grid in any dimension."""
    centres = _unit(rng.standard_normal((n_centres, d)))
    c = centres[rng.integers(0, n_centres, n)]
    u = rng.standard_normal((n, d))
    u -= np.sum(u * c, axis=1, keepdims=True) * c
    u = _unit(u)
    return _unit(c + max_tan * rng.uniform(0, 1, (n, 1)) ** 2 * u)


def _distances(anchors, points):
    return np.arccos(np.clip(anchors.astype(np.float64) @ points.astype(np.float64).T, -1, 1)) / np.pi


def _point_at(rng, a, dist):
    """A unit vector at distance `dist` (to float64) from unit vector a."""
    u = rng.standard_normal(a.shape[0])
    u -= (u @ a) * a
    u /= np.linalg.norm(u)
    return math.cos(math.pi * dist) * a + math.sin(math.pi * dist) * u


def _adversarial(rng, d=64, n_anchors=40, n_extra=500):
    """Anchors plus points at distance r +- (1e-7 .. 1e-10) from them for every radius."""
    anchors = _clustered(rng, n_anchors, d)
    deltas = np.array([1e-7, -1e-7, 3e-8, -3e-8, 1e-8, -1e-8, 1e-9, -1e-9, 1e-10, -1e-10])
    pts = [_point_at(rng, anchors[i % len(anchors)], r + dl)
           for i, r in enumerate(np.repeat(DEFAULT_RADII, 6)) for dl in deltas[i % 2::2]]
    points = np.concatenate([np.array(pts), _clustered(rng, n_extra, d)])
    return anchors, points


def _random_blocks(rng, points, base):
    """Split points into blocks of random sizes (with empty and one-row blocks)."""
    cuts, pos = [], 0
    while pos < len(points):
        size = int(rng.choice([0, 1, 1, 2, 7, 50, 333, 900]))
        cuts.append((base + pos, points[pos:pos + size]))
        pos += size
    cuts.insert(3, (base + len(points), points[:0]))
    return cuts


def _naive_counts(sims):
    return np.stack([(sims >= c).sum(axis=1) for c in radius_thresholds(DEFAULT_RADII)], axis=1)


def _counts(anchors, blocks, **kw):
    kw.setdefault("device", "cpu")
    return jt.range_counts_torch(anchors, blocks, DEFAULT_RADII, **kw)


def _sums(anchors, blocks, theta, **kw):
    kw.setdefault("device", "cpu")
    return jt.mccs_sums_torch(anchors, blocks, theta, **kw)


@pytest.fixture
def emulated_out_dtype(monkeypatch):
    """Make the CPU take the CUDA code path of half=True: torch.mm(a16, b16.T,
    out_dtype=float32) emulated by a float32 GEMM of the float16 values (exact
    products, float32 accumulation), which is what the overload computes."""
    monkeypatch.setattr(jt, "_mm_out_dtype_supported", lambda dev: True)
    monkeypatch.setattr(jt, "_mm_f16_f32", lambda a, b: torch.mm(a.float(), b.float().T))


# ----------------------------------------------------------------------------
# counts: exactness


@pytest.mark.parametrize("d", [16, 128])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_counts_equal_float64_reference(d, half, dtype):
    rng = np.random.default_rng(d * 10 + half)
    data = _clustered(rng, 1600, d).astype(dtype)
    anchors, points = data[:40], data[40:]
    ref = range_counts_reference(anchors, points, DEFAULT_RADII)
    assert ref[:, 0].max() > 0 and ref[:, -1].min() < len(points)
    assert (ref[:, -1] > ref[:, 0]).mean() > 0.5
    got = _counts(anchors, [(0, points)], half=half, tile=512, anchor_tile=16)
    assert got.dtype == np.int64 and got.shape == (40, DEFAULT_RADII.size)
    np.testing.assert_array_equal(got, ref)


def test_counts_fp16_gemm_with_float32_output(emulated_out_dtype):
    rng = np.random.default_rng(2)
    for dtype in (np.float16, np.float32):
        data = _clustered(rng, 1500, 128).astype(dtype)
        anchors, points = data[:30], data[30:]
        np.testing.assert_array_equal(_counts(anchors, [(0, points)], half=True),
                                      range_counts_reference(anchors, points, DEFAULT_RADII))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("half", [False, True, "out32"])
def test_exact_correction_on_adversarial_near_threshold_pairs(dtype, half, request):
    """Points at distance r +- (1e-7 .. 1e-10): the GEMM scores cannot decide them,
    the float64 re-evaluation must."""
    if half == "out32":
        request.getfixturevalue("emulated_out_dtype")
    rng = np.random.default_rng(7)
    anchors, points = _adversarial(rng)
    anchors, points = anchors.astype(dtype), points.astype(dtype)
    dist = _distances(anchors, points)
    near = np.min(np.abs(dist[:, :, None] - DEFAULT_RADII[None, None, :]), axis=2) < 1e-7
    assert near.sum() > 1000
    ref = range_counts_reference(anchors, points, DEFAULT_RADII)
    # the GEMM scores alone get some of them wrong, so the correction is doing work
    a16, p16 = torch.from_numpy(anchors).half(), torch.from_numpy(points).half()
    approx = (a16.float() @ p16.float().T).numpy() if half else anchors.astype(np.float32) @ points.astype(np.float32).T
    assert np.any(_naive_counts(approx) != ref)
    got = _counts(anchors, [(0, points)], half=bool(half), tile=1000)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("half", [False, True])
def test_non_unit_float16_inputs_still_exact(half):
    """Stored embeddings are float16 rows whose norms are not exactly 1: scores may
    leave [-1, 1], identical rows score above 1."""
    rng = np.random.default_rng(3)
    data = _clustered(rng, 1200, 32) * rng.uniform(0.97, 1.03, (1200, 1))
    data[:5] = data[0]
    anchors = data[:30].astype(np.float32)
    points = data.astype(np.float16)
    for pts in (points, -points):
        np.testing.assert_array_equal(_counts(anchors, [(0, pts)], half=half),
                                      range_counts_reference(anchors, pts, DEFAULT_RADII))


def test_custom_radius_grid():
    rng = np.random.default_rng(11)
    data = _clustered(rng, 900, 16)
    radii = np.array([0.003, 0.05, 0.25, 0.2501, 0.7, 0.999])
    got = jt.range_counts_torch(data[:20], [(0, data[20:])], radii, device="cpu")
    np.testing.assert_array_equal(got, range_counts_reference(data[:20], data[20:], radii))


def test_eps_bounds_the_observed_gemm_error():
    """The derived eps must cover the actual score errors of each GEMM mode, with
    the float64 product of the inputs as given as the truth."""
    rng = np.random.default_rng(1)
    for d in (16, 128, 768):
        data = _clustered(rng, 2000, d)
        A, P = data[:40], data[40:]
        na, nb = join._max_norm(A), join._max_norm(P)
        for a, p, ex in ((A, P, False), (A.astype(np.float16), P.astype(np.float16), True)):
            x = a.astype(np.float64) @ p.astype(np.float64).T
            ta, tp = torch.from_numpy(a), torch.from_numpy(p)
            s32 = (ta.float() @ tp.float().T).double().numpy()
            s16 = (ta.half() @ tp.half().T).double().numpy()          # float16 output
            s16f = (ta.half().float() @ tp.half().float().T).double().numpy()  # float32 output
            assert np.abs(s32 - x).max() < jt._eps(d, na, nb, mode="fp32")
            assert np.abs(s16 - x).max() < jt._eps(d, na, nb, mode="fp16-out16", a_exact16=ex, b_exact16=ex)
            assert np.abs(s16f - x).max() < jt._eps(d, na, nb, mode="fp16", a_exact16=ex, b_exact16=ex)
    # and it stays narrow: ~1.6e-5 (float32), ~3e-5 (float16 data on tensor cores)
    assert jt._eps(128, 1.0, 1.0, mode="fp32") < 2e-5
    assert jt._eps(128, 1.0, 1.0, mode="fp16") < 4e-5
    assert jt._eps(128, 1.0, 1.0, mode="fp16", a_exact16=False, b_exact16=False) < 1.5e-3


def test_tf32_or_bf16_matmul_precision_widens_eps(monkeypatch):
    """A process-wide 'fast float32' matmul mode must not break exactness: the CPU
    path then assumes bfloat16 input rounding."""
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert jt._fp32_input_unit(torch.device("cpu")) == 2.0 ** -8
        rng = np.random.default_rng(5)
        anchors, points = _adversarial(rng, d=32, n_anchors=20, n_extra=200)
        np.testing.assert_array_equal(_counts(anchors, [(0, points)], half=False),
                                      range_counts_reference(anchors, points, DEFAULT_RADII))
    finally:
        torch.set_float32_matmul_precision(old)
    assert jt._fp32_input_unit(torch.device("cpu")) == 0.0


# ----------------------------------------------------------------------------
# streaming and self-exclusion


@pytest.mark.parametrize("half", [False, True])
def test_blocked_equals_one_block_with_global_offsets(half):
    rng = np.random.default_rng(5)
    base = 10_000
    points = _clustered(rng, 3000, 24).astype(np.float32)
    pick = rng.choice(len(points), 60, replace=False)
    anchors, ids = points[pick], base + pick
    blocks = _random_blocks(rng, points, base)
    assert any(len(b) == 0 for _, b in blocks) and any(len(b) == 1 for _, b in blocks)
    ref = range_counts_reference(anchors, points, DEFAULT_RADII, anchor_ids=ids, point_offset=base)
    one = _counts(anchors, [(base, points)], anchor_ids=ids, half=half)
    np.testing.assert_array_equal(one, ref)
    many = _counts(anchors, iter(blocks), anchor_ids=ids, half=half, tile=128, anchor_tile=7)
    np.testing.assert_array_equal(many, ref)
    # the prefetch thread (the CUDA default) gives the same, from a one-shot iterator
    fetched = _counts(anchors, iter(blocks), anchor_ids=ids, half=half, prefetch=True)
    np.testing.assert_array_equal(fetched, ref)
    # torch tensors as blocks, and a bare array as one block at offset 0
    np.testing.assert_array_equal(
        _counts(anchors, [(o, torch.from_numpy(b)) for o, b in blocks], anchor_ids=ids, half=half), ref)
    np.testing.assert_array_equal(_counts(anchors, points, half=half),
                                  range_counts_reference(anchors, points, DEFAULT_RADII))


def test_self_pairs_are_excluded_by_index_not_by_value():
    rng = np.random.default_rng(9)
    points = _clustered(rng, 2000, 16)
    ids = np.array([3, 500, 1999, 77])
    points[1234] = points[500]  # a duplicate of anchor 1 elsewhere: a real neighbour
    anchors = points[ids].copy()
    with_ids = _counts(anchors, [(0, points)], anchor_ids=ids, tile=300)
    without = _counts(anchors, [(0, points)], tile=300)
    np.testing.assert_array_equal(without - with_ids, np.ones_like(with_ids))
    np.testing.assert_array_equal(with_ids, range_counts_reference(anchors, points, DEFAULT_RADII, anchor_ids=ids))
    by_value = np.count_nonzero(_distances(anchors[1:2], points)[0] <= DEFAULT_RADII[0]) - 2
    assert with_ids[1, 0] == by_value + 1
    shifted = _counts(anchors, [(1, points)], anchor_ids=ids)
    np.testing.assert_array_equal(
        shifted, range_counts_reference(anchors, points, DEFAULT_RADII, anchor_ids=ids, point_offset=1))
    assert np.any(shifted != with_ids)


# ----------------------------------------------------------------------------
# MCCS


@pytest.mark.parametrize("d,theta,half", [(3, 0.3, False), (64, 0.3, True), (128, 0.45, False), (16, 1.0, True)])
def test_mccs_sums_match_reference(d, theta, half):
    rng = np.random.default_rng(d)
    points = _clustered(rng, 2500, d).astype(np.float32)
    pick = rng.choice(len(points), 40, replace=False)
    anchors, ids = points[pick], 100 + pick
    ref = mccs_sums_reference(anchors, points, theta, anchor_ids=ids, point_offset=100)
    assert np.count_nonzero(ref) > 20
    got = _sums(anchors, _random_blocks(rng, points, 100), theta, anchor_ids=ids, half=half)
    assert got.dtype == np.float64 and got.shape == (40,)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=0)
    # including the self pairs adds exactly s(a, a) per anchor
    incl = _sums(anchors, [(100, points)], theta, half=half)
    self_terms = np.array([mccs_sums_reference(x[None], x[None], theta)[0] for x in anchors])
    np.testing.assert_allclose(incl - got, self_terms, rtol=0, atol=1e-9 * incl.max())


def test_mccs_sums_are_bit_identical_across_tilings_and_block_splits(emulated_out_dtype):
    rng = np.random.default_rng(12)
    points = _clustered(rng, 3000, 48)
    anchors = points[:50]
    theta = 0.4
    ref = mccs_sums_reference(anchors, points, theta, anchor_ids=np.arange(50))
    runs = [
        dict(blocks=[(0, points)]),
        dict(blocks=[(0, points)], tile=97, anchor_tile=3),
        dict(blocks=[(0, points)], tile=1024, anchor_tile=50),
        dict(blocks=_random_blocks(rng, points, 0), tile=33),
        dict(blocks=[(0, points[:1234]), (1234, points[1234:])], prefetch=True),
    ]
    for half in (False, True):  # half=True runs the emulated float32-output GEMM
        outs = []
        for run in runs:
            run = dict(run)
            outs.append(_sums(anchors, run.pop("blocks"), theta, anchor_ids=np.arange(50), half=half, **run))
        for o in outs[1:]:
            assert o.tobytes() == outs[0].tobytes()
        np.testing.assert_allclose(outs[0], ref, rtol=1e-9)
    # the GEMM precision only changes which pairs are candidates, never their terms
    assert _sums(anchors, points, theta, anchor_ids=np.arange(50), half=True).tobytes() == outs[0].tobytes()


@pytest.mark.parametrize("half", [False, True, "out32"])
def test_mccs_near_the_cutoff(half, request):
    """Points at distance theta -+ (1e-10 .. 1e-6): only those just inside contribute,
    and the GEMM scores cannot tell which those are."""
    if half == "out32":
        request.getfixturevalue("emulated_out_dtype")
    rng = np.random.default_rng(4)
    theta = 0.3
    anchors = _unit(rng.standard_normal((4, 64)))
    delta = 10.0 ** rng.uniform(-10, -6, 400) * np.repeat([-1.0, 1.0], 200)
    pts = np.array([_point_at(rng, anchors[k % 4], theta + dl) for k, dl in enumerate(delta)])
    pts = np.concatenate([pts, [_point_at(rng, anchors[0], theta - 0.1)]])
    ref = mccs_sums_reference(anchors, pts, theta)
    inside = delta < 0
    expected = [math.fsum(np.expm1(-delta[k::4][inside[k::4]]) / math.expm1(theta)) for k in range(4)]
    expected[0] += math.expm1(0.1) / math.expm1(theta)
    np.testing.assert_allclose(ref, expected, rtol=1e-6)
    np.testing.assert_allclose(_sums(anchors, [(0, pts)], theta, half=bool(half)), ref, rtol=1e-9)


def test_float16_exactness_is_detected_not_assumed():
    """eps drops the input-rounding term only for rows that are float16 values."""
    rng = np.random.default_rng(6)
    x16 = _clustered(rng, 50, 32).astype(np.float16)
    ids = np.full(50, -1)
    assert jt._TorchJoin(x16, ids, "cpu", True, None, None).a_exact16
    assert jt._TorchJoin(x16.astype(np.float64), ids, "cpu", True, None, None).a_exact16
    assert not jt._TorchJoin(x16.astype(np.float64) * (1 + 1e-6), ids, "cpu", True, None, None).a_exact16
    j = jt._TorchJoin(x16.astype(np.float32), ids, "cpu", True, None, None)
    for block, exact in ((x16, True), (x16.astype(np.float32), True), (x16.astype(np.float32) / 3, False)):
        b = torch.from_numpy(block)
        assert j.block_stats(b, True)[2] is exact
        norm_b = j.block_stats(b, True)[0]
        if_exact = jt._eps(32, j.norm_a, norm_b, mode="fp16-out16", a_exact16=True, b_exact16=True)
        eps = j.plan(b)[1]  # (the float16-output fallback: the CPU has no out_dtype GEMM)
        assert eps == if_exact if exact else eps > if_exact + 2 ** -11 * norm_b
    j2 = jt._TorchJoin(x16.astype(np.float64) * (1 + 1e-6), ids, "cpu", True, None, None)
    b = torch.from_numpy(x16)
    if_exact = jt._eps(32, j2.norm_a, j2.block_stats(b, True)[0], mode="fp16-out16")
    assert j2.plan(b)[1] > if_exact + 2 ** -11 * j2.norm_a
    # half=None on CUDA: float16 only for float16 values and with a float32-output GEMM
    auto = jt._TorchJoin(x16.astype(np.float32), ids, "cpu", None, None, None)
    assert auto.plan(torch.from_numpy(x16))[0] == torch.float32  # the CPU default
    auto.half_auto = auto.half = auto.mm_out32 = True  # what __init__ sets on a CUDA device
    assert auto.plan(torch.from_numpy(x16))[0] == torch.float16
    assert auto.plan(torch.from_numpy(x16.astype(np.float32) / 3))[0] == torch.float32
    auto.mm_out32 = False
    assert auto.plan(torch.from_numpy(x16))[0] == torch.float32
    big = torch.from_numpy(x16.astype(np.float32) * 1e6)  # beyond float16's range: a float32 GEMM
    assert j.plan(big)[0] == torch.float32


def test_mccs_hand_worked_example():
    ang = np.pi * np.array([0.1, 0.2, 0.5])
    C = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    np.testing.assert_allclose(_sums(np.array([[1.0, 0.0]]), [(0, C)], 0.3), [0.9334442], rtol=1e-7)


def test_exact_limb_sums_are_correctly_rounded():
    """The fixed-point limbs add terms exactly: the result is math.fsum's."""
    rng = np.random.default_rng(0)
    terms = np.concatenate([rng.uniform(0, 1, 5000), 10.0 ** rng.uniform(-22, 0, 5000), [1.0, 0.0, 2.0 ** -60]])
    rng.shuffle(terms)
    acc = torch.zeros((1, jt._N_LIMBS), dtype=torch.int64)
    for chunk in np.array_split(terms, 7):
        t = torch.from_numpy(chunk)
        acc.index_add_(0, torch.zeros(len(t), dtype=torch.int64), jt._to_limbs(t))
        jt._normalise_limbs(acc)
    assert jt._limbs_to_float(acc.numpy())[0] == math.fsum(terms)


def test_tree_dot_does_not_depend_on_the_batch():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((1000, 100)))
    y = torch.from_numpy(rng.standard_normal((1000, 100)))
    full = jt._tree_dot(x, y, 128)
    parts = torch.cat([jt._tree_dot(x[i:i + 37], y[i:i + 37], 128) for i in range(0, 1000, 37)])
    assert torch.equal(full, parts)
    np.testing.assert_allclose(full.numpy(), (x * y).sum(1).numpy(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# validation and edge cases


def test_input_validation():
    a = np.ones((2, 3)) / math.sqrt(3)
    with pytest.raises(ValueError, match="width 3 .* width 4"):
        _counts(a, [(0, np.ones((5, 4)))])
    with pytest.raises(ValueError, match="2-d"):
        _counts(a[0], [(0, a)])
    with pytest.raises(ValueError, match="NaN or inf"):
        _counts(a, [(0, np.full((2, 3), np.nan))])
    with pytest.raises(ValueError, match="NaN or inf"):
        _sums(a, [(0, np.array([[np.inf, 0.0, 0.0]]))], 0.3)
    with pytest.raises(ValueError, match="NaN or inf"):
        _sums(np.full((2, 3), np.inf), [(0, a)], 0.3)
    with pytest.raises(ValueError, match="anchor_ids"):
        _counts(a, [(0, a)], anchor_ids=[1])
    with pytest.raises(ValueError, match="theta"):
        _sums(a, [(0, a)], 0.0)
    with pytest.raises(ValueError, match=r"\(offset, block\)"):
        _counts(a, [a])
    with pytest.raises(ValueError, match=r"\(offset, block\)"):
        _counts(a, [a], prefetch=True)
    with pytest.raises(ValueError, match="tile"):
        _counts(a, [(0, a)], tile=0)
    with pytest.raises(ValueError, match="radii"):
        jt.range_counts_torch(a, [(0, a)], [0.2, 0.1], device="cpu")


def test_empty_inputs():
    a = _unit(np.random.default_rng(0).standard_normal((3, 8)))
    assert _counts(a[:0], [(0, a)]).shape == (0, 41)
    np.testing.assert_array_equal(_counts(a, []), np.zeros((3, 41), np.int64))
    np.testing.assert_array_equal(_sums(a, [(0, a[:0])], 0.3), np.zeros(3))
    assert _sums(a[:0], [(0, a)], 0.3).shape == (0,)


def test_cuda_device_without_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    with pytest.raises(RuntimeError, match="CUDA"):
        jt.range_counts_torch(np.eye(3), [(0, np.eye(3))], DEFAULT_RADII, device="cuda")


def test_kernels_do_not_import_prefect():
    for mod in (jt, backend):
        src = open(mod.__file__).read()
        assert "import prefect" not in src and "from prefect" not in src


# ----------------------------------------------------------------------------
# backend


def test_resolve_kernel(monkeypatch):
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    assert backend.resolve_kernel("auto") == "fast"
    for k in ("fast", "reference", "torch-cpu"):
        assert backend.resolve_kernel(k) == k
    with pytest.raises(ValueError, match="no CUDA GPU visible; use --kernel fast"):
        backend.resolve_kernel("torch-cuda")
    with pytest.raises(ValueError, match="auto, fast, reference, torch-cpu, torch-cuda"):
        backend.resolve_kernel("gpu")
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    assert backend.resolve_kernel("auto") == "torch-cuda"
    assert backend.resolve_kernel("torch-cuda") == "torch-cuda"
    assert backend.resolve_kernel("fast") == "fast"


def test_backend_dispatch_gives_identical_results(monkeypatch):
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    rng = np.random.default_rng(8)
    points = _clustered(rng, 1500, 32).astype(np.float32)
    ids = np.arange(0, 1500, 50)
    anchors = points[ids]
    ref = range_counts_reference(anchors, points, DEFAULT_RADII, anchor_ids=ids)
    sref = mccs_sums_reference(anchors, points, 0.35, anchor_ids=ids)
    for k in ("auto", "fast", "reference", "torch-cpu"):
        np.testing.assert_array_equal(backend.range_counts(anchors, [(0, points)], DEFAULT_RADII,
                                                           anchor_ids=ids, kernel=k), ref)
        np.testing.assert_allclose(backend.mccs_sums(anchors, [(0, points)], 0.35, anchor_ids=ids, kernel=k),
                                   sref, rtol=1e-9)
    with pytest.raises(ValueError, match="kernel"):
        backend.range_counts(anchors, [(0, points)], DEFAULT_RADII, kernel="cuda")


def test_gpu_available_never_imports_torch_without_nvidia_device_nodes():
    if any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0")):
        pytest.skip("this machine has NVIDIA device nodes")
    code = ("import sys; from modeaudit.tasks.join import backend; assert backend.gpu_available() is False; "
            "assert backend.resolve_kernel('auto') == 'fast'; "
            "assert 'torch' not in sys.modules and 'cupy' not in sys.modules, 'imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_gpu_available_without_device_nodes(monkeypatch):
    backend.gpu_available.cache_clear()
    monkeypatch.setattr(backend, "_has_nvidia_device_node", lambda: False)
    try:
        assert backend.gpu_available() is False
    finally:
        backend.gpu_available.cache_clear()


# ----------------------------------------------------------------------------
# on a CUDA GPU (skipped elsewhere)


def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")


@pytest.mark.gpu
@pytest.mark.parametrize("half", [None, False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_gpu_counts_equal_reference(half, dtype):
    _need_cuda()
    rng = np.random.default_rng(31)
    data = _clustered(rng, 20_000, 128).astype(dtype)
    ids = np.arange(0, 20_000, 40)
    anchors = data[ids]
    ref = range_counts_reference(anchors, data, DEFAULT_RADII, anchor_ids=ids)
    got = jt.range_counts_torch(anchors, [(0, data[:7000]), (7000, data[7000:])], DEFAULT_RADII,
                                anchor_ids=ids, device="cuda", half=half, tile=4096)
    np.testing.assert_array_equal(got, ref)
    # blocks already on the device
    dev_blocks = [(0, torch.from_numpy(data).cuda())]
    np.testing.assert_array_equal(jt.range_counts_torch(anchors, dev_blocks, DEFAULT_RADII, anchor_ids=ids,
                                                        device="cuda", half=half), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gpu_adversarial_near_threshold_pairs(half, dtype):
    _need_cuda()
    rng = np.random.default_rng(7)
    anchors, points = _adversarial(rng, n_extra=5000)
    anchors, points = anchors.astype(dtype), points.astype(dtype)
    np.testing.assert_array_equal(
        jt.range_counts_torch(anchors, [(0, points)], DEFAULT_RADII, device="cuda", half=half),
        range_counts_reference(anchors, points, DEFAULT_RADII))


@pytest.mark.gpu
def test_gpu_mccs_sums_match_reference_and_cpu():
    _need_cuda()
    rng = np.random.default_rng(32)
    points = _clustered(rng, 20_000, 64).astype(np.float16)
    ids = np.arange(0, 20_000, 100)
    anchors = points[ids]
    ref = mccs_sums_reference(anchors, points, 0.35, anchor_ids=ids)
    outs = [jt.mccs_sums_torch(anchors, blocks, 0.35, anchor_ids=ids, device="cuda", half=half, tile=tile)
            for half in (None, False)
            for blocks, tile in (([(0, points)], None), (_random_blocks(rng, points, 0), 1000))]
    for o in outs:
        assert o.tobytes() == outs[0].tobytes()
    np.testing.assert_allclose(outs[0], ref, rtol=1e-9)
    # CPU and GPU evaluate arccos / expm1 with different libraries: equal to an ulp or so
    np.testing.assert_allclose(_sums(anchors, points, 0.35, anchor_ids=ids), outs[0], rtol=1e-13)


@pytest.mark.gpu
def test_gpu_under_deterministic_algorithms():
    _need_cuda()
    rng = np.random.default_rng(33)
    points = _clustered(rng, 5000, 32).astype(np.float32)
    anchors = points[:50]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = jt.range_counts_torch(anchors, points, DEFAULT_RADII, anchor_ids=np.arange(50), device="cuda")
        sums = jt.mccs_sums_torch(anchors, points, 0.3, anchor_ids=np.arange(50), device="cuda")
    finally:
        torch.use_deterministic_algorithms(was)
    np.testing.assert_array_equal(got, range_counts_reference(anchors, points, DEFAULT_RADII,
                                                              anchor_ids=np.arange(50)))
    np.testing.assert_allclose(sums, mccs_sums_reference(anchors, points, 0.3, anchor_ids=np.arange(50)),
                               rtol=1e-9)


@pytest.mark.gpu
def test_gpu_backend_auto_picks_torch_cuda():
    _need_cuda()
    backend.gpu_available.cache_clear()
    assert backend.gpu_available() is True
    assert backend.resolve_kernel("auto") == "torch-cuda"
