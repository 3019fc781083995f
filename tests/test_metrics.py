"""Exact k-NN kernels and the sample-based metrics (tasks/metrics/): against float64 brute force,
the prdc package, an independent KID implementation, and through the CLI."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from modeaudit.tasks.join.threads import thread_budget
from modeaudit.tasks.metrics import compute_metrics
from modeaudit.tasks.metrics.birthday import birthday_batch, duplicate_threshold, near_duplicate_pairs
from modeaudit.tasks.metrics.kid import kid
from modeaudit.tasks.metrics.knn import (
    ball_counts, ball_counts_reference, knn_distances, knn_distances_reference, knn_self, pair_distances_reference,
)
from modeaudit.tasks.metrics.manifold import manifold_counts


def _blocks(x, rows):
    return [(o, x[o:o + rows]) for o in range(0, len(x), rows)]


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random_sets(seed, n=700, m=600, d=19):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d)).astype(np.float32)
    b = (rng.standard_normal((m, d)) * 0.9 + 0.1).astype(np.float32)
    # Duplicates inside a set and across sets: distance 0 pairs, shared radii.
    a[5] = a[17]
    a[100] = a[17]
    b[3] = a[40]
    return a, b


def _grid_sets(seed, distance):
    """Rows whose float64 distances are exact, so that many pairs lie exactly on k-NN spheres."""
    rng = np.random.default_rng(seed)
    if distance == "euclidean":
        return (rng.integers(-2, 3, (400, 6)).astype(np.float32),
                rng.integers(-2, 3, (300, 6)).astype(np.float32))

    def rows(n):
        # Four entries of +-1/2: unit norm, and every dot product a multiple of 1/4.
        z = np.zeros((n, 8), np.float32)
        for i in range(n):
            z[i, rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return z
    return rows(400), rows(300)


def _case(data, distance, seed, k):
    """A kernel test's sets and float64 answers: random rows with duplicates, or grid rows with many pairs
    exactly on the k-NN spheres (seed + 1); returns a, b, their k-NN distances and the ball counts."""
    if data == "grid":
        a, b = _grid_sets(seed + 1, distance)
    else:
        a, b = _random_sets(seed)
        if distance == "angular":
            a, b = _unit(a), _unit(b)
    ra = knn_distances_reference(a, k, distance)
    rb = knn_distances_reference(b, k, distance)
    return a, b, ra, rb, ball_counts_reference(a, b, ra[:, -1], rb[:, -1], distance).as_tuple()


@pytest.mark.parametrize("distance", ["euclidean", "angular"])
def test_knn_and_ball_counts_equal_float64_brute_force(distance):
    a, b = _random_sets(0)
    if distance == "angular":
        a, b = _unit(a), _unit(b)
    k = 5
    ref_a = knn_distances_reference(a, k, distance)
    got_a = knn_distances(a, _blocks(a, 97), k, distance=distance, query_ids=np.arange(len(a)))
    np.testing.assert_array_equal(got_a, ref_a)
    np.testing.assert_array_equal(knn_self(a, k, distance=distance, tile=256), ref_a)
    # Duplicates are neighbours (at 0, or at arccos of a float32 row's |a|^2 ~ 1 - 1e-9
    # for angular); the row itself is not.
    assert ref_a[5, 0] == ref_a[17, 0] == ref_a[100, 0] == pair_distances_reference(a[5:6], a[5:6], distance)[0, 0]
    # Rows 5, 17 and 100 are copies: two neighbours at that distance each, not three.
    assert ref_a[5, 0] < 1e-4 and ref_a[5, 1] == ref_a[5, 0] and ref_a[5, 2] > ref_a[5, 0]
    rb = knn_distances_reference(b, k, distance)[:, -1]
    ref = ball_counts_reference(a, b, ref_a[:, -1], rb, distance).as_tuple()
    got = ball_counts(a, _blocks(b, 128), ref_a[:, -1], rb, distance=distance).as_tuple()
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    assert all(r.sum() > 0 for r in ref)


@pytest.mark.parametrize("distance", ["euclidean", "angular"])
def test_points_exactly_on_a_sphere_are_outside(distance):
    a, b = _grid_sets(1, distance)
    k = 3
    ra = knn_distances_reference(a, k, distance)
    np.testing.assert_array_equal(knn_distances(a, _blocks(a, 50), k, distance=distance,
                                                query_ids=np.arange(len(a))), ra)
    np.testing.assert_array_equal(knn_self(a, k, distance=distance, tile=128), ra)
    rb = knn_distances_reference(b, k, distance)[:, -1]
    dist = pair_distances_reference(a, b, distance)
    on_a = dist == ra[:, -1:]
    on_b = dist == rb[None, :]
    assert on_a.sum() > 100 and on_b.sum() > 100  # the data really puts points on the spheres
    got = ball_counts(a, _blocks(b, 64), ra[:, -1], rb, distance=distance)
    np.testing.assert_array_equal(got.in_a_balls_count, (dist < ra[:, -1:]).sum(axis=1))
    np.testing.assert_array_equal(got.a_balls_containing, (dist < ra[:, -1:]).sum(axis=0))
    np.testing.assert_array_equal(got.in_b_balls_count, (dist < rb[None, :]).sum(axis=0))
    np.testing.assert_array_equal(got.b_balls_containing, (dist < rb[None, :]).sum(axis=1))
    # and "<=" would have counted differently
    assert not np.array_equal(got.in_a_balls_count, (dist <= ra[:, -1:]).sum(axis=1))


def test_blocked_equals_one_block_on_any_thread_count(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1300, 40)).astype(np.float32)
    # 60 copies of one row: more near-ties than knn_self's candidate buffer holds.
    x[200:260] = x[7]
    y = rng.standard_normal((2600, 40)).astype(np.float32)  # > one 2048-row point tile
    out, selfs = {}, {}
    # Tile threads run only where BLAS is single-threaded (as in the audit's Dask workers).
    from threadpoolctl import threadpool_limits
    limit = threadpool_limits(limits=1, user_api="blas")
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("MODEAUDIT_THREADS", threads)
        for rows in (None, 333, 2048):
            blocks = [(0, y)] if rows is None else _blocks(y, rows)
            kd = knn_distances(x, blocks, 4)
            c = ball_counts(x, blocks, kd[:, -1] * 1.5, 7.0).as_tuple()
            out[threads, rows] = (kd, c)
        for tile in (1024, 300):
            selfs[threads, tile] = knn_self(x, 4, tile=tile)
    limit.restore_original_limits()
    ref_kd, ref_c = out["1", None]
    assert ref_c[0].sum() > 0 and ref_c[2].sum() > 0
    for kd, c in out.values():
        np.testing.assert_array_equal(kd, ref_kd)
        for g, r in zip(c, ref_c):
            np.testing.assert_array_equal(g, r)
    ref_self = knn_distances(x, _blocks(x, 500), 4, query_ids=np.arange(len(x)))
    assert np.all(ref_self[200:260] == 0.0)
    for v in selfs.values():
        np.testing.assert_array_equal(v, ref_self)


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_density_coverage_equal_prdc(k, capsys):
    import prdc  # a test dependency (pyproject's test extra): fail, do not skip, without it
    rng = np.random.default_rng(3)
    real = rng.standard_normal((1500, 64)).astype(np.float32)
    fake = (rng.standard_normal((1200, 64)) * 1.2 + 0.15).astype(np.float32)
    ref = prdc.compute_prdc(real, fake, k)
    got = compute_metrics(real, fake, k, block_rows=500, kid_subsets=2)
    for key in ("precision", "recall", "density", "coverage"):
        assert abs(got[key] - ref[key]) <= 1e-6, (key, got[key], ref[key])
    # The sets differ, so the metrics are not all 1: the comparison has something to compare.
    assert got["precision"] < 0.99 and got["coverage"] < 0.99


def _kid_independent(real, fake, subsets, size, seed):
    """torch-fidelity's KID (metric_kid.py) written out afresh: subsets drawn with one
    RandomState (real then fake, without replacement), kernel (x.y/d + 1)^3, unbiased
    MMD^2 with the cross term's diagonal kept, mean and population std."""
    rng = np.random.RandomState(seed)
    d = real.shape[1]
    vals = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), size, replace=False)].astype(np.float64)
        y = fake[rng.choice(len(fake), size, replace=False)].astype(np.float64)
        kxx = (np.einsum("id,jd->ij", x, x) / d + 1.0) ** 3
        kyy = (np.einsum("id,jd->ij", y, y) / d + 1.0) ** 3
        kxy = (np.einsum("id,jd->ij", x, y) / d + 1.0) ** 3
        off = kxx[~np.eye(size, dtype=bool)].sum() + kyy[~np.eye(size, dtype=bool)].sum()
        vals.append(off / (size * (size - 1)) - 2.0 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def test_kid_equals_independent_implementation():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((500, 16)).astype(np.float32)
    fake = (rng.standard_normal((450, 16)) + 0.3).astype(np.float32)
    got = kid(real, fake, subsets=7, subset_size=200, seed=2020)
    mean, std = _kid_independent(real, fake, 7, 200, 2020)
    assert got["kid"] == pytest.approx(mean, rel=1e-10)
    assert got["kid_std"] == pytest.approx(std, rel=1e-8)
    assert got["kid"] > 10 * got["kid_std"] / math.sqrt(7)  # shifted sets: clearly positive
    # Fewer rows than the subset size: the subset shrinks to the smaller set.
    assert kid(real, fake, subsets=2, subset_size=1000)["kid_subset_size"] == 450


def test_kid_whole_matrices_equal_the_subsets_sums(tmp_path, monkeypatch):
    """Overlapping subsets (sets a few times the subset size): the kernel matrices of the whole sets are formed
    once, tile by tile, and every subset's sums read from them. Same estimator as summing each subset's own
    matrices; a set in a file gives the array's bits; many tiles, partial ones, sets of unequal size."""
    from modeaudit.tasks.metrics import kid as kid_mod
    from modeaudit.flows.metrics_cli import load_rows
    rng = np.random.default_rng(8)
    real = rng.standard_normal((530, 24)).astype(np.float32)
    fake = (rng.standard_normal((470, 24)) * 1.1 + 0.05).astype(np.float32)
    kw = dict(subsets=9, subset_size=300, seed=11)
    assert kid_mod._whole_matrices_cheaper(530, 470, 24, 300, 9)
    assert not kid_mod._whole_matrices_cheaper(10_000, 10_000, 128, 1000, 100)   # the audit's default sizes
    assert not kid_mod._whole_matrices_cheaper(14_000, 14_000, 16, 10_000, 10_000)  # memberships over 256 MiB
    monkeypatch.setattr(kid_mod, "GRAM_TILE", 64)       # 9 x 8 tiles, the last ones partial
    whole = kid(real, fake, **kw)
    mean, std = _kid_independent(real, fake, 9, 300, 11)
    assert whole["kid"] == pytest.approx(mean, rel=1e-10) and whole["kid_std"] == pytest.approx(std, rel=1e-8)
    np.save(tmp_path / "r.npy", real)
    ff = load_rows(str(tmp_path / "r.npy"), "--real", "euclidean", by_path=True)
    assert kid(ff, fake, **kw) == whole
    monkeypatch.setattr(kid_mod, "GATHER_BYTES", 64 * 24 * 4)     # the file read tile by tile
    assert kid(ff, fake, **kw) == whole
    # k(x, x) far above every other value (long, nearly orthogonal rows, degree 8): the diagonal must never be
    # summed and subtracted. Every subset's MMD^2_u here is exactly 1 + 1 - 2 = 0 (a review found -0.67).
    eye = 10.0 * np.eye(12)
    spiky = dict(subsets=4, subset_size=4, degree=8, gamma=1.0, coef0=1.0, seed=0)
    assert kid_mod._whole_matrices_cheaper(6, 6, 12, 4, 4) and kid(eye[:6], eye[6:], **spiky)["kid"] == 0.0
    long_rows = 10.0 * rng.standard_normal((60, 512))
    wide = dict(subsets=40, subset_size=10, degree=8, gamma=1.0 / 512)
    spiky_whole = kid(long_rows[:30], long_rows[30:], **wide)["kid"]
    monkeypatch.setattr(kid_mod, "_whole_matrices_cheaper", lambda *a: False)
    assert kid(eye[:6], eye[6:], **spiky)["kid"] == 0.0
    assert kid(long_rows[:30], long_rows[30:], **wide)["kid"] == pytest.approx(spiky_whole, rel=1e-12)
    per_subset = kid(real, fake, **kw)
    assert per_subset["kid"] == pytest.approx(whole["kid"], rel=1e-11)
    assert per_subset["kid_std"] == pytest.approx(whole["kid_std"], rel=1e-9)


def test_kid_on_threads_gives_the_serial_bits(tmp_path, monkeypatch):
    """Where BLAS runs one thread a call (a Dask worker), KID spreads its products over threads: the same bits
    as one thread, on both paths and for a set read from a file in batches of subsets. With a multi-threaded
    BLAS it stays serial."""
    from threadpoolctl import threadpool_limits

    from modeaudit.flows.metrics_cli import load_rows
    from modeaudit.tasks.metrics import kid as kid_mod
    rng = np.random.default_rng(9)
    real = rng.standard_normal((900, 20)).astype(np.float32)
    fake = (rng.standard_normal((700, 20)) * 1.2).astype(np.float32)
    np.save(tmp_path / "f.npy", fake)
    ff = load_rows(str(tmp_path / "f.npy"), "--fake", "euclidean", by_path=True)
    cases = {"whole": (real, fake, dict(subsets=12, subset_size=400)),
             "per subset": (real, fake, dict(subsets=12, subset_size=100)),
             "file, batches": (real, ff, dict(subsets=12, subset_size=100))}
    assert kid_mod._whole_matrices_cheaper(900, 700, 20, 400, 12)
    assert not kid_mod._whole_matrices_cheaper(900, 700, 20, 100, 12)
    monkeypatch.setattr(kid_mod, "GRAM_TILE", 256)
    monkeypatch.setattr(kid_mod, "GATHER_BYTES", 3 * 100 * 20 * 4)   # 3 subsets a batch
    out = {}
    limit = threadpool_limits(limits=1, user_api="blas")
    try:
        for threads in ("1", "2", "3"):
            monkeypatch.setenv("MODEAUDIT_THREADS", threads)
            assert kid_mod._parallel_ok() == (threads != "1")
            for name, (a, b, kw) in cases.items():
                out[threads, name] = kid(a, b, **kw)
    finally:
        limit.restore_original_limits()
    for name in cases:
        assert out["1", name] == out["2", name] == out["3", name], name
    assert out["1", "file, batches"] == out["1", "per subset"]
    with threadpool_limits(limits=2, user_api="blas"):
        from modeaudit.tasks.join.threads import blas_threads
        monkeypatch.setenv("MODEAUDIT_THREADS", "2")
        assert kid_mod._parallel_ok() == (blas_threads() == 1)    # a two-thread BLAS (two cores): serial


@pytest.mark.parametrize("degree, gamma, coef0", [(3, None, 1.0), (2, 0.05, 0.5), (1, None, 2.0), (2.5, 0.01, 3.0)])
def test_mmd2_one_pass_sum_equals_the_matrix_form(degree, gamma, coef0):
    """The fused one-triangle sum (integer degrees) and the matrix form (any degree) are one estimator."""
    from modeaudit.tasks.metrics.kid import mmd2_unbiased
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((300, 24)), rng.standard_normal((300, 24)) * 1.2 + 0.1
    g = 1.0 / 24 if gamma is None else gamma
    kxx, kyy, kxy = ((a @ b.T * g + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    off = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
    want = off / (300 * 299) - 2.0 * kxy.mean()
    assert np.isfinite(want) and mmd2_unbiased(x, y, degree, gamma, coef0) == pytest.approx(want, rel=1e-11, abs=1e-14)


def test_birthday_support_counts_near_duplicates_exactly():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((800, 12)).astype(np.float32)
    fake = rng.standard_normal((700, 12)).astype(np.float32)
    # 60 fake rows are near-copies of 6 rows: each such row has 9 neighbours closer than
    # tau, more than k, so they take the full-count path.
    fake[100:160] = np.repeat(fake[:6], 10, axis=0) + 1e-4 * rng.standard_normal((60, 12)).astype(np.float32)
    k = 5
    m = manifold_counts(real, fake, k)
    tau = duplicate_threshold(m.real_knn, 0.01)
    assert tau == np.sort(knn_distances_reference(real, 1)[:, 0])[int(0.01 * 799)]
    dist = pair_distances_reference(fake, fake)
    np.fill_diagonal(dist, np.inf)
    brute = int((dist < tau).sum()) // 2
    assert brute >= 6 * 45
    assert near_duplicate_pairs(fake, m.fake_knn, tau, blocks=_blocks(fake, 128)) == brute
    s = birthday_batch(brute, len(fake))
    p = brute / (len(fake) * (len(fake) - 1) / 2)
    assert p * s * (s - 1) / 2 >= math.log(2) > p * (s - 1) * (s - 2) / 2
    out = compute_metrics(real, fake, k, kid_subsets=2)
    assert out["dup_pairs_fake"] == brute and out["support_size"] == s * s
    assert out["support_size"] < out["support_size_real"]  # the repeated fake rows shrink the support
    assert birthday_batch(0, 10) is None


def _write_run_folder(root, emb):
    from modeaudit.storage.store import ArraySpec, RunStore, SetLayout
    lay = SetLayout("T", len(emb), 256, (ArraySpec("emb", "float16", emb.shape[1]),))
    store = RunStore.create_or_open(root, {"test": 1}, [lay])
    for i, a, b in lay.shards():
        store.write_shard("T", i, {"emb": emb[a:b]})


def test_cli_writes_metrics_json(tmp_path, capsys):
    from modeaudit.flows.cli import main
    rng = np.random.default_rng(6)
    real = _unit(rng.standard_normal((600, 24)))
    fake = _unit(rng.standard_normal((500, 24)) + 0.2)
    np.save(tmp_path / "real.npy", real)
    _write_run_folder(tmp_path / "run", fake)
    rc = main(["metrics", "--real", str(tmp_path / "real.npy"), "--fake", str(tmp_path / "run"), "--k", "4",
               "--distance", "angular", "--out", str(tmp_path / "out"), "--kid-subsets", "3",
               "--block-rows", "200"])
    assert rc == 0
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("precision", "recall", "density", "coverage", "kid", "support_size"):
        assert key in got
    # The run folder's T rows are the float16 rows as stored.
    want = compute_metrics(real, fake.astype(np.float16).astype(np.float32), 4, "angular", kid_subsets=3)
    for key in ("precision", "recall", "density", "coverage", "kid", "kid_std", "support_size"):
        assert got[key] == want[key], key
    assert got["k"] == 4 and got["distance"] == "angular" and got["n_fake"] == 500


@pytest.mark.parametrize("case", ["width", "missing", "few_rows", "nan", "beyond_float32"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    import warnings

    from modeaudit.flows.cli import main
    rng = np.random.default_rng(7)
    np.save(tmp_path / "real.npy", rng.standard_normal((50, 8)).astype(np.float32))
    fake = {"width": rng.standard_normal((50, 9)), "few_rows": rng.standard_normal((3, 8)),
            "nan": np.full((20, 8), np.nan), "beyond_float32": np.full((20, 8), 1e300)}.get(case)
    if fake is not None:
        np.save(tmp_path / "fake.npy", fake)
    # A warning (numpy's overflow in a cast) would print lines of its own before the error line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["metrics", "--real", str(tmp_path / "real.npy"), "--fake", str(tmp_path / "fake.npy"),
                   "--out", str(tmp_path / "out")])
    assert not caught, [str(w.message) for w in caught]
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("modeaudit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_cli_image_folders_with_a_descriptor(tmp_path, capsys):
    """--real/--fake as folders of images, embedded with --descriptor through the feature cache."""
    from PIL import Image

    from modeaudit.flows.cli import main
    from modeaudit.tasks.models import image_folders as imf
    rng = np.random.default_rng(8)
    for name, shift in (("real", 0), ("fake", 12)):
        (tmp_path / name).mkdir()
        for i in range(30):
            img = np.clip(rng.integers(0, 200, (16, 16, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / name / f"im{i:03d}.png")
    args = ["metrics", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--k", "3",
            "--descriptor", "torch:tiny-cnn", "--cache-dir", str(tmp_path / "cache"), "--kid-subsets", "2"]
    assert main(args + ["--out", str(tmp_path / "out1")]) == 0
    got = json.loads((tmp_path / "out1" / "metrics.json").read_text())
    desc = {"spec": "torch:tiny-cnn", "options": {}}
    from modeaudit.tasks.models.descriptors import DESCRIPTORS
    desc["options"] = DESCRIPTORS.resolve_options("torch:tiny-cnn", {})
    rows = {}
    for name in ("real", "fake"):
        listing = imf.list_images(tmp_path / name, name)
        size = imf.target_size(listing, imf.descriptor_of(desc), "torch:tiny-cnn", name)
        r, ok = imf.embed_block(desc, listing.root, [(f.rel, f.sha256) for f in listing.files], size, name)
        assert ok.all()
        rows[name] = r
    want = compute_metrics(rows["real"], rows["fake"], 3, kid_subsets=2)
    for key in ("precision", "recall", "density", "coverage", "kid", "support_size"):
        assert got[key] == want[key], key
    assert got["n_real"] == got["n_fake"] == 30 and got["dim"] == rows["real"].shape[1]
    assert 0 < got["recall"] < 1 or 0 < got["precision"] < 1  # the sets overlap in part: not a degenerate case
    # Both folders are cached now; a second run reads them from the cache and writes the same numbers.
    assert len([d for d in (tmp_path / "cache").rglob("*") if d.is_dir()]) >= 2
    assert main(args + ["--out", str(tmp_path / "out2")]) == 0
    again = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("real", "fake")} == \
        {k: v for k, v in got.items() if k not in ("real", "fake")}
    capsys.readouterr()
    # A folder of images without --descriptor: one line, exit 2, nothing written.
    assert main(args[:7] + args[9:] + ["--out", str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modeaudit: error: --real") and "--descriptor" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out3").exists()


def test_python_api_metrics(tmp_path):
    """modeaudit.metrics: arrays or paths in, the metrics.json dict out; bad input raises ConfigError;
    the caller's BLAS threads are left as they were."""
    import modeaudit
    from threadpoolctl import threadpool_info
    rng = np.random.default_rng(9)
    real = rng.standard_normal((300, 10)).astype(np.float32)
    fake = (rng.standard_normal((250, 10)) + 0.3).astype(np.float32)
    blas = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    got = modeaudit.metrics(real, fake, k=4, kid_subsets=2)
    after = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert blas and {f: after[f] for f in blas} == blas
    want = compute_metrics(real, fake, 4, kid_subsets=2)
    for key in ("precision", "recall", "density", "coverage", "kid", "support_size"):
        assert got[key] == want[key], key
    assert got["real"] == "array (300, 10)" and 0 < got["precision"] < 1
    np.save(tmp_path / "fake.npy", fake)
    from_path = modeaudit.metrics(real, tmp_path / "fake.npy", k=4, kid_subsets=2, out=tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == from_path and from_path["precision"] == got["precision"]
    with pytest.raises(modeaudit.ConfigError, match="width"):
        modeaudit.metrics(real, fake[:, :9], out=tmp_path / "bad")
    with pytest.raises(modeaudit.ConfigError, match="NaN"):
        modeaudit.metrics(real, np.full((20, 10), np.nan), out=tmp_path / "bad")
    import warnings
    with warnings.catch_warnings(record=True) as caught, \
            pytest.raises(modeaudit.ConfigError, match="too large for float32"):
        warnings.simplefilter("always")
        modeaudit.metrics(real, np.full((20, 10), 1e300), out=tmp_path / "bad")
    assert not caught, [str(w.message) for w in caught]   # the error alone, no overflow warning before it
    with pytest.raises(modeaudit.ConfigError, match="unknown setting"):
        modeaudit.metrics(real, fake, kid_subset=3)
    # Values argparse never sees (a TypeError, AttributeError or ZeroDivisionError from deep inside before)
    for kw, msg in (({"block_rows": 2.5}, "--block-rows must be a positive integer"),
                    ({"kid_seed": 1.5}, "--kid-seed must be a whole number"),
                    ({"kid_subsets": 2.0}, "--kid-subsets must be a positive integer"),
                    ({"client": "x"}, "client must be a distributed.Client")):
        with pytest.raises(modeaudit.ConfigError, match=msg):
            modeaudit.metrics(real, fake, out=tmp_path / "bad", **kw)
    with pytest.raises(modeaudit.ConfigError, match="n, d >= 1"):
        modeaudit.metrics(np.zeros((30, 0), np.float32), np.zeros((20, 0), np.float32), out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------
# the joins on Dask (tasks/metrics/engine.py) and on torch (tasks/metrics/knn_torch.py)


def _manifold_arrays(m):
    return (m.real_knn, m.fake_knn, m.fake_in_real_balls, m.real_ball_counts, m.real_in_fake_balls)


@pytest.fixture(scope="module")
def thread_client():
    """A 2-worker in-process Dask cluster (threads): the engine's tasks, scatter and merge without process starts."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


@pytest.mark.parametrize("distance", ["euclidean", "angular"])
def test_engine_on_dask_is_bit_identical_for_any_group_size(distance, thread_client):
    from modeaudit.tasks.metrics.engine import KnnEngine
    a, b = _random_sets(10)
    if distance == "angular":
        a, b = _unit(a), _unit(b)
    k = 4
    ref = _manifold_arrays(manifold_counts(a, b, k, distance))
    want = knn_distances_reference(a, k, distance)
    np.testing.assert_array_equal(ref[0], want)
    # group_rows 45: 16 groups, 136 self-join tasks (a task per pair of groups), the last group short
    for group_rows, block_rows in ((None, None), (45, 97), (250, 600), (699, 128), (5000, 64)):
        eng = KnnEngine(thread_client, "fast", block_rows=block_rows, group_rows=group_rows)
        got = _manifold_arrays(manifold_counts(a, b, k, distance, engine=eng))
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r)
            assert g.dtype == r.dtype


@pytest.mark.parametrize("distance", ["euclidean", "angular"])
@pytest.mark.parametrize("scores", ["float32", "bf16"])
def test_knn_self_pair_is_both_directions_of_the_cross_join(distance, scores):
    """Two groups of one set with ties on the spheres (grid rows): each side's k smallest distances to the other,
    then merged with each group's own self-join: the whole set's k-NN distances, exactly."""
    if scores == "bf16":
        pytest.importorskip("torch")
    from modeaudit.tasks.metrics.knn import knn_self_pair, merge_knn
    x, _ = _grid_sets(3, distance)
    k = 3
    ref = knn_distances_reference(x, k, distance)
    for cut in (0, 2, len(x) // 3, len(x) - 1):
        a, b = x[:cut], x[cut:]
        pa, pb = knn_self_pair(a, b, k, distance=distance, tile=64, scores=scores)
        assert pa.shape == (len(a), k) and pb.shape == (len(b), k)
        if len(b) >= k and len(a):
            np.testing.assert_array_equal(pa, knn_distances(a, b, k, distance=distance))
        if len(a) >= k:
            np.testing.assert_array_equal(pb, knn_distances(b, a, k, distance=distance))
        own = [knn_self(g, k, distance=distance, tile=64, scores=scores) for g in (a, b)]
        np.testing.assert_array_equal(np.concatenate([merge_knn([own[0], pa], k), merge_knn([own[1], pb], k)]), ref)


def test_cluster_self_join_forms_each_pair_once(thread_client, monkeypatch):
    """A task per pair of row groups: the GEMMs of a self-join on a cluster cover the upper triangle
    (about n^2 / 2 scores), not every query group against the whole set (n^2)."""
    from modeaudit.tasks.metrics import knn
    from modeaudit.tasks.metrics.engine import KnnEngine, pair_groups
    formed = []
    real_call = knn._Gemm.__call__

    def counting(self, r0, r1, c0, c1, out):
        formed.append((r1 - r0) * (c1 - c0))
        return real_call(self, r0, r1, c0, c1, out)

    monkeypatch.setattr(knn._Gemm, "__call__", counting)
    a, _ = _random_sets(4, n=2000)
    ref = knn_distances_reference(a, 4)
    got = KnnEngine(thread_client, "fast", group_rows=300).knn_self(a, 4)
    np.testing.assert_array_equal(got, ref)
    n = len(a)
    # 7 groups: 28 tasks; the diagonal tasks' tiles (1024 rows) hold their groups' whole squares
    assert len(pair_groups(n, 1, 300)) == 28
    assert n * n / 2 <= sum(formed) <= n * n / 2 + 7 * 300 * 300 / 2 + 1
    # Every pair of groups once, the diagonal included, and the default grouping gives enough tasks
    groups = pair_groups(10_000, 16)
    assert len(groups) >= 16 and len({(g[0], g[1]) for g in groups}) == len(groups)
    assert all(g[0][0] <= g[1][0] for g in groups)


def test_compute_metrics_on_a_two_process_cluster_equals_one_process(scheduler):
    """The conftest cluster: 2 worker processes, BLAS pinned as the CLI pins its workers'."""
    from distributed import Client
    rng = np.random.default_rng(11)
    real = rng.standard_normal((1400, 24)).astype(np.float32)
    fake = (rng.standard_normal((1100, 24)) * 0.8 + 0.1).astype(np.float32)
    fake[300:340] = fake[2]   # near-duplicates: the support-size pass has rows to count against the whole set
    for distance in ("euclidean", "angular"):
        ref = compute_metrics(real, fake, 5, distance, kid_subsets=2)
        assert ref["dup_pairs_fake"] > 0
        with Client(scheduler) as client:
            for group_rows in (None, 333):
                got = compute_metrics(real, fake, 5, distance, kid_subsets=2, client=client, group_rows=group_rows,
                                      block_rows=500)
                assert json.dumps(got) == json.dumps(ref), (distance, group_rows)


def test_cli_workers_1_and_2_write_byte_identical_metrics_json(tmp_path, capsys, scheduler):
    """In process, --workers 1, --workers 2 (local clusters started by the command) and --scheduler."""
    from modeaudit.flows.cli import main
    rng = np.random.default_rng(12)
    np.save(tmp_path / "real.npy", rng.standard_normal((1300, 16)).astype(np.float32))
    np.save(tmp_path / "fake.npy", (rng.standard_normal((1000, 16)) + 0.2).astype(np.float32))
    base = ["metrics", "--real", str(tmp_path / "real.npy"), "--fake", str(tmp_path / "fake.npy"), "--k", "4",
            "--kid-subsets", "2"]
    runs = {"here": [], "w1": ["--workers", "1"], "w2": ["--workers", "2", "--group-rows", "400"],
            "ext": ["--scheduler", scheduler, "--group-rows", "129"]}
    err = {}
    for name, extra in runs.items():
        assert main(base + ["--out", str(tmp_path / name)] + extra) == 0, name
        err[name] = capsys.readouterr().err
    # On a cluster the joins draw progress lines on stderr (the self-joins count pairs, the balls rows)
    for name in ("w1", "w2", "ext"):
        assert "k-NN radii: 100%" in err[name] and "pairs/s" in err[name] and "ball counts: 100%" in err[name], name
    assert "k-NN radii" not in err["here"]
    data = {name: (tmp_path / name / "metrics.json").read_bytes() for name in runs}
    assert data["w1"] == data["w2"] == data["ext"] == data["here"]
    assert 0 < json.loads(data["w2"])["precision"] < 1


def test_unit_rows_of_a_block_equal_the_whole_sets_rows():
    """Workers scale the rows they read; the bits must not depend on where a block starts."""
    from modeaudit.tasks.metrics.rows import unit_rows
    rng = np.random.default_rng(21)
    for d in (1, 7, 19, 33):
        x = rng.standard_normal((301, d)).astype(np.float32)
        x[5] *= np.float32(1e25)   # beyond float32's safe squares: scaled in float64
        x[6] *= np.float32(1e-25)
        whole = unit_rows(x)
        for lo, hi in ((0, 1), (3, 8), (5, 7), (17, 300), (299, 301)):
            np.testing.assert_array_equal(unit_rows(x[lo:hi].copy()), whole[lo:hi])
        np.testing.assert_allclose(np.linalg.norm(whole.astype(np.float64), axis=1), 1, rtol=1e-6)
    with pytest.raises(ValueError, match="all zeros"):
        unit_rows(np.zeros((2, 3)))


def test_feature_file_reads_what_loading_reads(tmp_path, monkeypatch):
    """A FeatureFile of a .npy, a float64 Zarr array and a run folder: ranges, blocks and take()."""
    import zarr

    from modeaudit.flows.metrics_cli import load_rows
    from modeaudit.tasks.metrics import rows
    from modeaudit.tasks.metrics.rows import FeatureFile, take_rows
    rng = np.random.default_rng(22)
    x = rng.standard_normal((1000, 13))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=x.shape, chunks=(128, 13), dtype="float64")
    z[:] = x
    _write_run_folder(tmp_path / "run", x)
    for path in (tmp_path / "x.npy", tmp_path / "x.zarr", tmp_path / "run"):
        whole = load_rows(str(path), "--real", "euclidean")
        ff = load_rows(str(path), "--real", "euclidean", by_path=True)
        assert isinstance(ff, FeatureFile) and ff.shape == whole.shape and whole.dtype == np.float32
        np.testing.assert_array_equal(ff.read(), whole)
        np.testing.assert_array_equal(ff.read(123, 456), whole[123:456])
        got = list(ff.blocks(300))
        assert [o for o, _ in got] == [0, 300, 600, 900]
        np.testing.assert_array_equal(np.concatenate([b for _, b in got]), whole)
        idx = rng.integers(0, 1000, 77)
        np.testing.assert_array_equal(take_rows(ff, idx), whole[idx])
        assert ff.pass_rows() > 1000
        with monkeypatch.context() as m:
            m.setattr(rows, "_PASS_BYTES", 64 * 13 * 4)   # 64-row passes: take() stitches 16 of them
            assert ff.pass_rows() == 64
            np.testing.assert_array_equal(ff.as_unit().take(idx), rows.unit_rows(whole)[idx])
    # KID reads a file's subset rows in batches of subsets (here two a batch): the same subsets, the same value.
    from modeaudit.tasks.metrics import kid as kid_mod
    ff = load_rows(str(tmp_path / "x.npy"), "--real", "euclidean", by_path=True)
    other = (x[::-1] * 0.9).astype(np.float32)
    np.save(tmp_path / "y.npy", other)
    ff2 = load_rows(str(tmp_path / "y.npy"), "--fake", "euclidean", by_path=True)
    want = kid(ff.read(), other, subsets=5, subset_size=100)
    monkeypatch.setattr(kid_mod, "GATHER_BYTES", 2 * 100 * 13 * 4)
    assert kid(ff, ff2, subsets=5, subset_size=100) == want == kid(ff.read(), ff2, subsets=5, subset_size=100)
    bad = x.copy()
    bad[700, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    from modeaudit.flows.metrics_cli import _Bad
    with pytest.raises(_Bad, match=r"1 row\(s\) with NaN or Inf \(first: row 700\)"):
        load_rows(str(tmp_path / "bad.npy"), "--fake", "euclidean", by_path=True)


def test_feature_file_notices_a_file_that_changed(tmp_path):
    """A worker must not compute on another file than the one checked: identity() tells, read() refuses."""
    from modeaudit.flows.metrics_cli import load_rows
    x = np.random.default_rng(24).standard_normal((300, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ff = load_rows(str(tmp_path / "x.npy"), "--real", "euclidean", by_path=True)
    assert ff.path == str((tmp_path / "x.npy").resolve()) and ff.identity() == ("npy", 300, 8, ff.identity()[3])
    before = ff.identity()
    np.save(tmp_path / "x.npy", x[:200])
    assert ff.identity() != before
    with pytest.raises(OSError, match="changed since it was checked"):
        ff.read(100, 300)


def test_kid_takes_what_numpy_takes_and_the_parser_loads_no_numba():
    import subprocess
    import sys
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(25)
    x, y = rng.standard_normal((60, 5)), rng.standard_normal((70, 5))
    assert kid(torch.from_numpy(x), torch.from_numpy(y), subsets=3, subset_size=50) == kid(x, y, subsets=3,
                                                                                             subset_size=50)
    code = "import sys; from modeaudit.flows.cli import build_parser; build_parser(); print('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_cluster_metrics_leave_file_rows_to_the_workers(tmp_path, capsys, monkeypatch, thread_client):
    """With a client, .npy rows are read by the tasks: nothing the size of a set is sent from here.
    A worker that cannot open the file makes the command fall back to sending it, with one line."""
    from modeaudit.flows import metrics_cli
    from modeaudit.tasks.join import parallel
    rng = np.random.default_rng(23)
    real = rng.standard_normal((1500, 96)).astype(np.float32)
    fake = (rng.standard_normal((1200, 96)) * 0.9).astype(np.float32)
    fake[100:130] = fake[7]
    np.save(tmp_path / "real.npy", real)
    np.save(tmp_path / "fake.npy", fake)
    sent = []
    scatter = parallel._scatter

    def spy(client, a, cache):
        if isinstance(a, np.ndarray):
            sent.append(a.nbytes)
        return scatter(client, a, cache)
    monkeypatch.setattr(parallel, "_scatter", spy)
    from modeaudit.tasks.metrics import rows
    read_at, at_calls = rows.FileRowsAt.read, []
    # The support size's rows with k near-duplicates (fake[100:130] and fake[7]) are read by the tasks too.
    monkeypatch.setattr(rows.FileRowsAt, "read", lambda self, lo=0, hi=None: at_calls.append(len(self.ids))
                        or read_at(self, lo, hi))
    kw = dict(k=4, kid_subsets=3, group_rows=300)
    for distance in ("euclidean", "angular"):
        here = metrics_cli.metrics_of(str(tmp_path / "real.npy"), str(tmp_path / "fake.npy"), distance=distance, **kw)
        sent.clear()
        got = metrics_cli.metrics_of(str(tmp_path / "real.npy"), str(tmp_path / "fake.npy"), distance=distance,
                                     client=thread_client, **kw)
        assert json.dumps(got) == json.dumps(here), distance
        assert got["dup_pairs_fake"] > 0 and max(at_calls) >= 31
        assert sent and max(sent) < fake.nbytes / 4, sent    # radii and ids only
    monkeypatch.setattr(metrics_cli, "_probe_read", lambda rows, want: "FileNotFoundError: not on this machine")
    sent.clear()
    got = metrics_cli.metrics_of(str(tmp_path / "real.npy"), str(tmp_path / "fake.npy"), client=thread_client, **kw)
    err = capsys.readouterr().err
    assert err.count("cannot open it") == 2 and "not on this machine" in err
    assert max(sent) >= fake.nbytes
    assert got["precision"] == metrics_cli.metrics_of(str(tmp_path / "real.npy"), str(tmp_path / "fake.npy"),
                                                      **kw)["precision"]


@pytest.mark.parametrize("args, msg", [
    (["--scheduler", "tcp://127.0.0.1:1"], "cannot reach the Dask scheduler"),
    (["--scheduler", "not-an-address"], "not a Dask scheduler address"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "give one of them"),
    (["--workers", "0"], "--workers must be a positive integer"),
    (["--kernel", "reference"], "invalid choice"),
])
def test_cli_bad_cluster_settings_exit_2_with_one_line(tmp_path, capsys, args, msg):
    from modeaudit.flows.cli import main
    rng = np.random.default_rng(13)
    for name in ("real", "fake"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((50, 8)).astype(np.float32))
    with pytest.raises(SystemExit) if "invalid choice" in msg else _no_raise() as ex:
        rc = main(["metrics", "--real", str(tmp_path / "real.npy"), "--fake", str(tmp_path / "fake.npy"),
                   "--out", str(tmp_path / "out")] + args)
    rc = ex.value.code if ex is not None else rc
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("modeaudit: error: ") and err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "out").exists()


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_metric_kernels_are_the_gemm_ones():
    from modeaudit.tasks.join.backend import metric_kernel
    from modeaudit.tasks.plan import KERNELS, METRIC_KERNELS
    assert set(METRIC_KERNELS) <= set(KERNELS) and "fast" in METRIC_KERNELS
    assert metric_kernel("fast") == "fast"
    for bad in ("reference", "numpy"):
        with pytest.raises(ValueError, match="no k-NN form"):
            metric_kernel(bad)


def test_auto_picks_the_bf16_gemm_only_for_wide_rows_on_a_cpu_with_bf16_matmul(monkeypatch):
    pytest.importorskip("torch")
    from modeaudit.tasks.join import backend
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    monkeypatch.setattr(backend, "cpu_has_bf16_matmul", lambda: True)
    many = backend.LOWPREC_MIN_PAIRS
    assert backend.metric_kernel("lowprec") == "lowprec"
    assert backend.metric_kernel("auto", 2048, many) == "lowprec"
    assert backend.metric_kernel("auto", backend.LOWPREC_MIN_DIM, many) == "lowprec"
    assert backend.metric_kernel("auto", backend.LOWPREC_MIN_DIM - 1, many) == "fast"
    assert backend.metric_kernel("auto", 2048, many - 1) == "fast"
    assert backend.metric_kernel("auto") == "fast"          # size unknown
    monkeypatch.setattr(backend, "cpu_has_bf16_matmul", lambda: False)
    assert backend.metric_kernel("auto", 2048, many) == "fast"
    monkeypatch.setattr(backend, "_torch_installed", lambda: False)
    with pytest.raises(ValueError, match="needs torch|which is not installed"):
        backend.metric_kernel("lowprec")


@pytest.mark.parametrize("flags, bf16", [("fpu avx512f amx_bf16 amx_tile", True),
                                         ("fpu avx512f avx512_bf16 avx512_vnni", True),
                                         ("fpu avx2 fma avx512_vnni", False)])
def test_bf16_matmul_units_are_read_from_cpuinfo(tmp_path, monkeypatch, flags, bf16):
    from modeaudit.tasks.join import backend
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    backend.cpu_has_bf16_matmul.cache_clear()
    try:
        assert backend.cpu_has_bf16_matmul() == bf16
    finally:
        backend.cpu_has_bf16_matmul.cache_clear()


@pytest.mark.parametrize("distance", ["euclidean", "angular"])
@pytest.mark.parametrize("data", ["random", "grid"])
def test_bf16_gemm_kernels_equal_float64_brute_force(distance, data, monkeypatch):
    """scores="bf16" (the lowprec kernel): a ~15x wider band, the same exact radii and counts."""
    pytest.importorskip("torch")
    from modeaudit.tasks.metrics import knn as K
    k = 5
    a, b, ra, rb, ref = _case(data, distance, 24, k)
    for qt, pt in ((K._BF16_QUERY_TILE, K._BF16_POINT_TILE), (64, 96)):   # one tile; many (bounds per tile)
        monkeypatch.setattr(K, "_BF16_QUERY_TILE", qt)
        monkeypatch.setattr(K, "_BF16_POINT_TILE", pt)
        got = knn_distances(a, _blocks(a, 150), k, distance=distance, query_ids=np.arange(len(a)), scores="bf16")
        np.testing.assert_array_equal(got, ra)
        c = ball_counts(a, _blocks(b, 128), ra[:, -1], rb[:, -1], distance=distance, scores="bf16").as_tuple()
        for g, r in zip(c, ref):
            np.testing.assert_array_equal(g, r)
    for tile in (None, 100):
        np.testing.assert_array_equal(knn_self(a, k, distance=distance, tile=tile, scores="bf16"), ra)
    # Diagonal tiles cut into pieces (split_diagonal), by one to three tile threads (each with its own lists,
    # merged before the exact re-checks).
    monkeypatch.setattr(K, "_BF16_MIN_DIAG", 16)
    for threads in (1, 2, 3):
        with thread_budget(threads):
            np.testing.assert_array_equal(knn_self(a, k, distance=distance, tile=100, scores="bf16"), ra)
    # float32 tile threads (single-threaded BLAS, as on a Dask worker) merge their lists the same way
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"), thread_budget(3):
        assert K._Gemm("float32", a, a).workers(10) == (3, None)
        np.testing.assert_array_equal(knn_self(a, k, distance=distance, tile=60), ra)
    tau = float(np.quantile(ra[:, 0], 0.3))
    ids = np.arange(0, len(a), 3)
    want = ball_counts_reference(a[ids], a, tau, None, distance, a_ids=ids).as_tuple()
    got = ball_counts(a[ids], _blocks(a, 120), tau, None, distance=distance, a_ids=ids, scores="bf16").as_tuple()
    for g, r in zip(got, want):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("n, tile, min_rows", [(1000, 300, 40), (37, 37, 5), (4000, 4096, 2048), (9, 4, 1)])
def test_split_diagonal_forms_every_pair_of_the_upper_triangle_once(n, tile, min_rows):
    from modeaudit.tasks.metrics.knn import self_spans, split_diagonal
    spans = split_diagonal(self_spans(n, tile), min_rows)
    seen = np.zeros((n, n), np.int64)
    formed = 0
    for r0, r1, c0, c1 in spans:
        assert r0 <= c0 and r1 - r0 >= 1 and c1 - c0 >= 1
        block = np.zeros((r1 - r0, c1 - c0), np.int64)
        i, j = np.indices(block.shape)
        # what _knn_sym_tile reads: on a diagonal piece (r0 == c0) only j > i
        keep = (j > i) if r0 == c0 else np.ones_like(block, bool)
        seen[r0:r1, c0:c1] += keep
        formed += block.size
    assert np.array_equal(seen, np.triu(np.ones((n, n), np.int64), 1))
    # the scores formed and never read: at most half of what the unsplit diagonal tiles waste
    unsplit = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in self_spans(n, tile))
    pairs = n * (n - 1) // 2
    if len(spans) > len(self_spans(n, tile)):
        assert formed - pairs <= (unsplit - pairs) * 0.5 + n


def test_openmp_threads_limits_only_the_calling_thread():
    torch = pytest.importorskip("torch")
    from concurrent.futures import ThreadPoolExecutor
    from modeaudit.tasks.join.threads import _openmp_controller, openmp_threads
    if _openmp_controller() is None:
        pytest.skip("this torch uses no OpenMP runtime threadpoolctl can see")
    before = torch.get_num_threads()

    def inside(n):
        with openmp_threads(n):
            a = torch.ones((64, 64), dtype=torch.bfloat16)
            torch.mm(a, a)
            return torch.get_num_threads()

    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(inside, 1).result() == 1
        assert ex.submit(inside, 10 ** 6).result() == before   # never more than the thread would use
    assert torch.get_num_threads() == before   # this thread's count, and the process's, unchanged
    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(torch.get_num_threads).result() == before   # a new thread starts with the default


def test_bf16_tile_threads_are_one_per_core_while_their_memory_fits(monkeypatch):
    pytest.importorskip("torch")
    from modeaudit.tasks.metrics import knn as K
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    g = K._Gemm("bf16", x, x)
    assert g.bf16
    gib = 1 << 30
    with thread_budget(3):
        assert g.workers(100, 1000) == (3, 1)
        assert g.workers(2, 1000) == (2, 1)                 # no more threads than tiles
        assert g.workers(100, gib // 2 + 1) == (2, 1)       # two still, to overlap filters with GEMMs
    with thread_budget(8):
        assert g.workers(100, 300 << 20) == (3, 2)          # 3 x 300 MiB fit in 1 GiB: two OpenMP threads each
        assert g.workers(100, 4 * gib) == (2, 4)
    with thread_budget(1):
        assert g.workers(100, 1000) == (1, 1)               # the budget holds for torch's GEMM too
    f = K._Gemm("float32", np.ones((8, 4), np.float32), np.ones((8, 4), np.float32))
    assert f.workers(100, 4 * gib)[1] is None
    # the self-join's per-thread bytes are those its state holds
    assert sum(a.nbytes for a in K._sym_state(37, 5, 23)) == K._sym_state_bytes(37, 5, 23)


def test_a_bf16_matmul_that_does_not_accumulate_in_float32_is_refused(monkeypatch):
    torch = pytest.importorskip("torch")
    from modeaudit.tasks.join import backend
    from modeaudit.tasks.metrics import knn as K
    assert K.bf16_gemm_is_sound()   # this torch: float32 accumulation, as the bound assumes

    def bf16_accumulating_mm(a, bt):
        acc = torch.zeros((a.shape[0], bt.shape[1]), dtype=torch.bfloat16)
        for j in range(a.shape[1]):
            acc = acc + a[:, j:j + 1] * bt[j:j + 1, :]   # every partial sum rounded to bfloat16
        return acc
    assert K.bf16_probe_passes(torch.mm, 8)
    assert not K.bf16_probe_passes(bf16_accumulating_mm, 8)
    monkeypatch.setattr(K, "_bf16_probe", lambda: False)
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    monkeypatch.setattr(backend, "cpu_has_bf16_matmul", lambda: True)
    with pytest.raises(ValueError, match="does not accumulate in float32"):
        backend.metric_kernel("lowprec")
    assert backend.metric_kernel("auto", 2048, backend.LOWPREC_MIN_PAIRS) == "fast"


@pytest.mark.parametrize("threads,probe", [(1, True), (2, True), (1, False), (2, False)])
def test_bf16_ball_counts_go_back_to_float32_when_the_band_is_crowded(monkeypatch, threads, probe):
    """Fake rows spread wider than the real ones put the fake balls' radii in the bulk of the distances:
    ~4% of pairs fall in bfloat16's band (float32's: ~0.1%), so the join returns to float32, with the same
    exact counts: before any tile, by the sample of each block taken first (_crowded_band), or, where that
    sample missed it (probe=False here), for its remaining tiles by each tile's own sample."""
    pytest.importorskip("torch")
    from modeaudit.tasks.metrics import knn as K
    rng = np.random.default_rng(27)
    real = rng.standard_normal((1500, 96)).astype(np.float32)
    fake = (rng.standard_normal((1400, 96)) * 1.1).astype(np.float32)
    rr = knn_distances_reference(real, 5)[:, -1]
    rf = knn_distances_reference(fake, 5)[:, -1]
    want = ball_counts_reference(real, fake, rr, rf).as_tuple()
    monkeypatch.setattr(K, "_BF16_QUERY_TILE", 256)
    monkeypatch.setattr(K, "_BF16_POINT_TILE", 512)
    switched, rechecked, bf16_tiles = [], [], []
    real_switch, real_rows, real_call = K._Gemm.use_float32, K._ball_rows, K._Gemm.__call__
    monkeypatch.setattr(K._Gemm, "use_float32",
                        lambda self, **kw: (switched.append(len(rechecked)), real_switch(self, **kw)))
    monkeypatch.setattr(K, "_ball_rows", lambda *a: (rechecked.append(a[7]), real_rows(*a))[1])

    def call(self, *a):
        eps = real_call(self, *a)
        bf16_tiles.append(eps is not None)
        return eps
    monkeypatch.setattr(K._Gemm, "__call__", call)
    if not probe:
        monkeypatch.setattr(K, "_crowded_band", lambda *a: False)
    with thread_budget(threads):
        got = ball_counts(real, _blocks(fake, 700), rr, rf, scores="bf16").as_tuple()
    for g, r in zip(got, want):
        np.testing.assert_array_equal(g, r)
    assert switched and want[2].sum() > 10 * len(rf)   # switched; the fake balls hold many real rows each
    float32_tol = [K._Queries(real, False, None).tol(K._max_norm(b), (b.astype(np.float64) ** 2).sum(1))
                   for b in (fake[:700], fake[700:])]
    wide = [t for t in rechecked if t > max(float32_tol) * (1 + 1e-12)]   # the tolerance: _ball_rows' 8th argument
    assert len(rechecked) > 4
    if probe:
        # Both blocks switched before their first tile: no bfloat16 tile was formed, none re-checked in its band.
        assert len(switched) == 2 and not any(bf16_tiles) and not wide
    elif threads == 1:
        # The sampled band count switched each block (each its own GEMM, starting in bfloat16) before its first
        # tile was re-checked with bfloat16's wide band: every tile was re-checked with a float32 tolerance.
        assert switched[0] == 0 and not wide
    else:
        # Another tile thread's tile of a block may be past its own (sampled, less crowded) check when the switch
        # comes, and is re-checked with its bfloat16 band (seen: one tile of the 24); its full re-check count then
        # switches too. How many depends on the threads' timing: allowed, two per other thread and block (2 blocks),
        # and most tiles still re-checked with float32's tolerance.
        assert len(wide) <= (threads - 1) * 2 * 2 and len(wide) < len(rechecked) // 2


def test_bf16_score_bound_holds_on_hard_rows():
    """The bound the lowprec kernel relies on (bf16_score_eps: measured input rounding, float32 sums,
    one rounding to the bfloat16 output), checked against float64 on rows built to break it: huge
    cancellation, components over 12 decades, subnormals (flushed), a row with itself."""
    pytest.importorskip("torch")
    from modeaudit.tasks.metrics.knn import _Gemm
    rng = np.random.default_rng(26)
    d = 777
    a = rng.standard_normal((300, d)) * 10.0 ** rng.uniform(-6, 6, d)
    a[:50, : d // 2] = 1e4
    a[:50, d // 2: 2 * (d // 2)] = -1e4           # <a, a'> cancels to ~0 against |a| |a'| ~ 1e10
    a[60:70] = rng.standard_normal((10, d)) * 1e-39  # subnormal float32
    a = a.astype(np.float32)
    b = np.concatenate([a[:120], (rng.standard_normal((200, d)) * 3).astype(np.float32)])
    for q_ids, angular in ((None, False), (np.arange(300), False), (None, True)):
        g = _Gemm("bf16", a, b, q_ids=q_ids, angular=angular)
        assert g.bf16
        # Scores are of both sets less the queries' center (float32 values), for either distance.
        c = g.qb.center
        assert (c.astype(np.float32) == c).all() and (c != 0).any()
        assert np.array_equal(g.bb.center, c)
        exact = (a.astype(np.float64) - c) @ (b.astype(np.float64) - c).T
        out = np.empty((300, 320), np.float32)
        eps = g(0, 300, 0, 320, out)
        err = np.abs(out - exact)
        if q_ids is not None:   # the self pairs (query i, point i: the ids say so) are zeroed, not bounded
            err[np.arange(300), np.arange(300)] = 0
        assert err.max() <= eps, (err.max(), eps)
        assert err.max() > 1e-3 * eps   # the bound is not vacuous
    # Values bfloat16 cannot hold safely: that set keeps the float32 GEMM.
    big = a.copy()
    big[0, 0] = 2.0 ** 61
    assert not _Gemm("bf16", big, b).bf16


@pytest.mark.parametrize("distance", ["euclidean", "angular"])
@pytest.mark.parametrize("data", ["random", "grid"])
def test_torch_cpu_kernels_equal_float64_brute_force(distance, data):
    pytest.importorskip("torch")
    from modeaudit.tasks.metrics.knn import knn_self_pair
    from modeaudit.tasks.metrics.knn_torch import (
        ball_counts_torch, knn_distances_torch, knn_self_pair_torch, knn_self_torch,
    )
    k = 5
    a, b, ra, rb, ref = _case(data, distance, 14, k)
    # Small tiles: many tiles per block, the k-NN lists carried across them and across blocks.
    for tile, query_tile, rows in ((40, 64, 97), (None, None, None)):
        blocks_a = [(0, a)] if rows is None else _blocks(a, rows)
        blocks_b = [(0, b)] if rows is None else _blocks(b, rows)
        got = knn_distances_torch(a, blocks_a, k, distance=distance, query_ids=np.arange(len(a)), device="cpu",
                                  tile=tile, query_tile=query_tile)
        np.testing.assert_array_equal(got, ra)
        c = ball_counts_torch(a, blocks_b, ra[:, -1], rb[:, -1], distance=distance, device="cpu", tile=tile,
                              query_tile=query_tile).as_tuple()
        for g, r in zip(c, ref):
            np.testing.assert_array_equal(g, r)
    # The symmetric self-join (each pair once: rows and columns of the upper triangle's tiles) and its
    # two-group form, square tiles that split the set unevenly and one tile for all
    for tile in (40, 97, None):
        np.testing.assert_array_equal(knn_self_torch(a, k, distance=distance, device="cpu", tile=tile), ra)
    for cut in (0, 3, len(a) // 3):
        pa, pb = knn_self_pair_torch(a[:cut], a[cut:], k, distance=distance, device="cpu", tile=40)
        qa, qb = knn_self_pair(a[:cut], a[cut:], k, distance=distance)
        np.testing.assert_array_equal(pa, qa)
        np.testing.assert_array_equal(pb, qb)
    # a-ids: a row is not in its own ball (the support-size pass), a scalar radius, no b-balls
    tau = float(np.quantile(ra[:, 0], 0.3))
    ids = np.arange(0, len(a), 3)
    want = ball_counts_reference(a[ids], a, tau, None, distance, a_ids=ids).as_tuple()
    got = ball_counts_torch(a[ids], _blocks(a, 120), tau, None, distance=distance, a_ids=ids, device="cpu",
                            tile=50).as_tuple()
    for g, r in zip(got, want):
        np.testing.assert_array_equal(g, r)


def test_torch_cpu_metrics_equal_numba_on_dask(thread_client):
    pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    real = rng.standard_normal((900, 12)).astype(np.float32)
    fake = (rng.standard_normal((800, 12)) * 0.9).astype(np.float32)
    fake[10:30] = fake[0]
    real.flags.writeable = False   # as np.load's memory maps: torch must not share it
    ref = compute_metrics(real, fake, 3, kid_subsets=2)
    assert compute_metrics(real, fake, 3, kid_subsets=2, kernel="torch-cpu") == ref
    assert compute_metrics(real, fake, 3, kid_subsets=2, kernel="torch-cpu", client=thread_client,
                           group_rows=256) == ref
    assert compute_metrics(real, fake, 3, kid_subsets=2, kernel="lowprec") == ref
    assert compute_metrics(real, fake, 3, kid_subsets=2, kernel="lowprec", client=thread_client,
                           group_rows=300) == ref


@pytest.mark.gpu
@pytest.mark.parametrize("distance", ["euclidean", "angular"])
def test_torch_cuda_kernels_equal_float64_brute_force(distance):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from modeaudit.tasks.join.backend import ball_counts as bc, knn_self as ks
    for a, b in (_random_sets(17), _grid_sets(18, distance)):
        if distance == "angular":
            a, b = _unit(a), _unit(b)
        k = 5
        ra = knn_distances_reference(a, k, distance)
        rb = knn_distances_reference(b, k, distance)
        np.testing.assert_array_equal(ks(a, k, distance=distance, kernel="torch-cuda"), ra)
        # the symmetric self-join over many tiles (rows and columns of the upper triangle) on the device
        from modeaudit.tasks.metrics.knn_torch import knn_self_torch
        np.testing.assert_array_equal(knn_self_torch(a, k, distance=distance, device="cuda", tile=97), ra)
        ref = ball_counts_reference(a, b, ra[:, -1], rb[:, -1], distance).as_tuple()
        got = bc(a, _blocks(b, 128), ra[:, -1], rb[:, -1], distance=distance, kernel="torch-cuda").as_tuple()
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r)


def test_any_order_sieve_decides_as_the_fixed_order_sum():
    """knn._inside (ball counts) and knn._below (k-NN lists) decide `distance < r` with an any-order (vectorised)
    squared distance first, and with the fixed-order sum only within sieve_rel of r^2. At r equal to a pair's own fixed-order distance (a point on
    the sphere: outside) and one float step either side, every decision must be the fixed-order one, on rows
    whose terms span many magnitudes (so the two sums round differently)."""
    from modeaudit.tasks.metrics import knn as K
    rng = np.random.default_rng(31)
    d = 515                                       # not a multiple of 4: the fixed-order sum's tail too
    a = (rng.standard_normal((40, d)) * np.exp(rng.uniform(-6, 6, (40, d)))).astype(np.float32)
    b = (a[rng.integers(0, 40, 60)] + rng.standard_normal((60, d)).astype(np.float32) * 1e-3).astype(np.float32)
    rel = K.sieve_rel(d)
    differ = 0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            f = K._exact_sqdist(a, i, b, j)
            g = K._any_order_sqdist(a, i, b, j)
            differ += g != f
            assert abs(g - f) <= rel / 2 * g           # the bound the margin is built on
            dist = K._exact(a, i, b, j, False)
            for r in (dist, np.nextafter(dist, np.inf), np.nextafter(dist, 0.0)):
                got, _, _ = K._inside(a, i, b, j, False, r, rel, -1.0, -1.0)
                assert got == (dist < r), (i, j, r)
                # The k-NN lists' re-check: the exact distance wherever it is below the list's k-th (r).
                below = K._below(a, i, b, j, False, r)
                assert (below < r) == (dist < r) and (below == dist or below == np.inf), (i, j, r)
    # The rows exercise the margin: the sums do round differently (with rel = 0, the sieve alone would
    # put some of these pairs on the wrong side of a sphere through them).
    assert differ > 100


def test_crowded_balls_equal_float64_brute_force(monkeypatch):
    """A fake set narrower than the real one (a collapsing generator): most pairs lie inside the real balls
    and hundreds in the float32 band, the case the branch-free bookkeeping and the any-order sieve are for."""
    from modeaudit.tasks.metrics import knn as K
    rng = np.random.default_rng(33)
    real = rng.standard_normal((900, 256)).astype(np.float32)
    fake = (rng.standard_normal((800, 256)) * 0.8 + 0.05).astype(np.float32)
    rr = knn_distances_reference(real, 5)[:, -1]
    rf = knn_distances_reference(fake, 5)[:, -1]
    want = ball_counts_reference(real, fake, rr, rf).as_tuple()
    assert want[0].sum() > 0.3 * real.shape[0] * fake.shape[0]     # crowded: most pairs inside a real ball
    rechecked = []
    real_rows = K._ball_rows
    monkeypatch.setattr(K, "_ball_rows", lambda *a: rechecked.append(real_rows(*a)) or rechecked[-1])
    got = ball_counts(real, _blocks(fake, 300), rr, rf).as_tuple()
    for g, r in zip(got, want):
        np.testing.assert_array_equal(g, r)
    assert sum(rechecked) > 100                                      # and hundreds of pairs in the band


def test_metrics_refusals_found_by_a_fuzz_leave_nothing_behind(tmp_path, capsys):
    """Values that once ran the machine out of memory (--kid-subsets, --workers 1e23), an empty --out (wrote to the
    working directory): one line, exit 2, no folder made. Rows that overflow float32's inner products (they left an
    empty --out; since, their scores are float64: test_rows_whose_float32_products_overflow_get_float64_scores)
    give a metrics.json."""
    from modeaudit.flows.cli import main
    rng = np.random.default_rng(4)
    r, f = tmp_path / "r.npy", tmp_path / "f.npy"
    np.save(r, rng.standard_normal((50, 4)).astype(np.float32))
    np.save(f, rng.standard_normal((40, 4)).astype(np.float32))
    big = tmp_path / "big.npy"
    np.save(big, (rng.standard_normal((50, 4)) * 1e30).astype(np.float32))
    base = ["metrics", "--real", str(r), "--fake", str(f)]
    out = tmp_path / "new" / "out"
    for args, says in ((["--out", str(out), "--kid-subsets", "10" * 12], "--kid-subsets"),
                       (["--out", str(out), "--workers", "10" * 12], "local worker processes"),
                       (["--out", ""], "--out is empty")):
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("modeaudit: error: ") and says in err and err.count("\n") == 1, err
        assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == \
            ["big.npy", "f.npy", "r.npy"]
    assert main(base + ["--out", str(out), "--real", str(big)]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert all(np.isfinite(got[key]) for key in ("precision", "recall", "density", "coverage", "kid"))


def test_python_api_takes_numpy_scalars():
    """k=np.int64(5) was refused ("must be a positive integer, got np.int64(5)"); the values come back as plain
    Python numbers, so the dict is JSON."""
    import modeaudit
    rng = np.random.default_rng(5)
    r = rng.standard_normal((50, 4)).astype(np.float32)
    f = rng.standard_normal((40, 4)).astype(np.float32)
    a = modeaudit.metrics(r, f, k=np.int64(5), dup_quantile=np.float32(0.25), block_rows=np.int64(7),
                          kid_seed=np.uint32(3), kid_subsets=np.int32(10), kid_subset_size=np.int64(20))
    b = modeaudit.metrics(r, f, k=5, dup_quantile=float(np.float32(0.25)), block_rows=7, kid_seed=3, kid_subsets=10,
                          kid_subset_size=20)
    assert a == b and json.loads(json.dumps(a)) == a and type(a["k"]) is int


def test_bf16_shifts_sets_far_from_the_origin_and_keeps_float32_for_a_far_pair(monkeypatch):
    """bfloat16's score error grows with |x|^2, the distances with the spread: rows N(3, I) (offset ratio 9)
    made the bfloat16 self-joins 8x slower than float32's. Euclidean joins now score both sets less the queries'
    mean (distances do not change), so such a set's bound is that of rows at the origin, and its results are
    the reference's; a point set far from the queries' mean keeps the float32 GEMM."""
    pytest.importorskip("torch")
    from modeaudit.tasks.metrics import knn as K
    rng = np.random.default_rng(3)
    near = rng.standard_normal((400, 64)).astype(np.float32)
    far = (rng.standard_normal((400, 64)) + 3.0).astype(np.float32)
    assert K.offset_ratio(near) < 0.1 and 8.0 < K.offset_ratio(far) < 10.0
    assert K.offset_ratio(far, K.bf16_center(far)) < 1e-6
    assert K.offset_ratio(np.zeros((5, 3), np.float32)) == 0.0
    assert K.offset_ratio(np.ones((5, 3), np.float32)) == math.inf
    out = np.empty((400, 400), np.float32)
    eps = {}
    for name, x in (("near", near), ("far", far)):
        g = K._Gemm("bf16", x, x)
        assert g.bf16
        eps[name] = g(0, 400, 0, 400, out)
        np.testing.assert_allclose(g.qb.sq, ((x.astype(np.float64) - g.qb.center) ** 2).sum(1), rtol=1e-12)
    # Unshifted, the far rows' bound would be ~ (1 + 9) x the near rows'; shifted it is about the same.
    assert eps["far"] < 1.5 * eps["near"]
    assert not K._Gemm("bf16", near, far).bf16   # the points sit far from the queries' center
    assert K._Gemm("bf16", far, far[::-1].copy()).bf16
    for x in (near, far):
        ref = knn_distances_reference(x, 4)
        np.testing.assert_array_equal(knn_self(x, 4, scores="bf16", tile=128), ref)
        np.testing.assert_array_equal(K.knn_distances(x, [(0, x[:150]), (150, x[150:])], 4, query_ids=np.arange(400),
                                                      scores="bf16"), ref)
    # Sets of 1500 rows: with 400 the 4-NN balls are so wide that 0.7% of the pairs sit in bfloat16's band.
    far = (rng.standard_normal((1500, 64)) + 3.0).astype(np.float32)
    fake = (rng.standard_normal((1500, 64)) + 3.05).astype(np.float32)
    ra, rb = knn_distances_reference(far, 4)[:, -1], knn_distances_reference(fake, 4)[:, -1]
    want = ball_counts_reference(far, fake, ra, rb).as_tuple()
    bounds, real_call = [], K._Gemm.__call__
    monkeypatch.setattr(K._Gemm, "__call__", lambda self, *a: (lambda e: (bounds.append(e), e)[1])(real_call(self, *a)))
    got = K.ball_counts(far, [(0, fake[:700]), (700, fake[700:])], ra, rb, scores="bf16").as_tuple()
    for w, g_ in zip(want, got):
        np.testing.assert_array_equal(g_, w)
    # The band is not crowded (the shifted rows' bound, balls of ordinary size): both blocks kept bfloat16.
    assert len(bounds) == 2 * -(-1500 // K._BF16_QUERY_TILE) and None not in bounds   # every tile of both


def test_shared_items_hands_each_item_to_exactly_one_thread():
    from modeaudit.tasks.join.threads import run_in_threads, shared_items
    draw = shared_items(range(2000))
    got = run_in_threads(lambda _: list(draw()), range(4), 4)
    assert sorted(x for part in got for x in part) == list(range(2000))
    assert list(draw()) == []


def test_run_in_threads_returns_in_order_and_raises_after_every_call():
    import threading
    from modeaudit.tasks.join.threads import run_in_threads
    seen = []
    assert run_in_threads(lambda x: x * x, range(5)) == [0, 1, 4, 9, 16]
    assert run_in_threads(lambda x: threading.get_ident(), range(3), 1) == [threading.get_ident()] * 3   # inline
    assert run_in_threads(lambda x: x, []) == []

    def fail_on_two(x):
        if x == 2:
            raise ValueError("two")
        seen.append(x)
    with pytest.raises(ValueError, match="two"):
        run_in_threads(fail_on_two, range(4), 2)
    assert sorted(seen) == [0, 1, 3]


@pytest.mark.parametrize("scores", ["bf16", "float32"])
@pytest.mark.parametrize("world", ["N(1000, 1)", "grid + 100", "tiny + 1e-18", "a column at 1e4"])
def test_shifted_joins_equal_float64_brute_force_far_from_the_origin(world, scores):
    """The shift by the queries' mean is formed in float64 and the keys use the shifted rows' norms: rows a
    thousand spreads from the origin (offset ratio ~1e6), integer rows with ties far from it, rows 1e-18
    from the origin with spread 1e-20 (a shift the float32 mean does not make exact), and rows with one
    constant column at 1e4 give the reference's radii and counts, with bfloat16 scores and with float32 ones
    (shifted past an offset ratio of 100)."""
    if scores == "bf16":
        pytest.importorskip("torch")
    from modeaudit.tasks.metrics import knn as K
    rng = np.random.default_rng(31)
    n, d = 600, 48
    if world == "N(1000, 1)":
        a = (rng.standard_normal((n, d)) + 1000).astype(np.float32)
        b = (rng.standard_normal((n, d)) + 1000.05).astype(np.float32)
    elif world == "grid + 100":
        a = rng.integers(0, 3, (n, d)).astype(np.float32) + 100
        b = rng.integers(0, 3, (n, d)).astype(np.float32) + 100
    elif world == "tiny + 1e-18":
        a = (rng.standard_normal((n, d)) * 1e-20 + 1e-18).astype(np.float32)
        b = (a[::-1] * np.float32(1.01)).astype(np.float32)
    else:
        a = rng.standard_normal((n, d)).astype(np.float32)
        b = (rng.standard_normal((n, d)) + 0.05).astype(np.float32)
        a[:, 7] = b[:, 7] = 1e4
    if scores == "bf16":
        assert K._Gemm("bf16", a, b).bf16   # the old guard (offset from the origin) sent these to float32
    else:
        g = K._Gemm("float32", a, b)
        assert g.qs is not None and g.qs.norm < 0.02 * K._max_norm(a)   # shifted: its bound is that of the spread
    assert K.offset_ratio(a) > 100
    ra, rb = knn_distances_reference(a, 5), knn_distances_reference(b, 5)
    np.testing.assert_array_equal(knn_self(a, 5, scores=scores, tile=256), ra)
    np.testing.assert_array_equal(K.knn_distances(a, [(0, a[:250]), (250, a[250:])], 5, query_ids=np.arange(n),
                                                  scores=scores), ra)
    want = ball_counts_reference(a, b, ra[:, -1], rb[:, -1]).as_tuple()
    got = K.ball_counts(a, [(0, b[:300]), (300, b[300:])], ra[:, -1], rb[:, -1], scores=scores).as_tuple()
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    assert sum(int(w.sum()) for w in want) > n


def test_float32_shift_is_kept_only_where_it_shrinks_the_norms_and_cannot_overflow():
    """Queries at 1e30 with spread 1e24 against points near the origin: shifted by the queries' mean the points
    would have norms ~1e30 and the shifted inner products ~1e55 overflow float32 (found in review: +-inf scores
    read as surely inside / outside, wrong ball counts), so the rows are used as given and the counts are the
    reference's. A bfloat16 join builds no float32 copies unless a block goes to float32 before its tiles."""
    from modeaudit.tasks.metrics import knn as K
    rng = np.random.default_rng(0)
    a = (1e30 + rng.standard_normal((200, 8)) * 1e24).astype(np.float32)
    b = rng.standard_normal((200, 8)).astype(np.float32)
    assert K.offset_ratio(a) > 1e6 and K._Gemm("float32", a, b).qs is None
    r = np.median(np.sort(K.pair_distances_reference(a, b), axis=1)[:, 2])
    for w, g in zip(ball_counts_reference(a, b, r, None).as_tuple(), K.ball_counts(a, b, r, None).as_tuple()):
        np.testing.assert_array_equal(g, w)
    # At 1e15 with spread 1e9 the set with itself is shifted (norms 1e15 -> 1e9); against points near the origin
    # the shift would not shrink the largest |a| |b| (1e9 x 1e15 against 1e15 x 3), so it is not kept.
    a = (1e15 + rng.standard_normal((200, 8)) * 1e9).astype(np.float32)
    assert K._Gemm("float32", a, a).qs is not None and K._Gemm("float32", a, b).qs is None
    np.testing.assert_array_equal(knn_self(a, 3), knn_distances_reference(a, 3))
    pytest.importorskip("torch")
    far = (rng.standard_normal((300, 32)) + 1000).astype(np.float32)
    g = K._Gemm("bf16", far, far[::-1].copy())
    assert g.bf16 and g.qs is None
    g.use_float32(before_tiles=True)
    assert not g.bf16 and g.qs is not None


def test_bf16_angular_joins_shift_a_cone_of_unit_rows_and_equal_float64_brute_force():
    """Unit rows in a cone (|mean|^2 ~0.8: normalised CNN or CLIP features) sat far from the origin for their
    spread and kept float32; the angular keys -2 <a, b> are (|a - c|^2 - |a|^2) + (|b - c|^2 - |b|^2)
    - 2 <a - c, b - c>, so they are scored shifted like euclidean ones, with the norms' float64 error added
    to the tolerance, and the radii and counts are the reference's."""
    pytest.importorskip("torch")
    from modeaudit.tasks.metrics import knn as K
    rng = np.random.default_rng(41)

    def cone(n, shift):
        x = rng.standard_normal((n, 64)) * 0.25 + shift
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    a, b = cone(700, 0.5), cone(650, 0.52)
    assert K.offset_ratio(a) > 3 and K.offset_ratio(a, K.bf16_center(a)) < 1e-3
    g = K._Gemm("bf16", a, b, angular=True)
    assert g.bf16 and g.qb.sq_err > 0
    np.testing.assert_allclose(g.qb.sq, ((a.astype(np.float64) - g.qb.center) ** 2).sum(1)
                               - (a.astype(np.float64) ** 2).sum(1), atol=1e-12)
    ra, rb = knn_distances_reference(a, 5, "angular"), knn_distances_reference(b, 5, "angular")
    np.testing.assert_array_equal(knn_self(a, 5, distance="angular", scores="bf16", tile=256), ra)
    np.testing.assert_array_equal(K.knn_distances(a, [(0, a[:300]), (300, a[300:])], 5, distance="angular",
                                                  query_ids=np.arange(700), scores="bf16"), ra)
    want = ball_counts_reference(a, b, ra[:, -1], rb[:, -1], "angular").as_tuple()
    got = K.ball_counts(a, [(0, b[:330]), (330, b[330:])], ra[:, -1], rb[:, -1], distance="angular",
                        scores="bf16").as_tuple()
    for w, g_ in zip(want, got):
        np.testing.assert_array_equal(g_, w)
    assert sum(int(w.sum()) for w in want) > 700


def test_bf16_rounding_in_pieces_is_the_same_on_any_thread_count():
    """_bf16_rows rounds its rows in pieces on the call's threads, checking bfloat16's safe range on the way:
    bits, norms and bounds must not depend on the thread count or the piece size, and a value beyond the range
    in the last piece still refuses the set (the caller keeps float32)."""
    torch = pytest.importorskip("torch")
    from modeaudit.tasks.join.lowprec import BF16_MAX_ABS
    from modeaudit.tasks.metrics import knn as K
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((5000, 70)) * np.exp(rng.uniform(-3, 3, (5000, 1)))).astype(np.float32)
    runs = []
    for threads, piece in ((1, 10 ** 6), (2, K._ROUND_ROWS), (3, 777)):
        with thread_budget(threads), pytest.MonkeyPatch.context() as m:
            m.setattr(K, "_ROUND_ROWS", piece)
            r = K._bf16_rows(x)
        runs.append((r.t.view(torch.int16).numpy().copy(), r.sq.copy(), (r.stats.norm, r.stats.norm_q, r.stats.resid)))
    for bits, sq, stats in runs[1:]:
        np.testing.assert_array_equal(bits, runs[0][0])
        np.testing.assert_array_equal(sq, runs[0][1])
        assert stats == runs[0][2]
    big = x.copy()
    big[-1, -1] = np.float32(BF16_MAX_ABS * 2)
    with thread_budget(2), pytest.MonkeyPatch.context() as m:
        m.setattr(K, "_ROUND_ROWS", 777)
        assert K._bf16_rows(big, center=np.zeros(70)) is None


@pytest.mark.parametrize("scores", ["float32", "bf16", "torch-cpu"])
def test_rows_whose_float32_products_overflow_get_float64_scores(scores):
    """Any finite float32 rows are served: norms past 1e18 would overflow float32's inner products (to inf, read
    as "inside every ball"), so such joins form their scores in float64 (the bfloat16 kernel too, the torch
    kernels with a float64 torch.mm); blocks of ordinary rows in the same stream keep float32. Radii and counts
    equal the float64 brute force, and the metrics do not change under a power-of-two scale."""
    if scores == "torch-cpu":
        pytest.importorskip("torch")
        from modeaudit.tasks.metrics import knn_torch as T
        self_join = lambda x: T.knn_self_torch(x, 5, device="cpu")                              # noqa: E731
        cross = lambda a, blocks: T.knn_distances_torch(a, blocks, 5, device="cpu")               # noqa: E731
        balls = lambda a, blocks, ra, rb: T.ball_counts_torch(a, blocks, ra, rb, device="cpu")    # noqa: E731
    else:
        if scores == "bf16":
            pytest.importorskip("torch")
        self_join = lambda x: knn_self(x, 5, scores=scores, tile=128)                            # noqa: E731
        cross = lambda a, blocks: knn_distances(a, blocks, 5, scores=scores)                     # noqa: E731
        balls = lambda a, blocks, ra, rb: ball_counts(a, blocks, ra, rb, scores=scores)           # noqa: E731
    rng = np.random.default_rng(41)
    a = (rng.standard_normal((300, 40)) * 1e20).astype(np.float32)
    b = np.concatenate([rng.standard_normal((100, 40)) * 1e20, rng.standard_normal((150, 40))]).astype(np.float32)
    b[:20] = a[:20]                       # distance 0 pairs across the sets
    b[100:110] = b[120]                   # duplicates among the ordinary rows
    blocks = [(0, b[:100]), (100, b[100:])]
    ra, rb = knn_distances_reference(a, 5), knn_distances_reference(b, 5)
    np.testing.assert_array_equal(self_join(a), ra)
    np.testing.assert_array_equal(self_join(b), rb)
    np.testing.assert_array_equal(cross(a, blocks), np.sort(pair_distances_reference(a, b), axis=1)[:, :5])
    ref = ball_counts_reference(a, b, ra[:, -1], rb[:, -1]).as_tuple()
    for g, r in zip(balls(a, blocks, ra[:, -1], rb[:, -1]).as_tuple(), ref):
        np.testing.assert_array_equal(g, r)
    assert ref[0].sum() > 1000 and ref[2].sum() > 10
    with np.errstate(over="ignore"):
        assert np.isinf(a[0] @ a[0])      # float32 would have overflowed
    if scores == "float32":
        # Scaled by 2^-70 (exact, no underflow here) the rows are ordinary: the same memberships.
        s = np.float32(2.0 ** -70)
        rs = knn_distances_reference(a * s, 5)
        np.testing.assert_array_equal(rs, ra * 2.0 ** -70)
        for g, r in zip(ball_counts(a * s, b * s, rs[:, -1], rb[:, -1] * 2.0 ** -70).as_tuple(), ref):
            np.testing.assert_array_equal(g, r)


def test_unit_rows_are_used_as_given_and_normalising_is_idempotent(tmp_path, capsys):
    """Angular metrics normalise rows, but rows already unit to float32's precision are used as given: re-dividing
    by a float32-rounded norm moved 16% of float32-normalised 7-d rows (found by a fuzz), and for nearly parallel
    unit rows that moved the CLI's density from 0.566 to 0.437. Both normalisers are idempotent on any scale and
    width, and the CLI's metrics on saved unit rows equal the float64 brute force on those rows."""
    from modeaudit.flows.cli import main
    from modeaudit.tasks.join.sources import UNIT_KEEP, row_norms
    from modeaudit.tasks.join.sources import unit_rows as source_unit
    from modeaudit.tasks.metrics.rows import unit_rows as metric_unit
    rng = np.random.default_rng(13)
    for d in (1, 2, 3, 7, 64, 515):
        for scale in (1e-30, 1e-3, 1.0, 1e30):
            x = (rng.standard_normal((500, d)) * scale).astype(np.float32)
            for unit in (source_unit, metric_unit):
                u = unit(x)
                np.testing.assert_array_equal(unit(u), u)
                assert np.abs(row_norms(u) - 1.0).max() <= UNIT_KEEP / 2   # the margin the rule relies on
    # float64 rows just inside the rule are kept as their float32 casts only where a second pass keeps those too
    # (the test is on the cast row's norm: on the float64 one, 446 of 1000 such rows moved in a second pass).
    x = rng.standard_normal((1000, 7))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * (1 + 0.99 * UNIT_KEEP)
    u = source_unit(x)
    np.testing.assert_array_equal(source_unit(u), u)
    assert 0 < np.all(u == x.astype(np.float32), axis=1).sum() < 1000   # some kept, some divided
    # Rows normalised elsewhere (numpy, float32) are kept bit for bit, and they would have moved.
    def numpy_unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    real = numpy_unit(rng.standard_normal((300, 7)).astype(np.float32) + np.float32(1e3))
    fake = numpy_unit(rng.standard_normal((280, 7)).astype(np.float32) + np.float32(1e3))
    np.testing.assert_array_equal(metric_unit(real), real)
    old = real / row_norms(real).astype(np.float32)[:, None]      # the rule before: always divide
    assert np.any(old != real)
    np.save(tmp_path / "r.npy", real)
    np.save(tmp_path / "f.npy", fake)
    k = 5
    assert main(["metrics", "--real", str(tmp_path / "r.npy"), "--fake", str(tmp_path / "f.npy"), "--k", str(k),
                 "--distance", "angular", "--kernel", "fast", "--out", str(tmp_path / "out"),
                 "--kid-subsets", "2"]) == 0
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rr, rf = knn_distances_reference(real, k, "angular")[:, -1], knn_distances_reference(fake, k, "angular")[:, -1]
    dist = pair_distances_reference(real, fake, "angular")        # (real, fake)
    in_real = dist < rr[:, None]
    assert got["precision"] == in_real.any(axis=0).mean()
    assert got["recall"] == (dist < rf[None, :]).any(axis=1).mean()
    assert got["density"] == in_real.sum() / (k * len(fake))
    assert got["coverage"] == in_real.any(axis=1).mean()


def test_float64_rows_beyond_float32_are_refused_by_every_kernel():
    """The metrics are defined on float32 rows: a float64 value past float32's range (1e39) would become inf, which
    the float64-score path (for norms past 1e18) would take silently (inf radii, no memberships; found in review).
    Every kernel and the references refuse such rows with one message; 3e38 is served."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((30, 6))
    a[3, 2] = 1e39
    calls = [lambda: knn_self(a, 3), lambda: knn_distances(a, a, 3, query_ids=np.arange(30)),
             lambda: ball_counts(a, a, 10.0, 10.0, a_ids=np.arange(30)), lambda: knn_distances_reference(a, 3)]
    if importlib.util.find_spec("torch") is not None:
        from modeaudit.tasks.metrics import knn_torch as T
        calls.append(lambda: T.knn_self_torch(a, 3, device="cpu"))
    for call in calls:
        with pytest.raises(ValueError, match="beyond float32's range"):
            call()
    a[3, 2] = 3e38
    np.testing.assert_array_equal(knn_self(a, 3), knn_distances_reference(a, 3))


def test_a_row_far_above_the_median_norm_is_noted():
    """One row at 1e4x the median norm made a 1e4 x 128 self-join 50x slower (the band follows the largest norms):
    the user is told which row, in one note; ordinary rows (Gaussian, 2x spread of norms) get none."""
    import io
    from modeaudit.tasks import console
    rng = np.random.default_rng(12)
    real = rng.standard_normal((200, 8)).astype(np.float32)
    fake = rng.standard_normal((150, 8)).astype(np.float32)
    for rows, says in ((real, None), (np.concatenate([real[:40], real[40:41] * 1e4, real[41:]]), "real row 40")):
        out = io.StringIO()
        with console.terminal(stream=out):
            got = compute_metrics(rows, fake, 5, kid_subsets=2)
        lines = out.getvalue().splitlines()
        notes = [line for line in lines if "median row" in line]
        if says is None:
            assert notes == []
        else:
            assert len(notes) == 1 and says in notes[0] and notes[0].startswith("modeaudit: note: ")
        assert got["precision"] == compute_metrics(rows, fake, 5, kid_subsets=2)["precision"]


def test_bf16_self_join_bound_is_its_tiles_not_float32s(monkeypatch):
    """A bfloat16 self-join forms no float32 tile, so float32's bound (of the unshifted rows: ~1e3 for rows
    N(1e3, 1) at 64 columns, against squared distances ~130) must not set the band its lists settle with; it did,
    and re-checked every pair (1e4 x 512: 10.4 s a self-join against 0.41 s). Same radii as the brute force."""
    pytest.importorskip("torch")
    from modeaudit.tasks.metrics import knn as K
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((600, 64)) + 1e3).astype(np.float32)
    seen, real_settle = [], K._settle_rows
    monkeypatch.setattr(K, "_settle_rows", lambda lo, hi, tol, *a: (seen.append(tol), real_settle(lo, hi, tol, *a))[1])
    np.testing.assert_array_equal(K.knn_self(x, 5, scores="bf16", tile=128), knn_distances_reference(x, 5))
    q = K._Queries(x, False, None)
    assert K._Gemm("bf16", q.x, q.x).bf16 and seen
    # The tiles' own bound (shifted rows, ~1) against the unshifted rows' float32 one (~1e3).
    assert max(seen) < 10.0 and q.tol(q.norm, q.sq) > 100.0
