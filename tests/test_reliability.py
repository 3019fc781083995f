"""Nothing lost, nothing silently wrong: refused reruns keep the old run, bad inputs get one line (RELIABILITY.md)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from modeaudit.flows.cli import main
from modeaudit.tasks.join.sources import row_norms, unit_rows


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def expect_error(argv, capsys, match):
    assert main(argv) == 2
    full = capsys.readouterr().err.strip()
    err = full.splitlines()[-1]
    assert err.startswith("modeaudit: error: ") and "Traceback" not in full, full
    assert match in err, err
    return err


SMALL = ["--m", "1000", "--M", "6000", "--q", "100", "--anchors", "200", "--mccs-set", "6000", "--tests", "paper,erl",
         "--no-efficiency"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prefect_harness, scheduler):
    out = tmp_path_factory.mktemp("rel") / "run"
    assert main(["audit", "--generator", "synthetic:planted", *SMALL, "--scheduler", scheduler, "--out", str(out)]) == 0
    return out


def _snapshot(d):
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file() and ".lock" not in p.name}


@pytest.mark.parametrize("extra, match", [
    (["--seed", "1"], "already holds a different run"),            # refused by the fingerprint
    (["--seed", "-1"], "seed=-1 is negative"),
    (["--overwrite", "--d0", "-1"], "d0=-1.0 is outside"),          # --overwrite validates before deleting
    (["--radii", "0.1:0.05:0.01"], "radii must be a non-empty"),
])
def test_refused_rerun_leaves_the_earlier_run_whole(finished_run, capsys, extra, match, scheduler):
    before = _snapshot(finished_run)
    assert "result.json" in before and "report.html" in before
    expect_error(["audit", "--generator", "synthetic:planted", *SMALL, "--scheduler", scheduler,
                  "--out", str(finished_run), *extra], capsys, match)
    assert _snapshot(finished_run) == before


def test_a_different_run_is_refused_before_the_flow_starts(finished_run, capsys, monkeypatch, scheduler):
    """The fingerprint check runs in the CLI's preflight (no Prefect, no cluster): the flow is never
    entered for a different run, and is entered for the same one (a resume is not refused)."""
    import modeaudit.flows.audit as flow_module

    class Started(Exception):
        pass

    def started(*a, **k):
        raise Started

    monkeypatch.setattr(flow_module, "audit_flow", started)
    args = ["audit", "--generator", "synthetic:planted", *SMALL, "--scheduler", scheduler, "--out", str(finished_run)]
    expect_error(args + ["--seed", "1"], capsys, "already holds a different run")
    expect_error(args + ["-G", "planted_prob=0.03"], capsys, "fingerprint.generator.options.planted_prob")
    with pytest.raises(Started):
        main(args)


def test_a_failed_run_removes_only_what_it_wrote(tmp_path, capsys, prefect_harness, scheduler):
    """--out "X/new/.." is X, a folder of the user's: a run failing there (bad rows found on the cluster) once
    deleted all of X. It leaves X's files alone and takes back only its own half result, so the rerun with
    corrected inputs is not refused as a different run."""
    x = tmp_path / "x"
    (x / "sub").mkdir(parents=True)
    (x / "notes.txt").write_text("mine")
    (x / "sub" / "d.csv").write_text("1,2")
    s = unit(400, 8, 1)
    np.save(x / "s.npy", s)
    bad = unit(400, 8, 2)
    bad[3, 2] = np.nan
    np.save(x / "t.npy", bad)
    mine = {p: p.read_bytes() for p in x.rglob("*") if p.is_file()}
    args = ["audit", "--embeddings-s", str(x / "s.npy"), "--embeddings-t", str(x / "t.npy"), "--q", "50",
            "--anchors", "100", "--mccs-set", "400", "--tests", "paper", "--no-efficiency", "--no-report",
            "--scheduler", scheduler]
    expect_error(args + ["--out", str(x / "new" / "..")], capsys, "NaN or Inf")
    assert {p: p.read_bytes() for p in x.rglob("*") if p.is_file()} == mine and not (x / "new").exists()
    assert not [p.name for p in x.iterdir() if p.name in ("manifest", "store.zarr", "scans", ".modeaudit.lock")]
    # A folder the user made for the run: emptied of the failed run's files, itself kept; then the rerun with
    # corrected rows is a new run there. A new folder the run made is removed with its contents.
    (tmp_path / "made").mkdir()
    expect_error(args + ["--out", str(tmp_path / "made")], capsys, "NaN or Inf")
    assert (tmp_path / "made").is_dir() and not list((tmp_path / "made").iterdir())
    expect_error(args + ["--out", str(tmp_path / "new")], capsys, "NaN or Inf")
    assert not (tmp_path / "new").exists()
    np.save(x / "t.npy", unit(400, 8, 2))
    assert main(args + ["--out", str(tmp_path / "made")]) == 0
    assert (tmp_path / "made" / "result.json").is_file()
    # The same run named through "made/new/..": resumed there, with a report whose printed path exists.
    capsys.readouterr()
    report_args = [a for a in args if a != "--no-report"]
    assert main(report_args + ["--out", str(tmp_path / "made" / "new" / "..")]) == 0
    printed = json.loads(capsys.readouterr().out)["report"]
    assert printed == str(tmp_path / "made" / "report.html") and Path(printed).is_file()
    assert not (tmp_path / "made" / "new").exists()


def test_a_failed_overwrite_leaves_no_earlier_result_over_its_store(tmp_path, prefect_harness):
    """--overwrite replaced the store and then the run failed on a NaN row found while generating: the earlier
    result.json stayed, describing a store that was gone ("result.json present" must mean "finished")."""
    import modeaudit
    from modeaudit.tasks.registry import ConfigError
    kw = dict(latent_dim=4, out=tmp_path / "run", tests="paper", efficiency=False, report=False, m=1000, M=6000,
              q=100, n_a=200, n_c=6000, diversity_rows=0)
    modeaudit.audit(generator=lambda z: np.tanh(z), **kw)
    assert (tmp_path / "run" / "result.json").is_file()

    def rare_nan(z):
        x = np.tanh(z)
        x[z[:, 0] > 3] = np.nan      # ~0.1% of rows: the trial row passes, generation finds some
        return x

    with pytest.raises(ConfigError, match="NaN"):
        modeaudit.audit(generator=rare_nan, overwrite=True, **kw)
    assert not (tmp_path / "run" / "result.json").exists()


def test_a_deployment_run_never_deletes_a_users_outputs(tmp_path, prefect_harness, scheduler):
    """A deployment calls the flow directly (no CLI preflight): a folder holding the user's own plots/ is
    refused, and nothing in it is deleted (a failing run took plots/ with it)."""
    from modeaudit.flows.audit import audit_flow
    y = tmp_path / "y"
    (y / "plots").mkdir(parents=True)
    (y / "plots" / "fig.png").write_bytes(b"mine")
    (y / "notes.txt").write_text("mine")
    s, t = unit(400, 8, 1), unit(400, 8, 2)
    t[3, 2] = np.nan
    np.save(tmp_path / "s.npy", s)
    np.save(tmp_path / "t.npy", t)
    state = audit_flow({"embeddings_s": str(tmp_path / "s.npy"), "embeddings_t": str(tmp_path / "t.npy"),
                        "out": str(y), "scheduler": scheduler, "tests": "paper", "efficiency": False}, return_state=True)
    assert state.is_failed() and "is not a modeaudit run" in state.message
    assert (y / "plots" / "fig.png").read_bytes() == b"mine" and (y / "notes.txt").read_text() == "mine"


def test_overwrite_never_touches_a_users_folder(tmp_path, capsys):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "mine.png").write_bytes(b"x")
    (tmp_path / "report.html").write_text("my report")
    expect_error(["audit", "--generator", "synthetic:planted", "--overwrite", "--out", str(tmp_path)], capsys,
                 "is not a modeaudit run")
    assert (tmp_path / "plots" / "mine.png").exists() and (tmp_path / "report.html").read_text() == "my report"


def test_same_file_as_s_and_t_and_tiny_t(tmp_path, capsys):
    np.save(tmp_path / "s.npy", unit(300, 8, 1))
    np.save(tmp_path / "t1.npy", unit(1, 8, 2))
    base = ["audit", "--embeddings-s", str(tmp_path / "s.npy"), "--out", str(tmp_path / "o")]
    expect_error(base + ["--embeddings-t", str(tmp_path / "s.npy")], capsys, "are the same file")
    expect_error(base + ["--embeddings-t", str(tmp_path / "t1.npy")], capsys, "needs at least 100 rows")
    assert not (tmp_path / "o").exists()


def test_extreme_rows_keep_their_direction():
    d = 8
    x = unit(50, d, 3).astype(np.float64)
    scaled = x * np.where(np.arange(50) % 3 == 0, 1e300, np.where(np.arange(50) % 3 == 1, 1e-60, 1.0))[:, None]
    np.testing.assert_allclose(unit_rows(scaled), x.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(row_norms(scaled)))
    # float32 rows whose squared norm overflows float32: their direction, not a zero row
    big = (x[:5] * 3e38 / np.abs(x[:5]).max()).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(unit_rows(big), axis=1), 1, rtol=1e-6)
    bad = x.copy()
    bad[4, 2] = np.nan
    assert not np.isfinite(row_norms(bad)[4]) and np.isfinite(row_norms(bad)[:4]).all()


@pytest.mark.parametrize("argv, match", [
    (["--scheduler", "localhost:8786"], "is not a Dask scheduler address"),
    (["--scheduler", "tcp://127.0.0.1:9"], "cannot reach the Dask scheduler"),
    (["--threads-per-worker", "0"], "threads_per_worker=0"),
    (["-G", "identities=1e9"], "GiB of world tables"),
    (["--alpha", "2"], "it is a test level"),
    (["--out", ""], "--out is empty"),
    (["--out", "s3://bucket/run"], "not URLs"),
])
def test_bad_options_are_one_line(argv, match, capsys, tmp_path):
    args = ["audit", "--generator", "synthetic:planted", "--out", str(tmp_path / "o"), *argv]
    expect_error(args, capsys, match)
    assert not (tmp_path / "o").exists()


def test_torch_models_fail_in_one_line(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from modeaudit.tasks.models.generators import tiny_image_module
    notts = tmp_path / "pickled.pt"
    torch.save({"a": torch.zeros(2)}, notts)
    gen = tmp_path / "g.pt"
    torch.jit.trace(tiny_image_module(8, 16, 0), torch.zeros(2, 8)).save(str(gen))
    scalar = tmp_path / "scalar.pt"
    class Scalar(torch.nn.Module):
        def forward(self, z):
            return z.sum(1)      # one number per latent, not an image
    torch.jit.script(Scalar()).save(str(scalar))
    base = ["audit", "--descriptor", "torch:tiny-cnn", "--out", str(tmp_path / "o")]
    expect_error(base + ["--generator", f"torchscript:{notts}"], capsys, "is not a TorchScript file")
    expect_error(base + ["--generator", f"torchscript:{gen}", "-G", "latent_dim=5"], capsys, "check -G latent_dim")
    expect_error(base + ["--generator", f"torchscript:{gen}", "-G", "latent_dim=8", "-G", "device=bogus"], capsys,
                 "is not a torch device")
    if not torch.cuda.is_available():
        expect_error(base + ["--generator", f"torchscript:{gen}", "-G", "latent_dim=8", "-G", "device=cuda"],
                     capsys, "no CUDA GPU is visible")
    expect_error(base + ["--generator", f"torchscript:{scalar}", "-G", "latent_dim=8"], capsys,
                 "it must return images (n, C, H, W) or rows")


def test_calibrate_on_a_corrupt_result(finished_run, tmp_path, capsys):
    import shutil
    bad = tmp_path / "copy"
    shutil.copytree(finished_run, bad)
    (bad / "result.json").write_text('{"source": {"kind": "generator"}')
    expect_error(["calibrate", "--run", str(bad)], capsys, "is not a complete modeaudit result")


def test_a_second_writer_is_refused(tmp_path, capsys):
    from modeaudit.storage.layout import run_lock
    from modeaudit.tasks.registry import ConfigError
    with run_lock(tmp_path):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):    # released on exit
        pass


def _die_once(marker, anchors, group):
    # A real SIGKILL of the worker process running this task, the first time only.
    import signal
    from pathlib import Path
    m = Path(marker)
    if not m.exists():
        m.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return [float(anchors.sum()) + g for g in group]


def test_killed_worker_is_survived_with_scattered_inputs_resent(tmp_path):
    from modeaudit.flows.cluster import dask_client
    from modeaudit.tasks.join import parallel
    from modeaudit.tasks.plan import ExecutionPlan
    anchors = np.ones((1024, 512), np.float32)          # > 1 MiB: scattered, so lost with the worker
    with dask_client(ExecutionPlan("fast", "local", 1, 1)) as client:   # the default: one worker
        import functools
        out = parallel._run(client, functools.partial(_die_once, str(tmp_path / "marker")), [[1], [2]], anchors)
    assert (tmp_path / "marker").exists()
    assert out == [[anchors.sum() + 1], [anchors.sum() + 2]]


def _where(x):
    return int(x.ctypes.data % 64), type(x).__name__, float(x[3, 5])


def test_scattered_arrays_arrive_aligned_on_every_worker(scheduler):
    """Dask puts a received array at any offset in its message (5 bytes past a 64-byte boundary measured
    here, a 3x slower GEMM); Shipped arrays are copied once on arrival, replicas included."""
    from distributed import Client

    from modeaudit.tasks.join import parallel
    from modeaudit.tasks.join.shipping import aligned, submit_unshipped
    x = np.arange(600 * 1001, dtype=np.float32).reshape(600, 1001)
    with Client(scheduler) as client:
        # Dask's active memory manager drops replicas no task waits for, every 2 s: on a loaded machine it
        # took the broadcast copy off one worker before who_has was read (a join's tasks wait on the array,
        # so there it keeps them). Paused for this test, on this shared cluster, so the replica is the one read.
        client.amm.stop()
        try:
            fut = parallel._scatter(client, x, {})
            workers = sorted(client.scheduler_info()["workers"])
            assert len(workers) == 2 and set(client.who_has(fut)[fut.key]) == set(workers)
            for w in workers:
                assert submit_unshipped(client, _where, fut, workers=[w]).result() == (0, "ndarray", float(x[3, 5]))
        finally:
            client.amm.start()
    odd = np.frombuffer(b"\0" + x.tobytes(), dtype=np.uint8)[1:].view(np.float32).reshape(x.shape)
    assert odd.ctypes.data % 64 != 0
    fixed = aligned(odd)
    assert fixed.ctypes.data % 64 == 0 and np.array_equal(fixed, x) and aligned(fixed) is fixed


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MiB tmpfs (skipped, saying so, where this process may not mount one)."""
    import subprocess
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): disk-full case not run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_one_line_and_resumable(tiny_disk, capsys, prefect_harness, scheduler):
    out = tiny_disk / "run"
    err = expect_error(["audit", "--generator", "synthetic:planted", *SMALL, "--M", "24000", "--mccs-set", "24000",
                        "--shard-rows", "1000",
                        "--scheduler", scheduler, "--out", str(out)], capsys, "o space left on")
    # Where the disk fills (a shard, or the store's own files) decides the wording, never the form.
    assert not (out / "result.json").exists()


def test_fail_on_gates_the_exit_code(finished_run, capsys, scheduler):
    from modeaudit.flows.cli import gate
    assert [gate(lv, "collapse") for lv in ("ok", "warning", "collapse")] == [0, 0, 3]
    assert [gate(lv, "warning") for lv in ("ok", "warning", "collapse")] == [0, 3, 3]
    assert [gate(lv, "never") for lv in ("ok", "warning", "collapse")] == [0, 0, 0]
    # The finished run: planted world, only uncontrolled tests -> an amber verdict ("warning").
    assert json.loads((finished_run / "result.json").read_text())["verdict"]["level"] == "warning"
    argv = ["audit", "--generator", "synthetic:planted", *SMALL, "--scheduler", scheduler, "--out", str(finished_run)]
    assert main(argv + ["--fail-on", "warning"]) == 3
    assert main(argv + ["--fail-on", "collapse"]) == 0
