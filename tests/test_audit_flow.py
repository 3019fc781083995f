"""End-to-end audits: planted mode found, determinism across workers and shard sizes, resume, the image path
(an external scheduler and its workers: tests/test_dask_scheduler.py)."""
import json

import numpy as np
import pytest

from modeaudit.flows.audit import audit_flow
from modeaudit.storage.store import RunStore
from modeaudit.tasks.config import AuditConfig

SMALL = dict(m=2000, M=24000, q=200, n_a=500, n_c=24000)
# Determinism runs: every default test; 19 surrogate replicates (the fewest alpha = 0.05 allows) exercise
# the same code as 39, at half the cost.
DET = dict(null_replicates=19, m=1000, M=8000, q=100, n_a=200, n_c=8000)


def run(tmp, name, **kw):
    cfg = AuditConfig(out=str(tmp / name), **{**dict(generator="synthetic:planted", **SMALL), **kw})
    return audit_flow(cfg.to_dict())


def _strip(result):
    r = json.loads(json.dumps(result))
    for k in ("timings", "run_info", "settings"):
        r.pop(k)
    r["source"].pop("shards")
    return r


@pytest.fixture(scope="module")
def planted_and_null(tmp_path_factory, prefect_harness, scheduler):
    # The reference generator is the collapse-free world with the same identities ("real data").
    # Through the command, as a CI job gates on it: --fail-on collapse exits 3 on the planted world
    # (a controlled test rejects against the reference), 0 on the collapse-free one.
    from modeaudit.flows.cli import main
    tmp = tmp_path_factory.mktemp("pn")
    # 39 null replicates resolve p to 1/40: enough for the assertions at alpha = 0.05, 2.5x cheaper than 99.
    common = ["--reference-generator", "synthetic:null", "--m", "2000", "--M", "24000", "--q", "200",
              "--anchors", "500", "--mccs-set", "24000", "--null-replicates", "39", "--selection-t", "8000",
              "--scheduler", scheduler, "--fail-on", "collapse"]
    assert main(["audit", "--generator", "synthetic:planted", *common, "--diversity-rows", "3000",
                 "--out", str(tmp / "planted")]) == 3
    # The null run's report, efficiency curves and diversity metrics are never read: only its tests and worst case.
    assert main(["audit", "--generator", "synthetic:null", *common, "--diversity-rows", "0", "--no-efficiency",
                 "--no-report", "--out", str(tmp / "null")]) == 0
    return (json.loads((tmp / "planted" / "result.json").read_text()),
            json.loads((tmp / "null" / "result.json").read_text()), tmp)


def test_planted_mode_is_the_worst_case(planted_and_null):
    planted, null, tmp = planted_and_null
    assert planted["truth"]["worst_case_is_planted"] is True
    assert planted["tests"]["paper"]["reject"] is True
    # The planted identity (2% mass, 2x tighter) is far denser than any of 1000 equal identities.
    assert planted["mccs"]["worst_case"] > null["mccs"]["worst_case"] + 0.03
    assert planted["worst_case"]["count_d0"] > 3 * null["worst_case"]["count_d0"]
    assert "truth" not in null


def test_controlled_tests_find_the_planted_mode_and_only_it(planted_and_null):
    planted, null, _ = planted_and_null
    sel, nsel = planted["tests"]["selection"], null["tests"]["selection"]
    assert sel["reject"] and sel["p"] <= 0.05 and "reference generator" in sel["null"]
    assert not nsel["reject"] and nsel["p"] > 0.05
    assert set(planted["tests"]["erl"]) >= {"p_low", "p_high", "reject"}
    balls = planted["tests"]["two_sample"]
    assert len(balls) == 10 and all(set(b) >= {"ratio", "ci", "p_adj", "reject"} for b in balls)
    # The densest distinct mode is the planted one, and its ball carries far more mass than in the reference.
    assert planted["modes"][0]["planted"] and balls[0]["s_index"] == planted["modes"][0]["s_index"]
    assert balls[0]["reject"] and balls[0]["ci"][0] > 2
    assert not any(b["reject"] for b in null["tests"]["two_sample"])
    # No two listed modes are within d0 of each other (they are distinct identities).
    assert len({m["s_index"] for m in planted["modes"]}) == len(planted["modes"])
    eff = planted["sampling_efficiency"]
    assert eff["C_sizes"][-1] == 24000 and len(eff["mccs_worst_vs_C"]) == len(eff["C_sizes"])
    assert eff["worst_case_vs_S"][-1]["same_identity"] and eff["worst_case_vs_S"][-1]["planted"]
    assert eff["mccs_worst_vs_C"][-1] > eff["mccs_random_vs_C"][-1]


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
    # With a reference generator the controlled tests decide: the headline is the report's.
    assert on_disk["verdict"]["headline"] == "Collapse detected" and on_disk["verdict"]["level"] == "collapse"
    assert on_disk["verdict"]["headline"] in (tmp / "planted" / "report.html").read_text()
    assert set(on_disk["mccs"]) >= {"theta", "mean", "std", "worst_case"}
    # Synthetic embeddings are not unit length before normalisation: that is recorded.
    assert on_disk["normalization"]["S"]["renormalized_rows"] == 2000
    html = (tmp / "planted" / "report.html").read_text()
    assert "data:image/png;base64" in html and str(on_disk["worst_case"]["s_index"]) in html
    d = on_disk["diversity"]
    assert set(d["metrics"]) == {"precision", "recall", "density", "coverage", "kid", "support_size"}
    assert d["rows_T"] == d["rows_reference"] == 3000 and 0 < d["metrics"]["recall"] <= 1
    for section in ("Global envelope test (ERL)", "Selection-aware test", "Distinct dense modes", "Sampling efficiency",
                    "Diversity metrics"):
        assert section in html
    # Strict JSON: no Infinity/NaN tokens (one-sided envelopes are -inf below).
    json.loads((tmp / "planted" / "result.json").read_text(), parse_constant=lambda c: pytest.fail(c))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, prefect_harness):
    """A generator run with every default test on its own 1-worker cluster: the reference for determinism."""
    tmp = tmp_path_factory.mktemp("base")
    return run(tmp, "a", workers=1, shard_rows=2000, **DET), tmp


