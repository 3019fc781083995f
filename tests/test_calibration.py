"""Black-box calibration samplers (tasks/calibration/samplers.py) on synthetic:planted.

World: 100 identities + one planted identity holding 10 % of the mass (the
region z[0] < Phi^-1(0.1) of latent space). A typical identity holds
(1 - 0.1) / 100 = 0.9 %; calibration must bring the planted share down to about
that. Sizes are small (N = 20000 fitting rows, 20000 calibrated rows).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from modeaudit.tasks.calibration import samplers as C
from modeaudit.tasks.models.generators import build_generator
from modeaudit.tasks.registry import ConfigError
from modeaudit.tasks.models.rng import latent_rows, uniform_rows

OPTS = {"dim": "32", "identities": "100", "planted_prob": "0.1", "latent_dim": "8"}
GEN = {"spec": "synthetic:planted", "options": OPTS}
DESC = {"spec": "identity", "options": {}}
TYPICAL = (1 - 0.1) / 100
R0 = 0.25
N = 20000
N_CAL = 20000


def _unit(e):
    e = np.asarray(e, np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base generator, the audit's outputs (Z, E of T, the densest mode, p1, p2) and fitted, saved calibrations."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODEAUDIT_THREADS", "1")       # CI box is shared: no oversubscribed OpenMP
        g = build_generator(GEN["spec"], OPTS)
        Z = latent_rows(0, "T", 0, N, g.latent_dim)
        E = _unit(g.generate(Z))
        ES = _unit(g.generate(latent_rows(0, "S", 0, 1000, g.latent_dim)))
        counts = C.densities(ES, E, R0)
        modes = ES[[int(np.argmax(counts))]]
        p1 = C.densities(modes, E, R0)
        p2 = float(np.median(C.densities(ES[:200], E, R0)))
        # The seed's Alg. 1 semantics (every cell with a dense member reshaped), which the
        # weight tests below pin; the default, reshape="excess", has its own tests.
        cluster = C.fit_cluster(Z, E, modes, R0, p2, K=64, seed=0, reshape="all")
        excess = C.fit_cluster(Z, E, modes, R0, p2, K=64, seed=0)
        rejection = C.fit_rejection(Z, E, modes, R0, p1, p2, n_top=100, seed=0)
    root = tmp_path_factory.mktemp("calibration")
    paths = {}
    for key, method, params, variant in (("cluster", "cluster", cluster, "cells"),
                                         ("rejection", "rejection", rejection, "descriptor"),
                                         ("excess", "cluster", excess, "cells")):
        paths[key] = root / key
        C.save_params(paths[key], params, {"method": method, "variant": variant, "base": GEN,
                                           "descriptor": DESC, "r0": R0})
    return {"g": g, "Z": Z, "E": E, "modes": modes, "p1": p1, "p2": p2, "cluster": cluster, "excess": excess,
            "rejection": rejection, "paths": paths, "truth": g.truth(Z)}


VARIANTS = {"gmm": ("cluster", ""), "cells": ("cluster", ""), "descriptor": ("rejection", ""),
            "latent": ("rejection", "logistic"), "latent-balls": ("rejection", "balls")}


def _calibrated(world, name, **opts):
    method, proxy = VARIANTS[name]
    return build_generator(f"calibrated:{world['paths'][method]}",
                           {"variant": name.split("-")[0], "proxy": proxy, **opts})


# (1) weights ------------------------------------------------------------------


def test_world_is_what_the_tests_assume(world):
    assert world["truth"].mean() == pytest.approx(0.1, abs=0.01)
    dense = C.dense_mask(world["E"], world["modes"], R0)
    assert np.array_equal(dense, world["truth"])                    # the mode is the planted identity
    assert world["p1"][0] == pytest.approx(0.1, abs=0.01)
    assert 0.3 * TYPICAL < world["p2"] < TYPICAL                    # typical neighbourhood within r0


def test_cluster_weights(world):
    pc = world["cluster"]
    w, f = pc["weights"], pc["dense_frac"]
    assert np.all(np.isfinite(w)) and np.all(w > 0) and np.all(w <= 1)
    assert np.all(w[f == 0] == 1.0)                                  # clean clusters untouched
    assert np.all(w[f > 0] < 1.0)
    assert w[np.argmax(f)] < 0.05                                    # the most planted cluster is cut hard
    assert np.all(np.diff(w[np.argsort(f)]) <= 0)                    # denser -> lighter
    assert pc["lam"] > 0 and pc["target_reached"] == 1.0
    assert pc["target_share"] == pytest.approx(world["p2"])          # |D| = 1
    assert C.cluster_share(pc["lam"], pc["pis"], f) == pytest.approx(pc["target_share"], rel=1e-9)
    assert pc["share_before"] == pytest.approx(world["truth"].mean())
    assert pc["pis"].sum() == pytest.approx(1.0) and pc["gmm_weights"].sum() == pytest.approx(1.0)
    assert np.all(np.isfinite(pc["gmm_chol"]))


def test_cluster_weights_edge_cases(world):
    Z, E, modes = world["Z"][:3000], world["E"][:3000], world["modes"]
    # already at or below the target: lam = 0, every weight 1
    pc = C.fit_cluster(Z, E, modes, R0, 0.5, K=8, seed=1)
    assert pc["lam"] == 0.0 and np.all(pc["weights"] == 1.0)
    # every cluster dense (r0 so wide that all rows are near the mode): the target cannot be reached
    pc = C.fit_cluster(Z, E, modes, 0.99, world["p2"], K=8, seed=1, lam_max=1e3)
    assert pc["target_reached"] == 0.0 and pc["lam"] == 1e3 and np.all(np.isfinite(pc["weights"]))


def test_excess_cells_only_reshape_what_the_null_cannot_explain(world):
    """reshape="excess": a cell is reshaped only when its dense count is significantly above
    |D| p2 per row (binomial, Bonferroni over K); every other cell keeps w = 1."""
    pe, pa = world["excess"], world["cluster"]
    w, f, n = pe["weights"], pe["dense_frac"], pe["counts"]
    flagged = pe["reshaped"].astype(bool)
    assert pe["excess_only"] == 1.0 and pe["n_reshaped"] == flagged.sum() > 0
    assert np.all(w[~flagged] == 1.0) and np.all(w[flagged] < 1.0)
    from scipy.stats import binom
    p = binom.sf(np.round(f * n) - 1, n, world["p2"])
    np.testing.assert_array_equal(flagged, (n > 0) & (f > 0) & (p < 0.05 / len(n)))
    assert pe["target_reached"] == 1.0
    assert C.cluster_share(pe["lam"], pe["pis"], f, flagged) == pytest.approx(pe["target_share"], rel=1e-9)
    # Cells fitted to the dense rows: the reshaping cuts into far less clean mass than Alg. 1's.
    assert pe["clean_tv"] < 0.5 * pa["clean_tv"]
    assert pe["cells_acceptance"] > pa["cells_acceptance"]
    with pytest.raises(ValueError, match="reshape"):
        C.fit_cluster(world["Z"][:500], world["E"][:500], world["modes"], R0, world["p2"], K=4, reshape="some")


def test_excess_cells_sampler_flattens_the_mode(world):
    g = world["g"]
    cg = build_generator(f"calibrated:{world['paths']['excess']}", {"variant": "cells"})
    z, att = cg.latents_with_attempts(3, "T", 0, N_CAL)
    after = cg.truth(z).mean()
    assert after <= 1.5 * TYPICAL and after >= 0.4 * world["p2"]
    assert after == pytest.approx(world["excess"]["achieved_share_estimate"], abs=0.002)
    assert C.acceptance_stats(att)["acceptance_rate"] == pytest.approx(world["excess"]["cells_acceptance"],
                                                                       abs=0.02)
    assert g.truth(g.latents(3, "T", 0, N_CAL)).mean() > 0.09


# (2) planted share after calibration --------------------------------------------


@pytest.mark.parametrize("name", ["gmm", "cells", "descriptor", "latent"])
def test_calibrated_planted_share(world, name):
    g = world["g"]
    before = g.truth(g.latents(3, "T", 0, N_CAL)).mean()
    cg = _calibrated(world, name)
    z, att = cg.latents_with_attempts(3, "T", 0, N_CAL)
    after = cg.truth(z).mean()
    assert before > 0.09
    assert after <= 1.5 * TYPICAL, f"{name}: planted share {after:.4f} (before {before:.4f})"
    assert after >= 0.4 * world["p2"], f"{name}: planted mode wiped out ({after:.4f})"
    st = C.acceptance_stats(att)
    if name == "gmm":
        assert st["acceptance_rate"] == 1.0
    elif name == "cells":
        assert st["acceptance_rate"] == pytest.approx(world["cluster"]["cells_acceptance"], abs=0.02)
        assert after == pytest.approx(world["cluster"]["achieved_share_estimate"], abs=0.002)
    else:
        key = "descriptor_acceptance" if name == "descriptor" else "logistic_acceptance"
        assert st["acceptance_rate"] == pytest.approx(world["rejection"][key], abs=0.01)
    assert st["cost_per_accepted"] == pytest.approx(1 / st["acceptance_rate"])


def test_balls_proxy_reaches_little(world):
    """The paper-like proxy (balls around the n_top=100 latents closest to the mode)
    covers ~15 % of the planted region: it cannot reach a typical share. Assert
    what it does reach, and that the sampler matches proxy_agreement's prediction."""
    cg = _calibrated(world, "latent-balls")
    share = cg.truth(cg.latents(3, "T", 0, N_CAL)).mean()
    agree = C.proxy_agreement(world["rejection"], GEN, DESC, n=N_CAL, seed=5, proxy="balls")
    assert agree["recall"] < 0.4
    assert 0.06 < share < 0.097
    assert share == pytest.approx(agree["share_latent"], abs=0.01)


