"""The CLI on bad input: a one-line error that names the problem, exit != 0, and no result.json."""
import subprocess
import sys

import numpy as np
import pytest

from modeaudit.flows.cli import main


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "s.npy", unit(300, 8, 1))
    np.save(tmp_path / "t.npy", unit(2000, 8, 2))
    return tmp_path


def expect_error(argv, capsys, match, out=None):
    assert main(argv) == 2
    full = capsys.readouterr().err.strip()
    # Prefect may log a line before ours (the failed stage), but never a traceback.
    err = full.splitlines()[-1]
    assert err.startswith("modeaudit: error: ") and "Traceback" not in full, full
    assert match in err, err
    if out is not None:
        assert not (out / "result.json").exists()
    return err


def emb_args(f, s="s.npy", t="t.npy", *extra):
    return ["audit", "--embeddings-s", str(f / s), "--embeddings-t", str(f / t), "--out", str(f / "out"), *extra]


@pytest.mark.parametrize("bad, match", [
    (np.full((5, 8), np.nan, np.float32), "NaN or Inf"),
    (np.vstack([unit(4, 8), np.zeros((1, 8), np.float32)]), "all-zero row"),
])
def test_nonfinite_and_zero_rows(files, capsys, bad, match, prefect_harness, scheduler):
    t = unit(2000, 8, 2)
    t[1500:1500 + len(bad)] = bad
    np.save(files / "t_bad.npy", t)
    err = expect_error(emb_args(files, "s.npy", "t_bad.npy", "--scheduler", scheduler), capsys, match, files / "out")
    assert "--embeddings-t" in err and "row 150" in err


@pytest.mark.parametrize("argv_extra, files_fn, match", [
    ([], lambda f: np.save(f / "t.npy", unit(2000, 9)), "width 8 but T rows have width 9"),
    ([], lambda f: np.save(f / "t.npy", np.zeros((0, 8), np.float32)), "is empty"),
    (["--d0", "1.5"], None, "d0=1.5 is outside (0, 1)"),
    (["--radii", "0.1:1.2:0.1"], None, "outside (0, 1)"),
    (["--q", "301"], None, "--q 301 is larger than m=|S|=300"),
    (["--p", "400"], None, "--p 400 is larger than m=|S|=300"),
])
def test_bad_embeddings_and_settings(files, capsys, argv_extra, files_fn, match):
    if files_fn:
        files_fn(files)
    expect_error(emb_args(files, "s.npy", "t.npy", *argv_extra), capsys, match, files / "out")


def test_bad_generator_and_dir(tmp_path, capsys):
    expect_error(["audit", "--generator", "synthetic:nope", "--out", str(tmp_path / "o")], capsys,
                 "unknown generator 'synthetic:nope'", tmp_path / "o")
    expect_error(["audit", "--generator", "synthetic:planted", "-G", "colour=red", "--out", str(tmp_path / "o")],
                 capsys, "no option 'colour'", tmp_path / "o")
    (tmp_path / "file").write_text("not a dir")
    expect_error(["audit", "--generator", "synthetic:planted", "--out", str(tmp_path / "file" / "run")], capsys,
                 "cannot write to --out")
    expect_error(["audit", "--generator", "synthetic:planted", "--embeddings-s", "x.npy", "--out",
                  str(tmp_path / "o")], capsys, "either --generator")


