"""End-to-end audits: planted mode found, determinism across workers and shard sizes, resume, the image path."""
import json

import numpy as np
import pytest

from flows.audit import audit_flow
from storage.store import RunStore
from tasks.config import AuditConfig

SMALL = dict(m=2000, M=24000, q=200, n_a=500, n_c=24000)


def run(tmp, name, **kw):
    cfg = AuditConfig(out=str(tmp / name), **{**dict(generator="synthetic:planted", **SMALL), **kw})
    return audit_flow(cfg.to_dict())


def _strip(result):
    r = json.loads(json.dumps(result))
    for k in ("timings", "settings"):
        r.pop(k)
    r["source"].pop("shards")
    return r


@pytest.fixture(scope="module")
def planted_and_null(tmp_path_factory, prefect_harness):
    tmp = tmp_path_factory.mktemp("pn")
    return run(tmp, "planted"), run(tmp, "null", generator="synthetic:null"), tmp


def test_planted_mode_is_the_worst_case(planted_and_null):
    planted, null, tmp = planted_and_null
    assert planted["truth"]["worst_case_is_planted"] is True
    assert planted["tests"]["paper"]["reject"] is True
    # The planted identity (2% mass, 2x tighter) is far denser than any of 1000 equal identities.
    assert planted["mccs"]["worst_case"] > null["mccs"]["worst_case"] + 0.03
    assert planted["worst_case"]["count_d0"] > 3 * null["worst_case"]["count_d0"]
    assert "truth" not in null


def test_result_contract_and_report(planted_and_null):
    planted, _, tmp = planted_and_null
    on_disk = json.loads((tmp / "planted" / "result.json").read_text())
    assert on_disk["sizes"] == {"S": 2000, "T": 24000, "A": 500, "C": 24000}
    assert on_disk["d0"] == 0.25 and len(on_disk["radii"]) == 41
    assert set(on_disk["worst_case"]) >= {"s_index", "count_d0", "mccs"}
    assert len(on_disk["r_obs"]) == 1 and len(on_disk["r_ref"]) == 200
    c = on_disk["curves"]
    assert len(c["obs"]) == 1 and all(len(c[k]) == 41 for k in ("ref_low", "ref_high", "ref_median"))
    assert np.all(np.diff(c["obs"][0]) >= 0)  # counts grow with the radius
    assert on_disk["tests"]["paper"]["alpha"] == 0.05
    assert set(on_disk["mccs"]) >= {"theta", "mean", "std", "worst_case"}
    # Synthetic embeddings are not unit length before normalisation: that is recorded.
    assert on_disk["normalization"]["S"]["renormalized_rows"] == 2000
    html = (tmp / "planted" / "report.html").read_text()
    assert "data:image/png;base64" in html and str(on_disk["worst_case"]["s_index"]) in html


def test_same_numbers_on_1_or_2_workers_and_any_shard_size(tmp_path, prefect_harness):
    base = run(tmp_path, "a", workers=1, shard_rows=5000)
    two = run(tmp_path, "b", workers=2, shard_rows=5000)
    other = run(tmp_path, "c", workers=2, shard_rows=3001)
    assert _strip(base) == _strip(two) == _strip(other)
    arrays = [RunStore.open(tmp_path / n) for n in "abc"]
    for name in ("results/curves", "results/mccs_A", "results/self_counts"):
        ref = arrays[0].read_array(name)
        for st in arrays[1:]:
            np.testing.assert_array_equal(ref, st.read_array(name))
    np.testing.assert_array_equal(arrays[0].read("T", "emb"), arrays[2].read("T", "emb"))


def test_resume_skips_complete_shards(tmp_path, prefect_harness):
    first = run(tmp_path, "r", shard_rows=4000)
    assert first["source"]["shards"]["T"] == {"shards": 6, "generated": 6, "skipped": 0}
    # Interrupt: forget two shards of T as if the run died before recording them.
    for i in (1, 4):
        (tmp_path / "r" / "manifest" / "T" / f"{i}.json").unlink()
    again = run(tmp_path, "r", shard_rows=4000)
    assert again["source"]["shards"]["T"] == {"shards": 6, "generated": 2, "skipped": 4}
    assert again["source"]["shards"]["S"]["generated"] == 0
    assert _strip(again) == _strip(first)


def test_image_generator_and_cnn_descriptor(tmp_path, prefect_harness):
    pytest.importorskip("torch")
    r = run(tmp_path, "img", generator="torch:tiny", descriptor="torch:tiny-cnn", m=600, M=3000, q=50, n_a=100,
            n_c=3000, shard_rows=1000, workers=2)
    st = RunStore.open(tmp_path / "img")
    emb = st.read("T", "emb").astype(np.float32)
    assert emb.shape == (3000, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
    assert 0 <= r["worst_case"]["s_index"] < 600 and "truth" not in r


def test_external_scheduler_gives_the_same_numbers(tmp_path, prefect_harness):
    """Workers started as separate processes on 127.0.0.1, reached through --scheduler."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(2)
        procs.append(subprocess.Popen([str(bindir / "dask"), "worker", addr, "--nworkers", "2", "--nthreads", "1",
                                       "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(addr, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        ext = run(tmp_path, "ext", scheduler=addr, shard_rows=7000)
        local = run(tmp_path, "loc", workers=1, shard_rows=5000)
        assert _strip(ext) == _strip(local)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
