"""benchmarks/profile_metrics.py runs (tiny sizes) and stays in step with the kernels it takes apart.

Benchmarks are not tests: this checks the harness, not any speed.
"""
import re

import pytest
from benchmark_scripts import load

from modeaudit.tasks.metrics import knn


def test_the_profiles_no_ops_name_the_kernels_that_exist():
    # A renamed kernel would leave the "GEMMs and tiling alone" line timing the filters too, silently.
    mod = load("profile_metrics")
    for name in mod.NOOPS:
        assert callable(getattr(knn, name)), name


@pytest.mark.parametrize("scores, wall", [("float32", False), ("bf16", True)])
def test_profile_prints_the_joins_the_gemms_alone_and_the_bare_gemm(scores, wall, capsys):
    if scores == "bf16":
        pytest.importorskip("torch")
    mod = load("profile_metrics")
    before = {name: getattr(knn, name) for name in mod.NOOPS}
    argv = ["--n", "700", "--d", "40", "--repeats", "1", "--scores", scores] + (["--wall"] if wall else [])
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert {name: getattr(knn, name) for name in mod.NOOPS} == before   # the kernels are put back
    first = re.search(r"total (\d+\.\d+); results sha256 ([0-9a-f]{16})", out)
    alone = re.search(r"tiling alone\): .*total (\d+\.\d+)", out)
    assert first and alone and float(first.group(1)) > 0 and float(alone.group(1)) >= 0
    assert ("bare " + scores + " GEMM") in out if wall else "bare" not in out
    # the joins' results are those of a plain call
    import hashlib

    import numpy as np
    real = np.random.default_rng(1).standard_normal((700, 40), dtype=np.float32)
    fake = np.random.default_rng(2).standard_normal((700, 40), dtype=np.float32) + np.float32(0.1)
    r, f = knn.knn_self(real, 5), knn.knn_self(fake, 5)
    c = knn.ball_counts(real, [(0, fake)], r[:, -1], f[:, -1])
    h = hashlib.sha256()
    for a in (r, f, *c.as_tuple()):
        h.update(np.ascontiguousarray(a).tobytes())
    assert first.group(2) == h.hexdigest()[:16]


def test_bench_metrics_prints_the_bf16_gemm_floor_beside_a_lowprec_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    import json
    bench = load("bench_metrics")
    got = bench._worker("gemm_bf16", 300, 512, 5)   # the method itself, in this process
    assert got["seconds"] > 0
    # The table's assembly, with each method's figures made up (its subprocesses are not the point here).
    made_up = {"gemm": 4.0, "gemm_bf16": 2.0}
    calls = []

    def fake_run(method, n, d, k, timeout, kernel="auto", world="gaussian"):
        calls.append((method, d, kernel))
        assert world == "gaussian"
        if method == "modeaudit":
            kn = "lowprec" if kernel == "lowprec" else "fast"
            return {"kernel": kn, "seconds": 3.0, "peak_rss_gib": 0.1, "process_cpu_seconds": 5.0,
                    "precision": 0.5, "recall": 0.5, "density": 1.0, "coverage": 0.9}
        return {"seconds": made_up[method], "peak_rss_gib": 0.1, "process_cpu_seconds": 1.0}

    monkeypatch.setattr(bench, "_run", fake_run)
    out = tmp_path / "m.json"
    assert bench.main(["--sizes", "300", "--dims", "64,512", "--repeats", "1", "--no-prdc", "--kernel",
                       "lowprec,fast", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert "gemm_bf16" not in rows[0] and rows[1]["gemm_bf16"]["seconds"] == 2.0   # only at 512+ columns
    assert ("gemm_bf16", 64, "auto") not in calls
    by = rows[1]["modeaudit_by_kernel"]
    assert by["lowprec"]["ratio_to_bf16_gemm"] == 1.5 and "ratio_to_bf16_gemm" not in by["fast"]
    printed = capsys.readouterr().out.splitlines()
    assert any("bf16 gemm floor 2.00 s (x1.50)" in line and "--kernel lowprec" in line for line in printed)
    assert not any("bf16 gemm floor" in line and "--kernel fast" in line for line in printed)


def test_bench_metrics_worlds_are_what_its_docstring_says():
    import numpy as np
    bench = load("bench_metrics")
    real, fake = bench._data(3000, 64)
    assert abs(float(real.mean())) < 0.02 and abs(float(fake.mean()) - 0.1) < 0.02
    real, fake = bench._data(3000, 64, "pooled-relu")
    assert real.dtype == np.float32 and real.min() >= 0 and fake.min() >= 0
    assert 1.6 < knn.offset_ratio(real) < 2.2 and fake.mean() > real.mean()   # mean ~1.4x the spread
    real, fake = bench._data(3000, 64, "offset")
    assert 2.0 < knn.offset_ratio(real) < 2.5 and abs(float(fake.mean() - real.mean()) - 0.1) < 0.02
    with pytest.raises(ValueError, match="world must be one of"):
        bench._data(10, 4, "uniform")
    assert bench._worker("gemm", 300, 16, 5, "auto", "offset")["seconds"] > 0
