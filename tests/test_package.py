"""The package people import: the namespace, typed configs, the Python API, determinism on every kind of input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import modeaudit
from modeaudit.flows.cli import build_parser, main
from modeaudit.tasks.config import AuditConfig, CalibrationConfig
from modeaudit.tasks.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_namespace_and_version():
    assert modeaudit.__version__ and modeaudit.AuditConfig is AuditConfig
    # The repository's folders are not importable under their bare names, even from the repository root.
    for name in ("tasks", "flows", "storage", "deploy"):
        r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and f"modeaudit.{name}" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "modeaudit.flows.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"modeaudit {modeaudit.__version__}"


@pytest.mark.parametrize("bad, names", [
    ({"out": "x", "bogus": 1}, "unknown key 'bogus'"),
    ({"out": "x", "overwrite": "false"}, "'overwrite'"),     # a string is not a bool: never truthy
    ({"out": "x", "m": 1.5}, "'m'"),
    ({"out": "x", "radii": ["a"]}, "'radii.0'"),
    ({}, "'out'"),
])
def test_config_errors_name_the_key(bad, names):
    with pytest.raises(ConfigError) as e:
        AuditConfig.parse(bad)
    msg = str(e.value)
    assert names in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        CalibrationConfig.parse({"run": "x", "nope": 2})


def test_cli_defaults_are_the_models_defaults():
    a = build_parser().parse_args(["audit", "--generator", "synthetic:planted", "--out", "x"])
    for k, v in vars(a).items():
        if k in AuditConfig.model_fields and v is not None and k not in ("out", "generator"):
            assert v == AuditConfig.model_fields[k].get_default(call_default_factory=True), k
    c = build_parser().parse_args(["calibrate", "--run", "x"])
    for k, v in vars(c).items():
        if k in CalibrationConfig.model_fields and v is not None and k != "run":
            assert v == CalibrationConfig.model_fields[k].get_default(call_default_factory=True), k


def test_flow_parameter_errors_are_one_line(tmp_path, prefect_harness):
    from prefect.exceptions import FailedRun

    from modeaudit.flows.audit import audit_flow
    from modeaudit.flows.calibrate import calibrate_flow
    with pytest.raises(FailedRun) as e:
        audit_flow({"out": str(tmp_path / "o"), "generator": "synthetic:planted", "sizes": 3})
    assert "unknown key 'sizes'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FailedRun, match="'workers'"):
        audit_flow({"out": str(tmp_path / "o"), "generator": "synthetic:planted", "workers": "two"})
    with pytest.raises(FailedRun, match="'method'"):
        calibrate_flow({"run": str(tmp_path), "method": 3})
    assert not (tmp_path / "o" / "result.json").exists()


def test_torch_missing_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch -> ImportError
    assert main(["audit", "--generator", "torch:tiny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modeaudit: error: ") and "needs torch" in err and "Traceback" not in err


SMALL = dict(m=1000, M=6000, q=100, n_a=200, n_c=6000)


def _strip(r):
    r = json.loads(json.dumps(r))
    for k in ("timings", "run_info", "settings", "source", "modeaudit_version"):
        r.pop(k, None)
    return r


def test_api_with_a_callable_equals_the_cli_spec(tmp_path, capsys, prefect_harness, scheduler):
    # A lambda cannot be imported by a worker process: it runs on worker threads of this process.
    r = modeaudit.audit(generator=lambda z: np.tanh(z), latent_dim=8, out=tmp_path / "api", tests="paper,erl",
                        efficiency=False, **SMALL)
    assert isinstance(r, modeaudit.AuditResult) and r.report.is_file() and r.headline
    argv = ["audit", "--generator", "python:numpy:tanh", "-G", "latent_dim=8", "--tests", "paper,erl",
            "--no-efficiency", "--scheduler", scheduler, "--out", str(tmp_path / "cli"),
            "--m", "1000", "--M", "6000", "--q", "100", "--anchors", "200", "--mccs-set", "6000"]
    assert main(argv) == 0
    cli = json.loads((tmp_path / "cli" / "result.json").read_text())
    assert _strip(cli) == _strip(r.data)
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        modeaudit.audit(generator="synthetic:planted", out=tmp_path / "x", bogus=1)
    with pytest.raises(ConfigError) as e:              # an array where a path belongs: still one line
        modeaudit.audit(embeddings_s=np.zeros((5, 5)), embeddings_t="t.npy", out=tmp_path / "x")
    assert "\n" not in str(e.value) and "'embeddings_s'" in str(e.value) and len(str(e.value)) < 200


def _embeddings(tmp_path):
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, 16))
    def draw(n, seed):
        g = np.random.default_rng(seed)
        x = centres[g.integers(0, 40, n)] + 0.6 * g.standard_normal((n, 16))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    paths = {}
    for name, n, seed in (("s", 800, 1), ("t", 6000, 2), ("r", 12000, 3)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], draw(n, seed))
    return paths


def test_embeddings_and_reference_runs_are_bit_identical_on_1_and_2_workers(tmp_path, capsys, prefect_harness):
    p = _embeddings(tmp_path)
    outs, printed = [], []
    for w in (1, 2):
        argv = ["audit", "--embeddings-s", str(p["s"]), "--embeddings-t", str(p["t"]), "--reference", str(p["r"]),
                "--q", "100", "--selection-t", "2000", "--null-replicates", "19", "--no-efficiency", "--diversity-rows", "1000",
                "--workers", str(w), "--out", str(tmp_path / f"w{w}")] + (["--no-report"] if w == 2 else [])
        assert main(argv) == 0
        outs.append((tmp_path / f"w{w}" / "result.json").read_text())
        printed.append(json.loads(capsys.readouterr().out)["report"])
    a, b = (json.loads(o) for o in outs)
    assert set(a["tests"]) == {"paper", "erl", "selection", "two_sample"}
    assert a["tests"]["selection"]["null_kind"] == "reference"
    # the report is drawn for w1 only: no number depends on it
    assert (tmp_path / "w1" / "report.html").is_file() and not (tmp_path / "w2" / "report.html").exists()
    assert printed == [str(tmp_path / "w1" / "report.html"), None]
    for r in (a, b):
        r.pop("timings"), r.pop("run_info")   # when and where: not part of the numbers
        r["settings"].pop("workers")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
