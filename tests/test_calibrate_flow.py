"""Calibration end to end: the planted mode is flattened, quality and diversity kept."""
import json

import numpy as np
import pytest

from modeaudit.flows.audit import audit_flow
from modeaudit.flows.calibrate import calibrate_flow
from modeaudit.flows.cli import main
from modeaudit.tasks.config import AuditConfig


@pytest.fixture(scope="module")
def audited(tmp_path_factory, prefect_harness, scheduler):
    # Planted mass 20x a typical identity's (0.02 vs 0.98/1000).
    out = tmp_path_factory.mktemp("cal") / "run"
    cfg = AuditConfig(out=str(out), generator="synthetic:planted", m=2000, M=40000, q=200, n_a=500, n_c=40000,
                      tests="paper,erl", efficiency=False, scheduler=scheduler)
    audit_flow(cfg.to_dict())
    return out


def _null_world_npz(audited, path):
    # "Real data" of the synthetic world: the same identities with no planted mode, as pytorch-fid stats.
    from modeaudit.tasks.calibration import steps as cs
    from modeaudit.tasks.models.shards import embed_rows
    res = json.loads((audited / "result.json").read_text())
    opts = cs.null_world_options(res["source"]["generator"], res["source"]["generator_options"])
    _, emb, _, _ = embed_rows({"spec": "synthetic:null", "options": opts}, {"spec": "identity", "options": {}},
                              12345, "null", 0, 50_000)
    emb = np.asarray(emb, np.float64)
    np.savez(path, mu=emb.mean(axis=0), sigma=np.cov(emb, rowvar=False))
    return path


def test_rejection_calibration_flattens_the_planted_mode(audited, capsys, scheduler):
    npz = _null_world_npz(audited, audited.parent / "real_stats.npz")
    # Through the CLI, as a user runs it (rejection is the default method).
    assert main(["calibrate", "--run", str(audited), "--fid-reference", str(npz), "--scheduler", scheduler]) == 0
    on_disk = json.loads((audited / "calibration" / "rejection" / "calibration.json").read_text())
    cal = on_disk
    for key in ("method", "acceptance_rate", "mccs_worst_before", "mccs_worst_after", "fd_before_after", "truth"):
        assert key in on_disk
    t = cal["truth"]
    assert t["planted_share_before"] > 10 * t["typical_share"]
    assert t["planted_share_after"] <= 1.5 * t["typical_share"]
    assert cal["mccs_worst_after"] < cal["mccs_worst_before"]
    assert cal["count_d0_new_worst_after"] <= cal["count_d0_worst_before"]
    # Quality: calibration moves the model toward the collapse-free world, never away.
    assert t["fd_null_after"] <= t["fd_null_before"]
    assert cal["band_overlap"]["overlap_all"]
    assert 0.5 < cal["acceptance_rate"] <= 1
    assert (audited / "calibration" / "rejection" / "report.html").read_text().count("data:image/png") == 2
    # FD to real-data statistics given as a pytorch-fid .npz drops too.
    assert cal["fd_reference"]["after"] <= cal["fd_reference"]["before"]


def test_cluster_calibration_keeps_quality(audited, scheduler):
    """--method cluster reshapes only the cells with excess density: FD to the collapse-free world must not rise."""
    assert main(["calibrate", "--run", str(audited), "--method", "cluster", "--scheduler", scheduler]) == 0
    cal = json.loads((audited / "calibration" / "cluster" / "calibration.json").read_text())
    assert cal["method"] == "cluster" and cal["variant"] == "cells"
    t = cal["truth"]
    assert t["fd_null_after"] <= t["fd_null_before"]
    assert t["planted_share_after"] <= 1.5 * t["typical_share"]
    assert cal["mccs_worst_after"] < cal["mccs_worst_before"]
    assert cal["fit"]["excess_only"] == 1.0 and 0 < cal["fit"]["n_reshaped"] < 64
    # The re-audit ran the audit's own tests (paper, erl here), so the verdicts compare like with like.
    before = json.loads((audited / "result.json").read_text())
    after = json.loads((audited / "calibration" / "cluster" / "audit" / "result.json").read_text())
    assert after["settings"]["tests"] == before["settings"]["tests"] == ["paper", "erl"]
    assert cal["verdict_before"] == before["verdict"]["headline"]
    assert cal["verdict_after"] == after["verdict"]["headline"]
    html = (audited / "calibration" / "cluster" / "report.html").read_text()
    assert f"Verdict: {cal['verdict_before']} &rarr; {cal['verdict_after']}" in html


