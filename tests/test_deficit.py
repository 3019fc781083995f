"""The deficit test (tasks/stats/deficit.py): reference-centred balls the model under-fills (issue 14, item 5)."""
import json
import math

import numpy as np
import pytest

from modeaudit.tasks.join.sources import Source
from modeaudit.tasks.stats.deficit import reference_balls, split_reference
from modeaudit.tasks.stats.registry import STAT_TESTS, default_tests, parse_tests
from modeaudit.tasks.stats.steps import deficit

DIM = 8
D0 = 0.25


def _clusters(rng, n, weights, spread=0.05):
    """Unit rows around the first len(weights) basis vectors (pairwise distance 0.5 > d0: distinct balls)."""
    k = rng.choice(len(weights), n, p=weights)
    x = np.eye(DIM)[k] + spread * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), k


def _junk(rng, n):
    """Cluster 0 missing, its quarter of the mass spread uniformly over the sphere: the other clusters keep
    exactly their reference mass (docs/toy-benchmarks.md's `dropped-junk`)."""
    x, k = _clusters(rng, n, [0.25] * 4)
    u = rng.standard_normal((int((k == 0).sum()), DIM))
    x[k == 0] = (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)
    return x


def _source(tmp_path, name, x):
    np.save(tmp_path / f"{name}.npy", x)
    return Source("npy", str(tmp_path / f"{name}.npy"), len(x), x.shape[1])


def _d(a, b):
    return np.arccos(np.clip(a.astype(np.float64) @ b.astype(np.float64).T, -1, 1)) / math.pi


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """A 4-cluster reference; T without cluster 0 (its mass spread over the other three); T of the same law."""
    tmp = tmp_path_factory.mktemp("deficit")
    rng = np.random.default_rng(0)
    ref, k_ref = _clusters(rng, 4000, [0.25] * 4)
    dropped, _ = _clusters(rng, 6000, [0, 1 / 3, 1 / 3, 1 / 3])
    same, _ = _clusters(rng, 6000, [0.25] * 4)
    return {"ref": _source(tmp, "ref", ref), "ref_rows": ref, "k_ref": k_ref,
            "dropped": _source(tmp, "dropped", dropped), "same": _source(tmp, "same", same)}


def test_names_the_dropped_cluster_and_only_it(worlds):
    out = deficit(None, worlds["dropped"], worlds["ref"], D0, 0.05, "fast", 10)
    assert out["n_balls"] == 4 and out["reject"] and out["rejected_balls"] == 1
    (b,) = [b for b in out["balls"] if b["reject"]]
    assert worlds["k_ref"][b["ref_index"]] == 0          # the rejected ball is centred on the dropped cluster
    assert b["x_t"] == 0 and b["ratio"] == 0.0 and b["ci"][0] == 0.0 and b["p_adj"] < 1e-12
    assert out["p"] == b["p_adj"]
    kept = [b for b in out["balls"] if not b["reject"]]
    assert all(1.2 < b["ratio"] < 1.45 for b in kept)    # 4/3: the dropped mass went to them


def test_same_law_rejects_nothing(worlds):
    out = deficit(None, worlds["same"], worlds["ref"], D0, 0.05, "fast", 10)
    assert not out["reject"] and out["rejected_balls"] == 0 and out["p"] > 0.05
    assert all(0.85 < b["ratio"] < 1.15 for b in out["balls"])


def test_counts_are_exact_and_held_out(worlds):
    """Centres come from the selection rows, x_R from the other rows only, x_T from all of T (float64 brute force)."""
    out = deficit(None, worlds["dropped"], worlds["ref"], D0, 0.05, "fast", 10)
    ref, n = worlds["ref_rows"], worlds["ref"].rows
    n_sel = split_reference(n)
    assert n_sel == n // 2 and out["reference_rows_select"] == n_sel and out["reference_rows_counted"] == n - n_sel
    idx = np.array([b["ref_index"] for b in out["balls"]])
    assert idx.max() < n_sel
    centres = ref[idx]
    d_sel = _d(centres, ref[:n_sel])
    d_sel[np.arange(len(idx)), idx] = 1.0                 # no self pair
    assert [b["count_select"] for b in out["balls"]] == (d_sel <= D0).sum(1).tolist()
    assert [b["x_r"] for b in out["balls"]] == (_d(centres, ref[n_sel:]) <= D0).sum(1).tolist()
    T = worlds["dropped"].read()
    assert [b["x_t"] for b in out["balls"]] == (_d(centres, T) <= D0).sum(1).tolist()
    assert (_d(centres, centres)[np.triu_indices(len(idx), 1)] > D0).all()       # distinct
    c = [b["count_select"] for b in out["balls"]]
    assert c == sorted(c, reverse=True)                                          # densest first