def test_proxy_agreement_logistic(world):
    agree = C.proxy_agreement(world["rejection"], GEN, DESC, n=N_CAL, seed=5, proxy="logistic")
    assert agree["precision"] > 0.95 and agree["recall"] > 0.95
    assert agree["share_before"] == pytest.approx(0.1, abs=0.01)
    assert agree["share_descriptor"] <= 1.5 * TYPICAL and agree["share_latent"] <= 1.5 * TYPICAL
    assert agree["planted_descriptor"] == agree["share_descriptor"]   # dense == planted in this world
    assert agree["acceptance_latent"] == pytest.approx(agree["acceptance_descriptor"], abs=0.01)


# (3) determinism ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["gmm", "cells", "descriptor", "latent", "latent-balls"])
def test_rows_do_not_depend_on_the_split(world, name):
    cg = _calibrated(world, name, batch_size="1000")
    n = 3500
    whole = cg.latents(7, "T", 0, n)
    for cut in (1, 1234, 2000):
        parts = np.concatenate([cg.latents(7, "T", 0, cut), cg.latents(7, "T", cut, n)])
        assert np.array_equal(whole, parts)
    # a freshly built generator, same seed: same rows; another seed or stream: other rows
    again = _calibrated(world, name, batch_size="1000").latents(7, "T", 1500, n)
    assert np.array_equal(again, whole[1500:])
    assert not np.array_equal(cg.latents(8, "T", 0, n), whole)
    assert not np.array_equal(cg.latents(7, "S", 0, n), whole)
    if name != "gmm":   # rejection rows are raw proposals: the block size does not matter either
        assert np.array_equal(_calibrated(world, name).latents(7, "T", 0, n), whole)