def test_reaudit_config_repeats_the_audits_settings(tmp_path):
    """The calibrated sampler is re-audited with the tests, reference, alpha, d0, radii, theta and sizes of the audit."""
    from modeaudit.flows.calibrate import _audit_config
    result = {
        "sizes": {"S": 3000, "T": 50000, "A": 700, "C": 40000}, "d0": 0.2, "radii": [0.1, 0.2, 0.3],
        "settings": {"p": 2, "q": 300, "alpha": 0.01, "theta": 0.35, "seed": 4, "shard_rows": 5000,
                     "store_dtype": "float32", "tests": ["paper", "erl", "selection", "two_sample"],
                     "reference": None, "reference_generator": "synthetic:null",
                     "reference_generator_options": {"identities": 50}, "n_ref": 60000, "null_replicates": 199,
                     "selection_m": 2500, "selection_t": 45000, "modes": 3, "tie_weight": 0.5},
        "source": {"descriptor": "identity", "descriptor_options": {}},
    }
    cfg = _audit_config(result, tmp_path / "a", "calibrated:x", 5, "fast", 1)
    assert cfg.tests == "paper,erl,selection,two_sample"
    assert cfg.reference_generator == "synthetic:null" and cfg.reference_generator_options == {"identities": 50}
    assert cfg.reference is None
    assert (cfg.m, cfg.M, cfg.n_a, cfg.n_c, cfg.p, cfg.q) == (3000, 50000, 700, 40000, 2, 300)
    assert (cfg.alpha, cfg.d0, cfg.radii, cfg.theta) == (0.01, 0.2, (0.1, 0.2, 0.3), 0.35)
    assert (cfg.n_ref, cfg.null_replicates, cfg.selection_m, cfg.selection_t, cfg.modes, cfg.tie_weight) == (
        60000, 199, 2500, 45000, 3, 0.5)
    assert cfg.seed == 5 and cfg.store_dtype == "float32"
    # A --reference file, and a result.json from before settings carried the reference: taken from source.
    result["settings"] = {k: v for k, v in result["settings"].items()
                          if k not in ("reference", "reference_generator", "reference_generator_options")}
    result["source"]["reference"] = "/data/real.npy"
    cfg = _audit_config(result, tmp_path / "b", "calibrated:x", 5, "fast", 1)
    assert cfg.reference == "/data/real.npy" and cfg.reference_generator is None


