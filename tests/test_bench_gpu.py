"""The GPU benchmark harness runs end to end on the CPU (tiny sizes) and reports well-formed ratios."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


def test_quick_cpu_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--device", "cpu", "--quick", "--dims", "16,32", "--json", str(tmp_path / "g.json")])
    assert json.loads((tmp_path / "g.json").read_text())["kernel"] == "torch-cpu"
    assert [r["D"] for r in res["widths"]] == [16, 32]
    for r in res["widths"]:
        assert r["counts_exact_first_block"] and r["M"] == 40_000
        assert r["join_s"] > 0 and r["gemm_floor_s"] > 0
        assert r["join_over_gemm"] == pytest.approx(r["join_s"] / r["gemm_floor_s"])
        assert 0 < r["join_fraction_of_peak"]
    assert "% of peak" in capsys.readouterr().out
