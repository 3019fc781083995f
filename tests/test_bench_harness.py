"""The benchmark harness runs end to end (tiny sizes) and reports every section.

Benchmarks are not tests: this checks that benchmarks/bench_join.py works and
that its figures are well formed, not that any speed target is met.
"""
import importlib.util
import json
import math

import pytest
from benchmark_scripts import load

# Found, not imported: collection imports every test module in every pytest worker, and sklearn alone took
# 1.4 s there; the harness's subprocess imports them when it runs.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("faiss") is None or importlib.util.find_spec("sklearn") is None,
                                reason="the harness compares against faiss and scikit-learn")



def _load():
    return load("bench_join")


def _ratios(node, path=""):
    """Every (path, value) whose key names a ratio or a speedup."""
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}"
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (
                    "_over_" in k or k.startswith("speedup") or k.endswith("ratio")):
                yield p, v
            else:
                yield from _ratios(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _ratios(v, f"{path}[{i}]")


def test_quick_harness_writes_every_section(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.json"
    res = bench.main(["--quick", "--sizes", "2e4,4e4", "--anchors", "64",
                      "--subset-rows", "2e4", "--faiss-rows", "8192", "--sklearn-rows", "4096",
                      "--selfjoin-m", "4000", "--mccs-anchors", "200", "--mccs-points", "2e4",
                      "--pool-blocks", "2", "--block-rows", "16384",
                      "--repeat", "1", "--peak-n", "512", "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))

    for section in ("machine", "curves", "scaling", "self_join", "mccs", "rss_mb"):
        assert section in data, section
    assert data["machine"]["sgemm_peak"]["gflops"] > 0
    for section in ("machine", "curves", "scaling", "self_join", "mccs"):
        assert data["rss_mb"][section] > 0

    curves = data["curves"]
    assert [r["M"] for r in curves["sizes"]] == [20_000, 40_000]
    assert len(curves["radii"]) == 41
    for r in curves["sizes"]:
        for key in ("gemm_floor_s", "fast_s", "fast_over_gemm", "bucketize_est_s", "faiss_est_s",
                    "sklearn_est_s", "speedup_vs_bucketize", "speedup_vs_faiss", "speedup_vs_sklearn"):
            assert key in r, key
    for name in ("bucketize", "faiss", "sklearn"):
        b = curves["baselines"][name]
        assert "skipped" not in b, b
        assert b["time_s"] > 0 and b["agrees"], b

    # the exactness check ran and passed
    assert curves["exact_check"]["counts_exact"] is True
    assert curves["exact_check"]["counts_compared"] == 64 * 41
    assert "counts exact" in printed

    assert data["scaling"]["size_ratio"] == 2.0
    assert data["self_join"]["m"] == 4000 and data["mccs"]["points"] == 20_000

    ratios = dict(_ratios(data))
    assert len(ratios) >= 2 * 4 + 3, ratios
    for path, v in ratios.items():
        assert math.isfinite(v) and v > 0, (path, v)