def test_row_is_its_own_proposal_sequence(world):
    """Row j = the first accepted of latent_rows(seed, f"{stream}/try{a}", j, j+1), coin u{a}."""
    cg = _calibrated(world, "cells")
    rows = cg.latents(11, "T", 0, 300)
    for j in (0, 17, 299):
        for a in range(cg.max_attempts):
            z = latent_rows(11, f"T/try{a}", j, j + 1, cg.latent_dim)
            if uniform_rows(11, f"T/u{a}", j, j + 1)[0] < cg.accept_prob(z)[0]:
                break
        assert np.array_equal(rows[j], z[0])


def test_attempt_cap_and_stats(world):
    cg = _calibrated(world, "cells", max_attempts="1")
    with pytest.raises(RuntimeError, match="rejected 1 times"):
        cg.latents(0, "T", 0, 500)
    cg = _calibrated(world, "descriptor")
    _, att = cg.latents_with_attempts(0, "T", 0, 4096)
    st = cg.stats()
    assert st["accepted"] == 4096 and st["attempts"] == int(att.sum()) > 4096
    assert st["max_attempts_per_row"] == att.max() >= 2


# (4) save / load, registry --------------------------------------------------------


def test_save_load_round_trip(world, tmp_path):
    for method in ("cluster", "rejection"):
        params = world[method]
        got, meta = C.load_params(world["paths"][method])
        assert set(got) == set(params)
        for k, v in params.items():
            assert np.array_equal(np.asarray(got[k]), np.asarray(v)), k
        assert meta["method"] == method and meta["base"] == GEN and meta["r0"] == R0
        assert meta["params_sha256"] == C.params_checksum(params)
    # a modified params.npz is refused
    p = tmp_path / "bad"
    C.save_params(p, world["cluster"], {"method": "cluster", "variant": "gmm", "generator": GEN})
    assert build_generator(f"calibrated:{p}").base.fingerprint() == world["g"].fingerprint()   # "generator" key
    meta = json.loads((p / "meta.json").read_text())
    changed = dict(world["cluster"], lam=world["cluster"]["lam"] + 1)
    np.savez(p / "params.npz", **{k: np.asarray(v) for k, v in changed.items()})
    with pytest.raises(ConfigError, match="checksum"):
        C.load_params(p)
    assert meta["variant"] == "gmm"
    with pytest.raises(ConfigError, match="variant"):
        C.save_params(tmp_path / "x", world["cluster"], {"method": "cluster", "variant": "descriptor",
                                                          "generator": GEN})


