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


def test_calibrate_refuses_a_directory_without_an_audit(tmp_path, capsys):
    assert main(["calibrate", "--run", str(tmp_path), "--method", "cluster"]) == 2
    assert "holds no finished audit" in capsys.readouterr().err


def test_inception_fid_for_an_image_generator(tmp_path, capsys, prefect_harness, scheduler):
    # Random Inception weights (no download here): the numbers mean nothing, the path is what is tested.
    torch = pytest.importorskip("torch")
    from modeaudit.tasks.models.inception import FIDInceptionV3
    out = tmp_path / "img"
    cfg = AuditConfig(out=str(out), generator="torch:tiny", descriptor="torch:tiny-cnn", m=400, M=3000, q=50,
                      n_a=100, n_c=3000, tests="paper", efficiency=False, scheduler=scheduler)
    audit_flow(cfg.to_dict())
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    assert main(["calibrate", "--run", str(out), "--inception-weights", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["calibrate", "--run", str(out), "--inception-weights", str(weights), "--fid-rows", "24",
                 "--scheduler", scheduler]) == 0
    cal = json.loads((out / "calibration" / "rejection" / "calibration.json").read_text())
    f = cal["fid_inception"]
    assert f["rows"] == [24, 24] and np.isfinite(f["fid"]) and f["fid"] >= 0


def test_inception_fid_refused_for_an_embedding_generator(audited, capsys, tmp_path):
    (tmp_path / "w.pth").write_bytes(b"x")
    assert main(["calibrate", "--run", str(audited), "--inception-weights", str(tmp_path / "w.pth")]) == 2
    assert "needs an image generator" in capsys.readouterr().err
