"""Units: counter-based latents, generator/descriptor registries, config validation, paper band."""
import numpy as np
import pytest

from modeaudit.tasks.config import AuditConfig, finalize_sizes, parse_radii
from modeaudit.tasks.models.generators import build_generator
from modeaudit.tasks.stats.paper import paper_test, pointwise_band, population_mccs, reference_anchors, top_anchors
from modeaudit.tasks.registry import ConfigError
from modeaudit.tasks.models.rng import BLOCK_ROWS, latent_rows


def test_latent_rows_do_not_depend_on_the_split():
    whole = latent_rows(7, "T", 0, 3 * BLOCK_ROWS + 17, 5)
    cuts = [0, 1, 999, BLOCK_ROWS, BLOCK_ROWS + 1, 2 * BLOCK_ROWS + 5, 3 * BLOCK_ROWS + 17]
    parts = np.concatenate([latent_rows(7, "T", a, b, 5) for a, b in zip(cuts, cuts[1:])])
    np.testing.assert_array_equal(whole, parts)
    assert not np.array_equal(latent_rows(7, "S", 0, 10, 5), latent_rows(7, "T", 0, 10, 5))
    assert not np.array_equal(latent_rows(8, "T", 0, 10, 5), whole[:10])
    assert abs(whole.mean()) < 0.02 and abs(whole.std() - 1) < 0.02


def test_generator_options_are_validated():
    with pytest.raises(ConfigError, match="no option 'dimm'; allowed: .*dim"):
        build_generator("synthetic:planted", {"dimm": "3"})
    with pytest.raises(ConfigError, match="unknown generator 'synthetic:nope'"):
        build_generator("synthetic:nope")
    with pytest.raises(ConfigError, match="planted_prob=1.5 must be in"):
        build_generator("synthetic:planted", {"planted_prob": "1.5"})
    with pytest.raises(ConfigError, match="not a valid int"):
        build_generator("synthetic:planted", {"dim": "abc"})
    g = build_generator("synthetic:planted", {"dim": "16", "identities": "1e2"})
    assert g.generate(np.zeros((3, g.latent_dim), np.float32)).shape == (3, 16)


def test_planted_truth_matches_its_probability():
    g = build_generator("synthetic:planted", {"planted_prob": "0.1"})
    z = latent_rows(0, "S", 0, 20000, g.latent_dim)
    assert abs(g.truth(z).mean() - 0.1) < 0.01
    assert build_generator("synthetic:null").truth(z) is None


def _cfg(**kw):
    return AuditConfig(out="x", generator="synthetic:planted", **kw)


@pytest.mark.parametrize("kw, msg", [
    (dict(d0=1.2), "d0=1.2 is outside"), (dict(d0=0.0), "d0=0.0 is outside"),
    (dict(radii=(0.1, 1.0)), "radius 1.0 is outside"), (dict(radii=(0.3, 0.2)), "strictly increasing"),
    (dict(p=11), "--p 11 is larger than m"), (dict(q=11), "--q 11 is larger than m"),
    (dict(theta=2.0), "theta=2.0"), (dict(alpha=0), "alpha=0"),
])
def test_bad_settings(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        finalize_sizes(_cfg(**kw), 10, 100)


def test_default_q_is_capped_at_m():
    assert finalize_sizes(_cfg(), 10, 100).q == 10


def test_parse_radii():
    r = parse_radii("0.1:0.5:0.01")
    assert len(r) == 41 and r[0] == 0.1 and r[-1] == 0.5
    assert parse_radii("0.2,0.3") == (0.2, 0.3)
    with pytest.raises(ConfigError):
        parse_radii("0.1:x")


def test_paper_band_and_selection():
    ref = np.arange(100)[:, None] * np.ones((1, 3))
    low, high, med = pointwise_band(ref, 0.1)
    np.testing.assert_allclose(low, 4.95)
    np.testing.assert_allclose(high, 94.05)
    assert paper_test(np.array([50, 50, 95]), ref, 0.1)["radii_above"] == 1
    assert not paper_test(np.array([50, 50, 50]), ref, 0.1)["reject"]
    # p > 1: any R_obs curve leaving the band rejects; the counts describe the worst case (row 0).
    two = paper_test(np.array([[50, 50, 50], [50, 2, 50]]), ref, 0.1)
    assert two["reject"] and two["reject_each"] == [False, True] and two["radii_below"] == 0
    assert top_anchors(np.array([3, 9, 9, 1]), 2).tolist() == [1, 2]
    r = reference_anchors(0, 50, 10)
    assert len(set(r.tolist())) == 10 and r.max() < 50
    assert population_mccs(np.array([0.2, 0.4])) == pytest.approx((0.3, np.sqrt(0.02)))