def test_greedy_sees_every_equal_mode():
    """Equal modes give near-equal counts: a top-count candidate pool would hold one mode; every row is a candidate."""
    rng = np.random.default_rng(1)
    x, k = _clusters(rng, 6000, [0.125] * 8, spread=0.01)
    counts = np.bincount(k, minlength=8)[k] - 1
    picked = reference_balls(x, counts, 10, D0)
    assert sorted(k[picked].tolist()) == list(range(8))


def test_split_reference():
    assert split_reference(2) == 1 and split_reference(101) == 50 and split_reference(10 ** 6) == 10_000
    with pytest.raises(ValueError, match="at least 2"):
        split_reference(1)


def test_one_or_two_workers_same_result(worlds, scheduler):
    from distributed import Client
    one = deficit(None, worlds["dropped"], worlds["ref"], D0, 0.05, "fast", 10)
    with Client(scheduler) as client:
        two = deficit(client, worlds["dropped"], worlds["ref"], D0, 0.05, "fast", 10)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


def test_registered_controlled_opt_in():
    from modeaudit.tasks.config import AuditConfig
    t = STAT_TESTS["deficit"]
    assert t.controlled and t.needs_reference and t.section
    cfg = AuditConfig(out="unused", embeddings_s="s.npy", embeddings_t="t.npy", reference="r.npy")
    assert "two_sample" in default_tests(cfg) and "deficit" not in default_tests(cfg)
    assert parse_tests("two_sample,deficit") == ("two_sample", "deficit")


def test_needs_a_reference_one_line_exit_2(tmp_path, capsys):
    from modeaudit.flows.cli import main
    x = np.eye(DIM, dtype=np.float32)
    np.save(tmp_path / "s.npy", x)
    rc = main(["audit", "--embeddings-s", str(tmp_path / "s.npy"), "--embeddings-t", str(tmp_path / "s.npy"),
               "--tests", "paper,deficit", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("modeaudit: error: ") and "deficit" in err[0]
    assert "--reference" in err[0] and not (tmp_path / "o").exists()


def test_registry_run_verdict_and_report_section(tmp_path, worlds):
    """The registered run on an audit's context; a deficit rejection alone makes the verdict, and the report
    section lists the balls (the flow stores the entry as result.json's tests.deficit, as every registered test)."""
    from modeaudit.tasks.config import AuditConfig
    from modeaudit.tasks.report.audit import verdict_level, verdict_text
    from modeaudit.tasks.report.stats import stats_sections
    from modeaudit.tasks.stats.registry import TestContext
    rng = np.random.default_rng(2)
    T = _source(tmp_path, "junk", _junk(rng, 6000))
    cfg = AuditConfig(out="unused", embeddings_s="s.npy", embeddings_t="t.npy", reference="r.npy", d0=D0)
    ctx = TestContext(cfg=cfg, client=None, S_rows=None, T=T, ref=worlds["ref"], counts=None, curves=None,
                      modes=None, result={"tests": {}})
    d = json.loads(json.dumps(STAT_TESTS["deficit"].run(ctx)))       # JSON-ready as it is
    assert d["reject"] and d["rejected_balls"] == 1 and d["n_balls"] == 4 and d["radius"] == D0
    (b,) = [b for b in d["balls"] if b["reject"]]
    assert worlds["k_ref"][b["ref_index"]] == 0 and b["ratio"] < 0.1     # only the odd junk row lands in it
    assert all(0.85 < b["ratio"] < 1.15 for b in d["balls"] if not b["reject"])  # the kept modes: exactly their mass
    tests = {"two_sample": [{"reject": False}], "deficit": d}
    assert verdict_level(tests) == "collapse" and "deficit" in verdict_text(tests)[1]
    (title, body), = [s for s in stats_sections({"tests": {"deficit": d}}) if s[0].startswith("Deficit")]
    assert "1 of 4 rejected" in body and body.count("<tr>") == 5
    skipped = {"tests": {"deficit": {"reject": False, "skipped": "the reference set has 1 row(s)"}}}
    assert "Not run: the reference set has 1 row(s)" in stats_sections(skipped)[0][1]
