"""The GPU metrics benchmark's harness runs end to end on the CPU (tiny sizes): the CLI it times gives the
metrics of the data it wrote, and the ratios and projections it prints are well formed."""
import json

import numpy as np
import pytest
from benchmark_scripts import load

pytest.importorskip("torch")


def _module():
    return load("bench_metrics_gpu")


def test_quick_cpu_run(tmp_path, capsys):
    from modeaudit.tasks.metrics import compute_metrics
    mod = _module()
    # --fixed-s: the tiny run that would time it is one more CLI process like the one timed below.
    res = mod.main(["--device", "cpu", "--quick", "--fixed-s", "0.5", "--work", str(tmp_path / "w"),
                    "--json", str(tmp_path / "g.json")])
    assert res["fixed_s"] == 0.5
    assert json.loads((tmp_path / "g.json").read_text())["kernel"] == "torch-cpu"
    (row,) = res["sizes"]
    assert row["n"] == 1500 and row["d"] == 16 and "error" not in row
    real, fake = mod._data(1500, 16)
    assert np.allclose(fake.mean(), 0.1, atol=0.02) and not np.array_equal(real, fake - np.float32(0.1))
    want = compute_metrics(real, fake, k=5)
    for key in ("precision", "recall", "density", "coverage", "support_size"):
        assert row["metrics"][key] == want[key], key
    assert row["gemm_floor"]["scores"] == 3 * 1500 ** 2 and row["gemm_floor"]["seconds"] > 0
    assert row["ratio_to_gemm"] == pytest.approx((row["wall_s"] - res["fixed_s"]) / row["gemm_floor"]["seconds"])
    assert "GEMM floor" in capsys.readouterr().out


def test_projection_grows_with_the_pairs():
    mod = _module()
    assert mod.projected_s({"n": 1000, "wall_s": 12.0}, 2.0, 10_000) == pytest.approx(10.0 * 100 + 2.0)
    assert mod.projected_s({"n": 1000, "wall_s": 12.0}, 2.0, 1000) == pytest.approx(12.0)


def test_profile_script_runs_on_the_cpu_and_hashes_the_kernels_outputs(capsys):
    """benchmarks/profile_metrics_gpu.py on the CPU: its joins are the torch kernels, whose outputs (hashed, to
    compare runs before and after a kernel change) are the numba kernels' bit for bit."""
    import hashlib
    from modeaudit.tasks.metrics import knn
    mod = load("profile_metrics_gpu")
    res = mod.main(["--device", "cpu", "--n", "700", "--top", "100"])
    real = np.random.default_rng(1).standard_normal((700, 128), dtype=np.float32)
    fake = np.random.default_rng(2).standard_normal((700, 128), dtype=np.float32) + np.float32(0.1)
    kr, kf = knn.knn_self(real, 5), knn.knn_self(fake, 5)
    h = hashlib.sha256()
    for x in (kr, kf, *knn.ball_counts(real, [(0, fake)], kr[:, -1], kf[:, -1]).as_tuple()):
        h.update(np.ascontiguousarray(x).tobytes())
    assert res["sha256"] == h.hexdigest()[:16]
    assert set(res["seconds"]) == {"knn_self_real", "knn_self_fake", "ball_counts"}
    assert "aten::mm" in res["profiles"]["knn_self"]["by_device"] and "G pairs/s" in capsys.readouterr().out
