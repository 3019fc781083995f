"""`modeaudit compare RUN_A RUN_B`: which of two runs is more collapsed (issue 8, part 3)."""
import json

import numpy as np
import pytest

from modeaudit.flows.audit import audit_flow
from modeaudit.flows.cli import main
from modeaudit.storage.layout import comparable_result
from modeaudit.storage.store import RunStore
from modeaudit.tasks.config import AuditConfig
from modeaudit.tasks.stats.compare import compare_runs, decide, fd_subsample, mccs_terms

SMALL = dict(m=800, M=8000, q=50, n_a=100, n_c=8000, tests="paper", efficiency=False, diversity_rows=0, report=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness, scheduler):
    root = tmp_path_factory.mktemp("cmp")
    made = {}
    for name, gen, seed, opts in (("null1", "synthetic:null", 1, {}), ("null2", "synthetic:null", 2, {}),
                                  ("planted", "synthetic:planted", 3, {})):
        cfg = AuditConfig(out=str(root / name), generator=gen, seed=seed, generator_options=opts,
                          scheduler=scheduler, **SMALL)
        audit_flow(cfg.to_dict())
        made[name] = root / name
    made["narrow"] = _narrow_embeddings_run(root / "narrow", made["null1"])
    made["root"] = root
    return made


def _narrow_embeddings_run(out, like):
    """An embeddings audit's directory with 32-d files (its result.json: null1's, re-pointed at the files; an
    audit proper would cost the suite seconds, and compare reads only these keys)."""
    out.mkdir()
    rng = np.random.default_rng(0)
    res = json.loads((like / "result.json").read_text())
    for key, rows in (("embeddings_s", 1000), ("embeddings_t", 2000)):
        x = rng.normal(size=(rows, 32)).astype(np.float32)
        np.save(out / f"{key}.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
        res["source"][key] = str(out / f"{key}.npy")
    res["source"].update(kind="embeddings", generator=None)
    (out / "result.json").write_text(json.dumps(res))
    return out


def _cmp(runs, a, b, out, *extra):
    return main(["compare", str(runs[a]), str(runs[b]), "--out", str(out), "--replicates", "200", "--fd-rows", "3000", *extra])


def _read(out):
    return json.loads((out / "compare.json").read_text())


def test_planted_is_more_collapsed_both_ways(runs, capsys):
    root = runs["root"]
    assert _cmp(runs, "null1", "planted", root / "c_np") == 0
    doc = _read(root / "c_np")
    assert doc["more_collapsed"] == "B" and doc["verdict"]["level"] == "collapse"
    b0 = next(b for b in doc["test"]["balls"] if b["mode_of"] == "B" and b["rank"] == 0)
    assert b0["reject"] and b0["direction"] == "B" and b0["x_b"] > 5 * b0["x_a"]
    assert doc["mccs"]["interval"][0] > 0 and doc["mccs"]["b"] > doc["mccs"]["a"]
    # each run's own worst-case MCCS comes back (its result.json value, same rows and theta)
    for side, run in (("a", "null1"), ("b", "planted")):
        res = json.loads((runs[run] / "result.json").read_text())
        assert doc["mccs"][side] == pytest.approx(res["worst_case"]["mccs"], rel=1e-9)
    assert (root / "c_np" / "compare.html").read_text().count("B is more collapsed than A") == 1
    assert _cmp(runs, "planted", "null1", root / "c_pn") == 0
    assert _read(root / "c_pn")["more_collapsed"] == "A"
    assert '"more_collapsed": "B"' in capsys.readouterr().out


def test_two_null_seeds_give_no_verdict(runs):
    out = runs["root"] / "c_nn"
    assert _cmp(runs, "null1", "null2", out) == 0
    doc = _read(out)
    assert doc["more_collapsed"] is None and not any(b["reject"] for b in doc["test"]["balls"])
    assert len(doc["test"]["balls"]) == 20


def test_counts_equal_float64_brute_force(runs):
    out = runs["root"] / "c_np"     # written by the first test; made here when this test runs alone
    if not (out / "compare.json").exists():
        assert _cmp(runs, "null1", "planted", out) == 0
    doc = _read(out)
    d0 = doc["radius"]
    T = {k: RunStore.open(runs[k]).read("T", "emb").astype(np.float64) for k in ("null1", "planted")}
    for b in doc["test"]["balls"]:
        S = RunStore.open(runs["null1" if b["mode_of"] == "A" else "planted"]).read("S", "emb")
        a = S[b["s_index"]].astype(np.float64)
        for key, run in (("x_a", "null1"), ("x_b", "planted")):
            d = np.arccos(np.clip(T[run] @ a, -1, 1)) / np.pi
            assert b[key] == int(np.count_nonzero(d <= d0))


def test_fail_on_collapse(runs):
    root = runs["root"]
    assert _cmp(runs, "null1", "planted", root / "g1", "--fail-on", "collapse") == 3
    assert _cmp(runs, "planted", "null1", root / "g2", "--fail-on", "collapse") == 0
    assert _cmp(runs, "null1", "null2", root / "g3", "--fail-on", "collapse") == 0


def test_deterministic_across_invocations(runs):
    root = runs["root"]
    for out in ("d1", "d2"):
        assert _cmp(runs, "null1", "planted", root / out) == 0
    a, b = (comparable_result(_read(root / o)) for o in ("d1", "d2"))
    assert a == b
    strip = lambda t: "\n".join(l for l in t.splitlines() if '"total"' not in l)  # noqa: E731
    assert strip((root / "d1/compare.json").read_text()) == strip((root / "d2/compare.json").read_text())


def test_bad_inputs_one_line_exit_2(runs, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    notrun = tmp_path / "notrun"
    notrun.mkdir()
    cases = [
        (["compare", str(tmp_path / "missing"), str(runs["null1"])], "no such directory"),
        (["compare", str(notrun), str(runs["null1"])], "no finished audit"),
        (["compare", str(runs["null1"]), str(runs["narrow"])], "128-d embeddings but RUN_B 32-d"),
        (["compare", str(runs["null1"]), str(afile)], "is a file"),
    ]
    for argv, msg in cases:
        out = tmp_path / "o"
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("modeaudit: error: ") and msg in err, err
        assert not out.exists()
    assert main(["compare", str(runs["null1"]), str(runs["null2"]), "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and afile.read_text() == "x"
    users = tmp_path / "users"              # a folder with the user's own compare.html: never overwritten
    users.mkdir()
    (users / "compare.html").write_text("mine")
    assert main(["compare", str(runs["null1"]), str(runs["null2"]), "--out", str(users)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "that modeaudit compare did not write" in err, err
    assert (users / "compare.html").read_text() == "mine" and not (users / "compare.json").exists()
    for flag, value in (("--alpha", "1.5"), ("--alpha", "nan"), ("--seed", "-1")):
        assert main(["compare", str(runs["null1"]), str(runs["null2"]), "--out", str(tmp_path / "o2"),
                     flag, value]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        assert not (tmp_path / "o2").exists()


def test_a_damaged_store_or_changed_file_is_an_error_not_a_verdict(runs, tmp_path, capsys):
    """A deleted or overwritten chunk of T once gave exit 0 and "A is more collapsed" (a deleted chunk reads as
    zeros) or a traceback; an embeddings run whose file now holds NaN rows, a traceback. Each is one line, exit 2."""
    import shutil
    chunks = sorted((runs["null2"] / "store.zarr" / "T" / "emb").rglob("c/*/*"))
    assert chunks
    for name, damage in (("deleted", lambda p: p.unlink()), ("garbage", lambda p: p.write_bytes(b"garbage\n"))):
        copy = tmp_path / name
        shutil.copytree(runs["null2"], copy)
        damage(copy / chunks[0].relative_to(runs["null2"]))
        out = tmp_path / f"o_{name}"
        assert main(["compare", str(runs["null1"]), str(copy), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no longer match the checksums" in err and "'T'" in err, err
        assert not out.exists()
    nan = tmp_path / "nan_run"
    shutil.copytree(runs["narrow"], nan)
    res = json.loads((nan / "result.json").read_text())
    t = np.load(res["source"]["embeddings_t"])
    t[5] = np.nan
    res["source"]["embeddings_t"] = str(nan / "t.npy")
    np.save(nan / "t.npy", t)
    (nan / "result.json").write_text(json.dumps(res))
    assert main(["compare", str(runs["narrow"]), str(nan), "--out", str(tmp_path / "o_nan")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or Inf (first: row 5)" in err, err


def test_decide_and_helpers():
    t = lambda r, d: {"reject": r, "direction": d}  # noqa: E731
    assert decide([t(True, "B"), t(False, "A")]) == ("B", False)
    assert decide([t(True, "A")]) == ("A", False)
    assert decide([t(True, "A"), t(True, "B")]) == (None, True)
    assert decide([t(False, "B")]) == (None, False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    terms = mccs_terms(x[0], x, 300, 0.3)
    assert terms[0] == pytest.approx(1.0) and np.all((terms >= 0) & (terms <= 1))
    assert fd_subsample(x, x, 1000, 0)["value"] == pytest.approx(0.0, abs=1e-9)


def test_balls_differing_both_ways_are_a_warning():
    """A has extra mass on ball 1, B on ball 2: rejections both ways -> null, conflicting, level warning."""
    rng = np.random.default_rng(1)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    e = np.eye(16)
    base = lambda n: unit(rng.normal(size=(n, 16)))  # noqa: E731
    near = lambda c, n: unit(c + 0.05 * rng.normal(size=(n, 16)))  # noqa: E731
    T_A = np.concatenate([base(3000), near(e[0], 300), near(e[1], 30)])
    T_B = np.concatenate([base(3000), near(e[0], 30), near(e[1], 300)])
    r = compare_runs(unit(e[:1]), unit(e[1:2]), T_A, T_B, d0=0.1, alpha=0.05, worst_a=e[0], worst_b=e[1],
                     n_c_a=len(T_A), n_c_b=len(T_B), theta=0.3, replicates=100, fd_rows=500)
    assert [b["direction"] for b in r["test"]["balls"]] == ["A", "B"] and all(b["reject"] for b in r["test"]["balls"])
    assert r["more_collapsed"] is None and r["conflicting"] and r["verdict"]["level"] == "warning"
