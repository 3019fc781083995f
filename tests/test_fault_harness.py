"""The fault-injection harness (benchmarks/fault_injection.py): its verdicts, and (slow) a real randomised pass."""
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load

HARNESS = Path(__file__).parents[1] / "benchmarks" / "fault_injection.py"


def _harness():
    return load("fault_injection")


def test_the_harness_judges_every_outcome(tmp_path):
    fi = _harness()
    ref = {"x": 1, "settings": {}, "source": {}}
    out = tmp_path / "run"
    out.mkdir()
    assert fi._judge(0, "", out, ref) == "NO-RESULT"
    (out / "result.json").write_text('{"x": 1, "settings": {"workers": 2}, "source": {"shards": 3}, "timings": {}}')
    assert fi._judge(0, "", out, ref) == "identical"        # workers, shards and timings are run history
    (out / "result.json").write_text('{"x": 2, "settings": {}, "source": {}}')
    assert fi._judge(0, "", out, ref) == "DIFFERENT"
    assert fi._judge(2, "log\nmodeaudit: error: disk full", out, ref) == "TRACEBACK"   # a result.json was left
    (out / "result.json").unlink()
    assert fi._judge(2, "log\nmodeaudit: error: no space left", out, ref) == "clean-error"
    assert fi._judge(1, "Traceback (most recent call last):\n...", out, ref) == "TRACEBACK"
    assert fi._judge(2, "Traceback ...\nmodeaudit: error: x", out, ref) == "TRACEBACK"
    assert fi._judge(-9, "", out, ref) == "TRACEBACK"


@pytest.mark.slow
def test_randomised_faults_end_identical_or_clean(tmp_path):
    """Real SIGKILLs of the flow and of workers, corrupt chunks, a full tmpfs: `pytest -m slow` (~5 min here)."""
    p = subprocess.run([sys.executable, str(HARNESS), "--runs", "4", "--seed", "5", "--work", str(tmp_path / "f")],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "summary:" in p.stdout
