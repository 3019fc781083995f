"""Ties in the dense-mode search: pairs exactly at d0 (tie_weight) and rows sharing the top count."""
import json
import math

import numpy as np
import pytest

from modeaudit.tasks.join.kernels import range_counts_reference
from modeaudit.tasks.stats.paper import pairs_at_d0, ranking_counts, top_anchors

# arccos(0.5) / pi as the kernels compute it (libm acos, not numpy's vectorised arccos, whose
# last bit differs by CPU): a pair with inner product exactly 0.5 sits on d0.
D0 = math.acos(0.5) / math.pi


def _tied_world():
    """Row 0 has 4 neighbours, all at exactly d0; rows 5-8 are a tight cluster (3 neighbours each, inside d0).

    Rows 1-4 are 0.5 * (1, +-1, +-1, +-1) (unit norm exactly; inner product with row 0 exactly
    0.5, with each other exactly 0), so every distance on the d0 boundary is exact in float32.
    """
    rows = [[1, 0, 0, 0]] + [[0.5, *s] for s in ([.5, .5, .5], [.5, -.5, -.5], [-.5, .5, -.5], [-.5, -.5, .5])]
    rng = np.random.default_rng(0)
    cluster = np.array([-1.0, 0, 0, 0]) + 0.01 * rng.normal(size=(4, 4))
    x = np.vstack([np.array(rows, np.float64), cluster / np.linalg.norm(cluster, axis=1, keepdims=True)])
    return x.astype(np.float32)


def test_pairs_at_d0_and_weighted_ranking():
    S = _tied_world()
    counts = range_counts_reference(S, S, [D0], anchor_ids=np.arange(len(S)))[:, 0]
    assert counts.tolist() == [4, 1, 1, 1, 1, 3, 3, 3, 3]  # inclusive: the d0 pairs count 1
    np.testing.assert_array_equal(pairs_at_d0(S, np.arange(len(S)), D0), [4, 1, 1, 1, 1, 0, 0, 0, 0])

    rank1, checked1 = ranking_counts(S, counts, D0, 1.0, p=1)
    assert checked1 == {} and top_anchors(rank1, 1)[0] == 0  # today's inclusive count: row 0 wins

    rank, checked = ranking_counts(S, counts, D0, 0.5, p=1, block=2)
    np.testing.assert_array_equal(rank[[0, 5, 6, 7, 8]], [2.0, 3, 3, 3, 3])  # seed 000 Eq. 2: 1/2 each
    assert top_anchors(rank, 1)[0] == 5 and int((rank == rank.max()).sum()) == 4
    # Re-checked in descending order of the inclusive count, and stopped once settled:
    # row 0 and the cluster (5 rows, blocks of 2 -> 6 checked), not rows 1-4 beyond the first.
    assert set(checked) >= {0, 5, 6, 7, 8} and len(checked) < len(S)

    rank0, _ = ranking_counts(S, counts, D0, 0.0, p=2)
    assert rank0[0] == 0 and list(top_anchors(rank0, 2)) == [5, 6]


def _audit(tmp_path, name, scheduler, **kw):
    from modeaudit.flows.audit import audit_flow
    from modeaudit.tasks.config import AuditConfig
    S = _tied_world()
    rng = np.random.default_rng(1)
    T = rng.normal(size=(300, 4))
    T = np.vstack([S, T / np.linalg.norm(T, axis=1, keepdims=True)]).astype(np.float32)
    np.save(tmp_path / "s.npy", S)
    np.save(tmp_path / "t.npy", T)
    cfg = AuditConfig(out=str(tmp_path / name), embeddings_s=str(tmp_path / "s.npy"),
                      embeddings_t=str(tmp_path / "t.npy"), d0=D0, tests="paper", efficiency=False, modes=2, scheduler=scheduler,
                      **kw)
    audit_flow(cfg.to_dict())
    return json.loads((tmp_path / name / "result.json").read_text())


def test_ties_and_tie_weight_in_result_json_and_report(tmp_path, prefect_harness, scheduler):
    from modeaudit.storage.store import RunStore
    inclusive = _audit(tmp_path, "w1", scheduler)
    wc = inclusive["worst_case"]
    assert wc["s_index"] == 0 and wc["count_d0"] == 4 and wc["ties"] == 1
    assert wc["tied_mccs_range"] == [wc["mccs"], wc["mccs"]] and wc["tied_mccs_rows"] == 1
    assert "count_d0_weighted" not in wc and inclusive["settings"]["tie_weight"] == 1.0
    assert "Ties at the top count" not in (tmp_path / "w1" / "report.html").read_text()

    half = _audit(tmp_path, "w05", scheduler, tie_weight=0.5)
    wc = half["worst_case"]
    assert wc["s_index"] == 5 and wc["count_d0"] == 3 and wc["ties"] == 4 and wc["tied_mccs_rows"] == 4
    assert wc["count_d0_weighted"] == 3.0 and wc["pairs_at_d0"] == 0
    assert half["settings"]["tie_weight"] == 0.5
    # The tied rows are all MCCS anchors here (A = S): the range is theirs.
    mccs_a = RunStore.open(tmp_path / "w05").read_array("results/mccs_A")
    assert wc["tied_mccs_range"] == pytest.approx([mccs_a[5:9].min(), mccs_a[5:9].max()], rel=1e-12)
    assert wc["tied_mccs_range"][0] < wc["tied_mccs_range"][1]
    html = (tmp_path / "w05" / "report.html").read_text()
    assert "Ties at the top count" in html and "4 rows of S share the top count" in html


def test_tie_weight_outside_unit_interval_is_refused(tmp_path):
    from modeaudit.flows.cli import main
    np.save(tmp_path / "s.npy", _tied_world())
    assert main(["audit", "--embeddings-s", str(tmp_path / "s.npy"), "--embeddings-t", str(tmp_path / "s.npy"),
                 "--tie-weight", "1.5", "--out", str(tmp_path / "o")]) == 2


def test_every_angular_distance_uses_libm_acos():
    """numpy's vectorised arccos differs from libm in the last bit on some CPUs (numpy 2.4
    on AMD EPYC: ~9% of inputs); references, tie rules and kernels must all use one acos."""
    import math
    from modeaudit.tasks.join.kernels import arccos_over_pi
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-1, 1, 20000), 1 - rng.uniform(0, 1e-6, 1000), [-1.5, -1.0, 0.0, 1.0, 1.5]])
    want = np.array([math.acos(min(1.0, max(-1.0, v))) / math.pi for v in x])
    got = arccos_over_pi(x.reshape(-1, 5)).reshape(-1)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    assert arccos_over_pi(0.5).shape == () and float(arccos_over_pi(0.5)) == math.acos(0.5) / math.pi
