"""The low-precision benchmark runs end to end at tiny sizes: its exactness assertions
(lowprec counts == fast counts, MCCS sums bit-identical, both bounds hold) pass and its
figures are well formed."""
import json

import pytest
from benchmark_scripts import load

pytest.importorskip("torch")


# Slow: it imports torch and times every GEMM variant and both
# kernels on two data sets; the kernels' exactness is tested by test_join*.py already.
@pytest.mark.slow
def test_tiny_run(tmp_path, capsys):
    mod = load("bench_lowprec")
    res = mod.main(["--anchors", "40", "--rows", "6000", "--dim", "16", "--block-rows", "2048",
                    "--repeat", "1", "--threads", "1", "--json", str(tmp_path / "l.json")])
    assert json.loads((tmp_path / "l.json").read_text())["rows"] == 6000
    assert set(res["gemm_floor_s"]) >= {"numpy_fp32", "torch_bf16_bf16out", "torch_int8_int32out"}
    for name in ("clustered", "isotropic"):
        fr = res["recheck"][name]
        # the bfloat16 band is far wider than float32's, and int8's wider still
        assert fr["float32 (fast)"] < fr["bfloat16, bound per pair"] <= fr["bfloat16, one bound per block (lowprec)"]
        assert fr["bfloat16, bound per pair"] < fr["int8 per-row scales, bound per pair"] <= 1
        assert res["join_s"][name]["fast"] > 0 and res["join_s"][name]["lowprec"] > 0
    assert "MCCS sums bit-identical" in capsys.readouterr().out