def test_console_script_exit_code(tmp_path):
    """`python -m modeaudit.flows.cli` with a bad setting: exit 2, one line. It, a refused watch and a refused
    calibrate (same process) answer before Prefect loads (a typo costs a second or two, not ~3 s more of
    imports); the audit and the watch before zarr too."""
    code = ("import runpy, sys\n"
            "try:\n    runpy.run_module('modeaudit.flows.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "from modeaudit.flows.cli import main\n"
            "seen = ['prefect' in sys.modules, 'zarr' in sys.modules]\n"
            f"rc_watch = main(['watch', {str(tmp_path / 'no-ckpt')!r}, '--out', {str(tmp_path / 'w')!r}, '--once'])\n"
            "seen += ['prefect' in sys.modules, 'zarr' in sys.modules]\n"
            f"rc_cal = main(['calibrate', '--run', {str(tmp_path)!r}, '--method', 'cluster'])\n"
            "print(rc_watch, rc_cal, *seen, 'prefect' in sys.modules)\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, "audit", "--generator", "synthetic:planted",
                        "--d0", "0", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    err = r.stderr.splitlines()
    assert r.returncode == 2 and "d0=0.0 is outside" in err[0] and len(err) == 3, r.stderr
    assert "does not exist" in err[1] and "holds no finished audit" in err[2], r.stderr
    assert r.stdout.split() == ["2", "2", "False", "False", "False", "False", "False"], r.stdout
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_non_unit_rows_are_normalised_and_recorded(files, capsys, prefect_harness, scheduler):
    s = unit(300, 8, 1)
    s[:7] *= 3.0
    np.save(files / "s3.npy", s)
    fast = ["--q", "50", "--scheduler", scheduler, "--tests", "paper,erl", "--no-efficiency"]
    assert main(emb_args(files, "s3.npy", "t.npy", *fast)) == 0
    import json
    r = json.loads((files / "out" / "result.json").read_text())
    assert r["normalization"]["S"]["renormalized_rows"] == 7 and r["normalization"]["T"]["renormalized_rows"] == 0
    # Scaling rows must not change any count: the statistics are on directions.
    np.save(files / "s1.npy", unit(300, 8, 1))
    assert main(emb_args(files, "s1.npy", "t.npy", *fast, "--overwrite")) == 0
    r1 = json.loads((files / "out" / "result.json").read_text())
    assert r1["curves"] == r["curves"] and r1["worst_case"]["s_index"] == r["worst_case"]["s_index"]


def test_reference_generator_needs_a_generator(files, capsys):
    # Embeddings come from the user's own descriptor: a reference generator could not be embedded alike.
    expect_error(emb_args(files, "s.npy", "t.npy", "--reference-generator", "synthetic:null"), capsys,
                 "--reference-generator needs --generator", files / "out")


def test_inf_rows_and_empty_s_and_unknown_test(files, capsys, prefect_harness, scheduler):
    s = unit(300, 8, 1)
    s[7, 3] = np.inf
    np.save(files / "s_inf.npy", s)
    err = expect_error(emb_args(files, "s_inf.npy", "t.npy", "--scheduler", scheduler), capsys, "NaN or Inf",
                       files / "out")
    assert "--embeddings-s" in err and "row 7" in err
    np.save(files / "s_empty.npy", np.zeros((0, 8), np.float32))
    expect_error(emb_args(files, "s_empty.npy"), capsys, "is empty", files / "out")
    expect_error(emb_args(files, "s.npy", "t.npy", "--tests", "paper,magic"), capsys, "unknown test 'magic'",
                 files / "out")


def test_zarr_embeddings_give_the_numbers_of_npy(files, capsys, prefect_harness, scheduler):
    import json
    import zarr
    for name in ("s", "t"):
        x = np.load(files / f"{name}.npy")
        z = zarr.create_array(str(files / f"{name}.zarr"), shape=x.shape, chunks=(512, 8), dtype="float32")
        z[:] = x
    common = ["--q", "50", "--tests", "paper,erl", "--null-replicates", "39", "--scheduler", scheduler,
              "--no-efficiency"]
    assert main(emb_args(files, "s.npy", "t.npy", *common)) == 0
    a = json.loads((files / "out" / "result.json").read_text())
    argv = ["audit", "--embeddings-s", str(files / "s.zarr"), "--embeddings-t", str(files / "t.zarr"),
            "--out", str(files / "out_z"), *common]
    assert main(argv) == 0
    b = json.loads((files / "out_z" / "result.json").read_text())
    assert a["worst_case"] == b["worst_case"] and a["curves"] == b["curves"] and a["mccs"] == b["mccs"]


def test_torchscript_generator_and_descriptor(tmp_path):
    torch = pytest.importorskip("torch")
    from modeaudit.tasks.models.descriptors import build_descriptor
    from modeaudit.tasks.models.generators import build_generator, tiny_image_module
    gen_path, desc_path = tmp_path / "g.pt", tmp_path / "d.pt"
    torch.jit.trace(tiny_image_module(8, 16, 0), torch.zeros(2, 8)).save(str(gen_path))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 12))
    torch.jit.trace(net, torch.zeros(2, 3, 16, 16)).save(str(desc_path))
    g = build_generator(f"torchscript:{gen_path}", {"latent_dim": "8", "batch_size": "7"})
    z = g.latents(0, "S", 0, 20)
    img = g.generate(z)
    assert img.shape == (20, 3, 16, 16) and np.isfinite(img).all()
    with torch.no_grad():
        want = tiny_image_module(8, 16, 0)(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(img, want, atol=1e-6)
    d = build_descriptor(f"torchscript:{desc_path}", {"batch_size": "6"})
    e = d.embed(img)   # raw rows: the store normalises (and records) them
    with torch.no_grad():
        np.testing.assert_allclose(e, net(torch.from_numpy(img)).numpy(), atol=1e-5)
    assert "sha256" in g.fingerprint()


@pytest.mark.parametrize("command", ["audit", "calibrate", "metrics", "compare", "watch"])
def test_help_shows_only_informative_defaults(command, capsys):
    """argparse's default formatter printed "--no-report ... (default: True)", which reads as if the flag were
    on, "(default: None)" for unset options and two defaults where the help already named one."""
    from modeaudit.flows.cli import main
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    assert text.count("(default") >= 1


def test_heartbeats_are_off_only_on_the_temporary_server():
    """A CLI run on Prefect's temporary server waited up to a second per flow for the heartbeat thread; against a
    configured server (crash detection of deployed runs) heartbeats stay on."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
    from modeaudit.flows.cli import no_heartbeats_on_a_temporary_server
    on = get_current_settings().flows.heartbeat_frequency
    assert on is not None                  # Prefect's default: on (180 s)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        with no_heartbeats_on_a_temporary_server():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == on
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        with no_heartbeats_on_a_temporary_server():
            assert get_current_settings().flows.heartbeat_frequency == on


def test_count_reads_integers_exactly():
    """--workers 1000000000000000000000000 was echoed back as 999999999999999983222784 (read through a float)."""
    import argparse
    from modeaudit.flows.args import count
    assert count("1" + "0" * 24) == 10 ** 24 and count("1e5") == 100_000 and count(" +7 ") == 7
    for bad in ("-3", "1.5", "abc", "-1e2", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            count(bad)