def test_fid_reference_of_another_width_is_refused(audited, capsys, tmp_path):
    np.savez(tmp_path / "bad.npz", mu=np.zeros(7), sigma=np.eye(7))
    assert main(["calibrate", "--run", str(audited), "--fid-reference", str(tmp_path / "bad.npz")]) == 2
    assert "7-d statistics" in capsys.readouterr().err
    assert main(["calibrate", "--run", str(audited), "--fid-reference", str(tmp_path / "none.npz")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_calibrated_sampler_is_a_deterministic_generator(audited):
    from modeaudit.tasks.models.generators import build_generator
    spec = f"calibrated:{audited / 'calibration' / 'rejection' / 'sampler'}"
    if not (audited / "calibration" / "rejection" / "sampler").exists():
        calibrate_flow({"run": str(audited), "method": "rejection"})
    g1, g2 = build_generator(spec), build_generator(spec)
    a = g1.latents(3, "T", 0, 5000)
    b = g2.latents(3, "T", 0, 2000)
    c = g2.latents(3, "T", 2000, 5000)
    assert (a[:2000] == b).all() and (a[2000:] == c).all()


def test_calibrate_refuses_a_damaged_store(audited, tmp_path, capsys):
    # An overwritten chunk of T: a traceback before (and the earlier calibration.json deleted); now one line.
    import shutil
    run = tmp_path / "run"
    shutil.copytree(audited, run, ignore=shutil.ignore_patterns("calibration"))
    chunk = sorted((run / "store.zarr" / "T" / "emb").rglob("c/*/*"))[0]
    chunk.write_bytes(b"garbage\n")
    earlier = run / "calibration" / "rejection" / "calibration.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"earlier": true}')
    assert main(["calibrate", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("modeaudit: error: ") and "Traceback" not in err, err
    assert "no longer match the checksums" in err.strip().splitlines()[-1], err
    assert earlier.read_text() == '{"earlier": true}'
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["calibration.json"]


def test_a_failed_calibration_keeps_the_earlier_one(audited, tmp_path, capsys, monkeypatch, scheduler):
    """The earlier calibration.json was deleted before the fit, so a calibration that then failed lost it."""
    import shutil
    import modeaudit.flows.calibrate as flow_module
    from modeaudit.tasks.registry import ConfigError
    run = tmp_path / "run"
    shutil.copytree(audited, run, ignore=shutil.ignore_patterns("calibration"))
    earlier = run / "calibration" / "rejection" / "calibration.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"earlier": true}')

    def failing_fit(*a, **k):
        raise ConfigError("the fit cannot be made (test)")

    monkeypatch.setattr(flow_module, "fit_rejection", failing_fit)
    assert main(["calibrate", "--run", str(run), "--n-fit", "2000", "--scheduler", scheduler]) == 2
    assert "the fit cannot be made (test)" in capsys.readouterr().err
    assert earlier.read_text() == '{"earlier": true}'
    # Options a fit cannot honour are refused before any work, in one line.
    assert main(["calibrate", "--run", str(run), "--method", "cluster", "--clusters", "5000", "--n-fit", "2000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--clusters 5000 is more than the 2000 latent rows" in err, err


def test_modes_without_mass_are_left_out_of_rejection():
    from modeaudit.tasks.calibration.steps import modes_with_mass
    from modeaudit.tasks.errors import InputError
    emb = np.eye(4, dtype=np.float32)
    idx, e, p1, dropped = modes_with_mass([7, 8, 9, 10], emb, np.array([0.02, 0.0, 0.01, 0.0]), 0.001, 0.1)
    assert idx == [7, 9] and dropped == [8, 10] and p1.tolist() == [0.02, 0.01]
    np.testing.assert_array_equal(e, emb[[0, 2]])
    with pytest.raises(InputError, match="none of the 2 modes"):
        modes_with_mass([1, 2], emb[:2], np.zeros(2), 0.001, 0.1)
    with pytest.raises(InputError, match="typical density at r0=0.1 is 0"):
        modes_with_mass([1, 2], emb[:2], np.ones(2), 0.0, 0.1)


def test_calibrate_refuses_a_directory_without_an_audit(tmp_path, capsys):
    assert main(["calibrate", "--run", str(tmp_path), "--method", "cluster"]) == 2
    assert "holds no finished audit" in capsys.readouterr().err


def test_inception_fid_for_an_image_generator(tmp_path, capsys, prefect_harness, scheduler):
    # Random Inception weights (no download here): the numbers mean nothing, the path is what is tested.
    torch = pytest.importorskip("torch")
    from modeaudit.tasks.models.inception import FIDInceptionV3
    out = tmp_path / "img"
    cfg = AuditConfig(out=str(out), generator="torch:tiny", descriptor="torch:tiny-cnn", m=400, M=3000, q=50,
                      n_a=100, n_c=3000, tests="paper", efficiency=False, scheduler=scheduler, report=False)
    audit_flow(cfg.to_dict())     # an audit without its report can be calibrated (no links to refresh)
    assert not (out / "report.html").exists()
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    assert main(["calibrate", "--run", str(out), "--inception-weights", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["calibrate", "--run", str(out), "--inception-weights", str(weights), "--fid-rows", "4",
                 "--scheduler", scheduler]) == 0
    cal = json.loads((out / "calibration" / "rejection" / "calibration.json").read_text())
    assert '<a href="../../result.json">audit before</a>' in (out / "calibration" / "rejection" / "report.html").read_text()
    f = cal["fid_inception"]
    assert f["rows"] == [4, 4] and np.isfinite(f["fid"]) and f["fid"] >= 0


def test_inception_fid_refused_for_an_embedding_generator(audited, capsys, tmp_path):
    (tmp_path / "w.pth").write_bytes(b"x")
    assert main(["calibrate", "--run", str(audited), "--inception-weights", str(tmp_path / "w.pth")]) == 2
    assert "needs an image generator" in capsys.readouterr().err
