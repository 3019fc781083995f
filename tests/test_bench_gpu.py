"""The GPU benchmark harness runs end to end on the CPU (tiny sizes) and reports well-formed ratios."""
import json

import pytest
from benchmark_scripts import load

pytest.importorskip("torch")


def test_quick_cpu_run(tmp_path, capsys):
    mod = load("bench_gpu")
    res = mod.main(["--device", "cpu", "--quick", "--dims", "16,32", "--json", str(tmp_path / "g.json")])
    assert json.loads((tmp_path / "g.json").read_text())["kernel"] == "torch-cpu"
    assert [r["D"] for r in res["widths"]] == [16, 32]
    for r in res["widths"]:
        assert r["counts_exact_first_block"] and r["M"] == 40_000
        assert r["join_s"] > 0 and r["gemm_floor_s"] > 0
        assert r["join_over_gemm"] == pytest.approx(r["join_s"] / r["gemm_floor_s"])
        assert 0 < r["join_fraction_of_peak"]
    assert "% of peak" in capsys.readouterr().out
