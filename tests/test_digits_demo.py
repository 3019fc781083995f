"""The real-image demo's committed models (tasks/toy/digits_models) and the script that makes them."""
import json

import numpy as np
import pytest
import torch

from modeaudit.tasks.toy import digits
from modeaudit.tasks.toy.digits import MODELS_DIR, DigitsConfig
from modeaudit.tasks.toy.trainers import torch_threads

META = json.loads((MODELS_DIR / "meta.json").read_text())
LATENT = META["generator"]["latent_dim"]


def _onnx_run(path, x):
    import onnxruntime as ort   # a test dependency: the ONNX files must be checked, never skipped
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _latents(n, seed=3):
    return np.random.default_rng(seed).standard_normal((n, LATENT)).astype(np.float32)


@pytest.fixture(scope="module")
def G():
    return torch.jit.load(str(MODELS_DIR / "G.pt"))


@pytest.fixture(scope="module")
def D():
    return torch.jit.load(str(MODELS_DIR / "D.pt"))


def test_files_match_meta_and_are_small():
    names = {"G.pt", "G.onnx", "D.pt", "D.onnx", "G_control.pt"}
    assert set(META["sha256"]) == names
    for name, want in META["sha256"].items():
        path = MODELS_DIR / name
        assert path.stat().st_size < 2 << 20, name
        assert digits.sha256(path) == want, f"{name} differs from meta.json: retrained without updating meta?"
    assert META["torch"].startswith("2.") and META["torch_threads"] == 1 and META["deterministic_algorithms"]
    assert META["config"]["seed"] == 0 and META["config"]["gan_epochs"] >= 1


def test_generator_shapes_and_range(G):
    with torch.no_grad():
        x = G(torch.from_numpy(_latents(7))).numpy()
    assert x.dtype == np.float32 and x.shape == (7, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])   # gray as RGB


def test_descriptor_shapes(D):
    x, _ = digits.digits_images()
    with torch.no_grad():
        e = D(torch.from_numpy(x[:5])).numpy()
    assert e.dtype == np.float32 and e.shape == (5, META["descriptor"]["dim"])
    assert np.all(np.isfinite(e)) and np.all(np.linalg.norm(e, axis=1) > 0)


@pytest.mark.parametrize("name", ["G", "D"])
def test_onnx_agrees_with_torchscript(name, G, D):
    tol = META["onnx_tolerance"]
    assert META["onnx_max_abs_diff"][name] <= tol
    x = _latents(64, seed=11) if name == "G" else digits.digits_images()[0][::29]
    with torch.no_grad():
        a = (G if name == "G" else D)(torch.from_numpy(x)).numpy()
    b = _onnx_run(MODELS_DIR / f"{name}.onnx", x)
    assert b.shape == a.shape
    assert np.abs(a - b).max() <= tol


def test_descriptor_separates_digits(D):
    """Nearest-centroid accuracy on the held-out digits (measured 0.989 with the committed D)."""
    x, y = digits.digits_images(quantize=True)
    tr, te = digits.split(len(x), META["config"]["seed"])
    assert len(te) == META["descriptor"]["n_heldout"]
    with torch.no_grad():
        e = D(torch.from_numpy(x)).numpy()
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    centroids = np.stack([e[tr][y[tr] == k].mean(0) for k in range(10)])
    acc = ((e[te] @ centroids.T).argmax(1) == y[te]).mean()
    assert acc >= 0.95
    assert META["descriptor"]["heldout_accuracy"] >= 0.95


def test_planted_collapse_is_there_and_control_has_none(G):
    """Ground truth behind the demo's verdict: about 5% near-copies of the exemplar, the real digits ~0."""
    cfg = DigitsConfig(**{**META["config"], "n_truth": 4000})
    truth = digits.planted_share(G, cfg)
    assert truth["near_exemplar_real"] < 0.002            # one real image: the exemplar itself
    assert 0.035 < truth["near_exemplar"] < 0.08          # meta.json: 0.053 on 20,000 samples
    assert truth["near_exemplar_in_region"] > 0.6
    control = torch.jit.load(str(MODELS_DIR / "G_control.pt"))
    assert digits.planted_share(control, cfg)["near_exemplar"] < 0.005


def test_reference_embeddings_and_pngs(tmp_path, D):
    e = digits.reference_embeddings(MODELS_DIR / "D.pt")
    assert e.dtype == np.float32 and e.shape == (1797, META["descriptor"]["dim"])
    assert digits.main(["--write-reference-embeddings", str(tmp_path / "r.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "r.npy"), e)
    assert digits.write_reference(tmp_path / "png") == 1797
    from PIL import Image
    files = sorted((tmp_path / "png").glob("*.png"))
    assert len(files) == 1797 and files[0].name == "digit0_0000.png"
    img = np.asarray(Image.open(files[0]))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    # The PNGs hold exactly the quantised images that the .npy reference embeds.
    xq, _ = digits.digits_images(quantize=True)
    assert np.array_equal(digits.to_uint8(xq[0]).transpose(1, 2, 0), img)


def test_tiny_training_is_deterministic():
    cfg = DigitsConfig(gan_epochs=1, hidden=16, desc_epochs=1, desc_batch=256, n_truth=100)

    def run():
        with torch_threads(1):
            g = digits.train_gan(cfg, planted=True, log=None)
            d, info = digits.train_descriptor(cfg, log=None)
        return g.state_dict(), d.state_dict(), info

    rng_before = torch.random.get_rng_state()
    g1, d1, i1 = run()
    g2, d2, i2 = run()
    assert torch.equal(rng_before, torch.random.get_rng_state())    # the caller's RNG is left alone
    for a, b in ((g1, g2), (d1, d2)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert i1 == i2
    assert not torch.equal(g1["net.0.weight"], digits.train_gan(
        DigitsConfig(gan_epochs=1, hidden=16, seed=1), log=None).state_dict()["net.0.weight"])
