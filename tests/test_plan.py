"""The execution plan (tasks/plan.py): the cluster kind of a GPU run with and without dask-cuda."""
import io

import pytest

from modeaudit.tasks import config, console, plan


@pytest.fixture
def on_a_gpu(monkeypatch):
    """plan_execution as on a GPU machine: "auto" resolves to the CUDA kernel."""
    monkeypatch.setattr(config, "kernel_for", lambda kernel: "torch-cuda" if kernel == "auto" else kernel)


def test_gpu_run_with_dask_cuda_gets_one_worker_per_gpu(on_a_gpu, monkeypatch):
    monkeypatch.setattr(plan, "_dask_cuda_problem", lambda: None)
    p = plan.plan_execution("auto", workers=2)
    assert (p.kernel, p.cluster, p.model_device, p.note) == ("torch-cuda", "local-cuda", "cuda", None)


def test_gpu_run_without_dask_cuda_runs_on_plain_workers_and_says_why(on_a_gpu, monkeypatch):
    """dask-cuda is an optional extra: a GPU machine without it must still run, not fail importing it."""
    monkeypatch.setattr(plan, "_dask_cuda_problem", lambda: "dask-cuda is not installed")
    p = plan.plan_execution("auto", workers=2)
    assert (p.kernel, p.cluster, p.workers, p.model_device) == ("torch-cuda", "local", 2, "cuda")
    assert p.note.startswith("dask-cuda is not installed: ") and "modeaudit[gpu]" in p.note
    from modeaudit.flows import cluster
    started = []

    def start(pl, kwargs):        # the first start fails as a dying worker does; the retry succeeds
        started.append(pl.cluster)
        if len(started) == 1:
            raise RuntimeError("Worker failed to start")
        return "cluster"
    monkeypatch.setattr(cluster, "_local_cluster", start)
    err = io.StringIO()
    with console.terminal(stream=err, dashboard=False):
        assert cluster._start_local(p) == "cluster"
    assert started == ["local", "local"] and err.getvalue() == f"modeaudit: {p.note}\n"     # said once


def test_dask_cuda_that_does_not_import_is_named_as_such(monkeypatch, tmp_path):
    """Installed but broken (a missing dependency of its own): the note says so, not "not installed"."""
    import sys
    (tmp_path / "dask_cuda").mkdir()
    (tmp_path / "dask_cuda" / "__init__.py").write_text("import no_such_module_pynvml_stand_in\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "dask_cuda", raising=False)
    why = plan._dask_cuda_problem()
    assert why.startswith("dask-cuda is installed but does not import (ModuleNotFoundError: ")
    assert "no_such_module_pynvml_stand_in" in why


def test_cpu_and_external_plans_carry_no_note():
    assert plan.plan_execution("fast").note is None
    ext = plan.plan_execution("fast", scheduler="tcp://127.0.0.1:8786")
    assert ext.cluster == "external" and ext.note is None


def test_deploy_cuda_cluster_without_dask_cuda_is_one_clean_line(monkeypatch, capsys):
    import sys
    from modeaudit.deploy import clusters
    monkeypatch.setitem(sys.modules, "dask_cuda", None)      # as if not installed: its import fails
    with pytest.raises(SystemExit) as e:
        clusters.main(["cuda"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("modeaudit: error: ") and "modeaudit[gpu]" in err and len(err.splitlines()) == 1


def test_model_device_needs_no_cluster_plan(on_a_gpu, monkeypatch):
    """The models' device is the plan's, decided without choosing the cluster (no dask-cuda import in preflight)."""
    monkeypatch.setattr(plan, "_dask_cuda_problem", lambda: pytest.fail("model_device planned a cluster"))
    assert plan.model_device("auto") == "cuda" and plan.model_device("fast") == "cpu"
