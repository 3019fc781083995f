"""Toy worlds: ground-truth scores, trainers' determinism, the RFF descriptor, and the toy CLI's errors."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from modeaudit.flows.cli import main  # noqa: E402
from modeaudit.tasks.models.descriptors import DESCRIPTORS  # noqa: E402
from modeaudit.tasks.models.generators import GENERATORS  # noqa: E402
from modeaudit.tasks.toy.rff import distance_to_radius, kernel  # noqa: E402
from modeaudit.tasks.toy.score import score_points  # noqa: E402
from modeaudit.tasks.toy.trainers import METHODS, TrainConfig, torch_threads, train  # noqa: E402
from modeaudit.tasks.toy.worlds import WORLDS, get_world  # noqa: E402


def cli(argv, capsys):
    """(exit code, stdout, stderr) of the CLI run in-process (argparse errors exit by SystemExit)."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_score_true_mixture_via_cli(tmp_path, capsys):
    rc, out, err = cli(["toy", "score", "--world", "ring8", "--generator", "toy:ring8", "--n", "20000",
                        "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["modes_covered"] == 8
    # A 2-D Gaussian puts 1 - exp(-9/2) = 98.9 % of its mass within 3 sd.
    assert abs(m["quality"] - (1 - np.exp(-4.5))) < 0.005
    assert abs(m["reverse_kl"]) < 0.03
    assert np.allclose(m["mode_shares"], 0.125 * m["quality"], atol=0.01)
    x = np.load(tmp_path / "samples.npy")
    assert x.shape == (20000, 2)


@pytest.mark.parametrize("name", list(WORLDS))
def test_every_world_scores_its_own_samples(name):
    w = get_world(name)
    for x in (w.sample(20000, seed=3), GENERATORS.build(f"toy:{name}", {}).generate(
            np.random.default_rng(0).standard_normal((20000, 3)))):
        s = score_points(w, x)
        assert s["modes_covered"] == w.n_modes
        assert s["quality"] > 0.98
        assert abs(s["reverse_kl"]) < 0.03
        assert np.allclose(np.array(s["mode_shares"]) / s["quality"], w.weights, atol=0.015)
    assert np.array_equal(w.sample(100, seed=3), w.sample(100, seed=3))
    assert not np.array_equal(w.sample(100, seed=3), w.sample(100, seed=4))


def test_ring_uses_cos_and_sin_and_grid_spacing():
    r = get_world("ring8").means
    assert np.allclose(np.linalg.norm(r, axis=1), 2) and np.allclose(r[2], [0, 2], atol=1e-12)
    g = get_world("grid25")
    assert g.means.shape == (25, 2) and g.sds[0] == 0.0025 and set(g.means[:, 0]) == {-4, -2, 0, 2, 4}
    imb = get_world("ring8-imbalanced").weights
    assert np.isclose(imb[0] / imb[1], 10)


class _OneMode(torch.nn.Module):
    def forward(self, z):
        return torch.tensor([2.0, 0.0]) + 0.0005 * z[:, :2]


def test_one_mode_generator_covers_one_mode(tmp_path, capsys):
    ckpt = tmp_path / "one.pt"
    torch.jit.save(torch.jit.script(_OneMode()), str(ckpt))
    rc, out, err = cli(["toy", "score", "--world", "ring8", "--generator", f"torchscript:{ckpt}", "-G",
                        "latent_dim=2", "--n", "5000", "--out", str(tmp_path / "s")], capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["modes_covered"] == 1 and m["mode_counts"][0] == m["n"]
    # All mass on one of 8 modes: sum p log(p / (1/8)) = log 8.
    assert abs(m["reverse_kl"] - np.log(8)) < 1e-9


def _outputs(path):
    m = torch.jit.load(str(path))
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(123))
    with torch.inference_mode():
        return m(z)


@pytest.mark.parametrize("method", METHODS)
def test_trainer_smoke_is_deterministic(tmp_path, method):
    cfg = dict(world="ring8", method=method, steps=3, every=2, hidden=16, n_data=500)
    with torch_threads(1):
        s1 = train(TrainConfig(seed=5, **cfg), tmp_path / "a")
        s2 = train(TrainConfig(seed=5, **cfg), tmp_path / "b")
        train(TrainConfig(seed=6, **cfg), tmp_path / "c")
    assert s1["checkpoints"] == ["ckpt_000002.pt", "ckpt_000003.pt"] == s2["checkpoints"]
    assert not list((tmp_path / "a").glob(".*tmp*"))
    a, b, c = (_outputs(tmp_path / d / "ckpt_000003.pt") for d in "abc")
    assert a.shape == (64, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The loop really trains: the generator moved between checkpoints.
    assert not torch.equal(_outputs(tmp_path / "a" / "ckpt_000002.pt"), a)


def test_torch_threads_restores():
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch_threads(1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_rff_cosine_approximates_gaussian_kernel():
    d = DESCRIPTORS.build("rff", {"dim": "1024", "bandwidth": "0.7"})
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (3000, 2))
    y = x + rng.standard_normal((3000, 2)) * rng.uniform(0, 1.5, (3000, 1))
    fx, fy = d.embed(x), d.embed(y)
    assert np.allclose(np.linalg.norm(fx, axis=1), 1, atol=1e-5)
    err = (fx * fy).sum(1) - kernel(x, y, 0.7)
    # sd of the error is at most 1/sqrt(2 * 512) = 0.031
    assert np.sqrt((err ** 2).mean()) < 0.035 and np.abs(err).max() < 0.15
    # The documented relation between the audit's angular distance and the Euclidean radius.
    dd = np.array([0.1, 0.25, 0.4])
    r = distance_to_radius(dd, 0.7)
    assert np.allclose(np.arccos(kernel(np.zeros((3, 2)), np.c_[r, np.zeros(3)], 0.7)) / np.pi, dd)


def test_audit_path_embeds_checkpoint_and_reference(tmp_path):
    """The audit's own shard path: a TorchScript checkpoint and toy:ring8 through the rff descriptor."""
    from modeaudit.tasks.models.shards import embed_rows
    ckpt = tmp_path / "one.pt"
    torch.jit.save(torch.jit.script(_OneMode()), str(ckpt))
    desc = {"spec": "rff", "options": DESCRIPTORS.resolve_options("rff", {})}
    for spec, opts in ((f"torchscript:{ckpt}", {"latent_dim": "2"}), ("toy:ring8", {})):
        gen = {"spec": spec, "options": GENERATORS.resolve_options(spec, opts)}
        z, emb, truth, _ = embed_rows(gen, desc, 0, "S", 0, 300)
        assert emb.shape == (300, 256) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert GENERATORS.build("toy:grid25", {}).default_descriptor == "rff"


@pytest.mark.parametrize("argv, match", [
    (["toy", "train", "--world", "ring9", "--method", "gan", "--steps", "5"], "unknown toy world 'ring9'"),
    (["toy", "train", "--world", "ring8", "--method", "wgan", "--steps", "5"], "unknown method 'wgan'"),
    (["toy", "train", "--world", "ring8", "--method", "gan", "--steps", "0"], "steps=0"),
    (["toy", "train", "--world", "ring8", "--method", "gan", "--steps", "1.5"], "not a whole number"),
    (["toy", "train", "--world", "ring8", "--steps", "5"], "required: --method"),
    (["toy", "score", "--world", "ring8", "--generator", "torchscript:/no/such.pt"], "no such file"),
    (["toy", "score", "--world", "ring8", "--generator", "torch:tiny", "--n", "8"], "not 2-D points"),
    (["toy", "score", "--world", "ring8", "--generator", "toy:ring8", "--n", "0"], "--n 0"),
    (["toy", "score", "--world", "ring8", "--generator", "toy:nope"], "unknown world"),
    (["toy"], "needs a subcommand"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, argv, match):
    rc, out, err = cli(argv + (["--out", str(tmp_path / "o")] if len(argv) > 1 else []), capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modeaudit: error: ") and match in lines[0], err
    assert "Traceback" not in err


def test_cli_train_writes_checkpoints_and_scores_them(tmp_path, capsys):
    rc, out, err = cli(["toy", "train", "--world", "grid25", "--method", "lol1", "--steps", "4", "--every", "2",
                        "--seed", "1", "--out", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt_*.pt")) == ["ckpt_000002.pt", "ckpt_000004.pt"]
    summary = json.loads(out[out.index("{"):])
    assert summary["final"].endswith("ckpt_000004.pt") and "--reference-generator toy:grid25" in summary["audit_with"]
    rc, out, err = cli(["toy", "score", "--world", "grid25", "--generator", f"torchscript:{summary['final']}",
                        "-G", "latent_dim=2", "--n", "1000", "--out", str(tmp_path / "score")], capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "score" / "metrics.json").read_text())
    # Four steps from random weights: nowhere near the grid's 0.0075-wide modes.
    assert m["quality"] < 0.05 and len(m["mode_shares"]) == 25