def test_same_numbers_on_1_or_2_workers_and_any_shard_size(base_run, tmp_path, prefect_harness, scheduler):
    base, base_dir = base_run
    assert set(base["tests"]) == {"paper", "erl", "selection"}   # every default test of a generator run
    # The session's cluster has 2 worker processes, set up as a run's own (conftest.scheduler).
    # b and c without the report: the numbers must not depend on it (a's report is drawn).
    two = run(tmp_path, "b", scheduler=scheduler, shard_rows=2000, report=False, **DET)
    other = run(tmp_path, "c", scheduler=scheduler, shard_rows=1501, report=False, **DET)
    assert (base_dir / "a" / "report.html").is_file()
    assert not (tmp_path / "b" / "report.html").exists() and not (tmp_path / "b" / "plots").exists()
    assert _strip(base) == _strip(two) == _strip(other)
    arrays = [RunStore.open(base_dir / "a"), RunStore.open(tmp_path / "b"), RunStore.open(tmp_path / "c")]
    for name in ("results/curves", "results/mccs_A", "results/self_counts"):
        ref = arrays[0].read_array(name)
        for st in arrays[1:]:
            np.testing.assert_array_equal(ref, st.read_array(name))
    np.testing.assert_array_equal(arrays[0].read("T", "emb"), arrays[2].read("T", "emb"))


def test_resume_skips_complete_shards_and_regenerates_damaged_ones(tmp_path, prefect_harness, scheduler):
    kw = dict(shard_rows=4000, scheduler=scheduler, tests="paper,erl", efficiency=False, report=False)
    first = run(tmp_path, "r", **kw)
    assert first["source"]["shards"]["T"] == {"shards": 6, "generated": 6, "skipped": 0, "reused": [],
                                              "damaged_regenerated": []}
    # Interrupt: forget two shards of T as if the run died before recording them ...
    for i in (1, 4):
        (tmp_path / "r" / "manifest" / "T" / f"{i}.json").unlink()
    # ... and damage a recorded one behind the manifest's back (a chunk file lost).
    chunks = sorted((tmp_path / "r" / "store.zarr" / "T" / "emb").rglob("c/*/*"))
    assert chunks
    chunks[-1].unlink()
    again = run(tmp_path, "r", **kw)
    assert again["source"]["shards"]["T"] == {"shards": 6, "generated": 3, "skipped": 3, "reused": [0, 2, 3],
                                              "damaged_regenerated": [5]}
    assert again["source"]["shards"]["S"]["generated"] == 0
    assert _strip(again) == _strip(first)


def test_image_generator_and_cnn_descriptor(tmp_path, prefect_harness, scheduler):
    pytest.importorskip("torch")
    r = run(tmp_path, "img", generator="torch:tiny", descriptor="torch:tiny-cnn", m=600, M=3000, q=50, n_a=100,
            n_c=3000, shard_rows=1000, scheduler=scheduler, tests="paper,erl", efficiency=False, report=False)
    st = RunStore.open(tmp_path / "img")
    emb = st.read("T", "emb").astype(np.float32)
    assert emb.shape == (3000, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
    assert 0 <= r["worst_case"]["s_index"] < 600 and "truth" not in r