def test_registry_builds_calibrated(world, tmp_path):
    spec = f"calibrated:{world['paths']['rejection']}"
    cg = build_generator(spec)
    assert isinstance(cg, C.CalibratedGenerator) and cg.variant == "descriptor"
    assert cg.latent_dim == 8 and cg.has_truth and cg.sample_kind == "embedding"
    fp = cg.fingerprint()
    assert fp["spec"] == spec and fp["params_sha256"] == C.params_checksum(world["rejection"])
    assert fp["base"] == world["g"].fingerprint()
    assert build_generator(spec, {"variant": "latent"}).fingerprint() != fp
    z = cg.latents(0, "T", 0, 64)
    assert np.array_equal(cg.generate(z), world["g"].generate(z))
    assert np.array_equal(cg.truth(z), world["g"].truth(z))
    with pytest.raises(ConfigError, match="variant"):
        build_generator(spec, {"variant": "cells"})
    with pytest.raises(ConfigError, match="params.npz"):
        build_generator(f"calibrated:{tmp_path / 'nothing'}")
    # the audit's shard path builds it by spec too
    from modeaudit.tasks.models.shards import embed_rows
    zz, emb, truth, _ = embed_rows({"spec": spec, "options": {}}, DESC, 0, "T", 100, 300)
    assert np.array_equal(zz, cg.latents(0, "T", 100, 300)) and truth.shape == (200,)
    assert np.allclose(emb, _unit(world["g"].generate(zz)), atol=1e-6)


# (5) the cells sampler is exact inside a cell -------------------------------------


def test_cells_sampler_is_normal_inside_a_clean_cell(world):
    pc = world["cluster"]
    cg = _calibrated(world, "cells")
    z = cg.latents(21, "T", 0, 40000)
    cells = C._nearest(z, pc["centroids"])
    # cell frequencies follow pi_k w_k / sum(pi w)
    freq = np.bincount(cells, minlength=len(pc["pis"])) / len(z)
    expect = pc["pis"] * pc["weights"] / (pc["pis"] * pc["weights"]).sum()
    assert 0.5 * np.abs(freq - expect).sum() < 0.05
    # inside the biggest clean cell: N(0, I) restricted to it
    clean = np.flatnonzero(pc["dense_frac"] == 0)
    k = clean[np.argmax(pc["pis"][clean])]
    ref = latent_rows(22, "ref", 0, 100000, 8)
    ref_in = ref[C._nearest(ref, pc["centroids"]) == k]
    got_in = z[cells == k]
    assert len(got_in) > 500 and len(ref_in) > 500
    for d in (0, 3):
        assert stats.ks_2samp(got_in[:, d], ref_in[:, d]).pvalue > 1e-3
    assert np.abs(got_in.mean(0) - ref_in.mean(0)).max() < 0.1
    assert np.all(cg.accept_prob(got_in) == 1.0)                  # clean cell: never rejected
