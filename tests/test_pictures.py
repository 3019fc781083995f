"""Pictures regenerated from stored latents: exact neighbours, exact images, the grids in the report."""
import base64
import json
import struct

import numpy as np
import pytest

from modeaudit.flows.audit import audit_flow
from modeaudit.flows.cli import main
from modeaudit.storage.layout import PICTURES, RunLayout
from modeaudit.storage.store import RunStore
from modeaudit.tasks.config import AuditConfig
from modeaudit.tasks.metrics.knn import pair_distances_reference
from modeaudit.tasks.report import pictures as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_RUN = dict(generator="torch:tiny", descriptor="torch:tiny-cnn", m=300, M=2000, q=40, n_a=80, n_c=2000,
                 tests="paper", efficiency=False, diversity_rows=0, shard_rows=1000,
                 # torch:tiny-cnn puts every tiny image within 0.25 of every other: a smaller d0 gives several modes
                 d0=0.06, radii=(0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3))


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, prefect_harness, scheduler):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("pics") / "run"
    audit_flow(AuditConfig(out=str(out), scheduler=scheduler, **IMAGE_RUN).to_dict())
    return out, json.loads((out / "result.json").read_text())


def test_grids_are_written_and_embedded(image_run):
    out, result = image_run
    page = (out / "report.html").read_text()
    lay = RunLayout(out)
    for name in PICTURES:
        png, svg = lay.plot(name, "png").read_bytes(), lay.plot(name, "svg").read_bytes()
        w, h = _png_size(png)
        assert 500 <= w <= 3000 and 150 <= h <= 3000, (name, w, h)
        assert b"<svg" in svg[:2000] and svg.rstrip().endswith(b"</svg>")
        # Embedded (the very bytes on disk) and linked (relative paths).
        assert base64.b64encode(png).decode() in page, name
        assert f'href="plots/{name}.png"' in page and f'href="plots/{name}.svg"' in page
    # The modes grid has a row per distinct mode shown (taller than one row of neighbours).
    assert _png_size(lay.plot("modes").read_bytes())[1] > _png_size(lay.plot("neighbours_worst").read_bytes())[1]
    # Every other figure is saved as PNG and SVG too.
    for name in ("neighbour_curves", "mccs_histogram"):
        assert lay.plot(name, "png").is_file() and lay.plot(name, "svg").is_file()
    assert P.EMBEDDINGS_ONLY not in page and "Pictures are unavailable" not in page


def test_report_reads_first(image_run):
    out, result = image_run
    page = (out / "report.html").read_text()
    info = result["run_info"]
    assert set(info) == {"finished_at", "host", "model_sha256"} and info["host"] and "T" in info["finished_at"]
    assert info["model_sha256"] == {"generator": None, "descriptor": None}    # built-in models: no file
    assert info["finished_at"] in page and info["host"] in page
    # The effect in plain words, from the worst case's curve and the reference median at d0 in T.
    i = result["radii"].index(result["d0"])
    frac = result["curves"]["obs"][0][i] / result["sizes"]["T"]
    assert "of the 2,000 samples of T lie within d0 = 0.06 of one sample" in page
    assert (f"<b>{100 * frac:.2g}%</b>" if frac < 0.1 else f"<b>{100 * frac:.1f}%</b>") in page
    typical = result["curves"]["ref_median"][i]
    assert ("times</b> as many as around a typical sample" if typical else "has none that close") in page
    # No raw JSON or key=value prose in the page.
    assert '{"' not in page and "': " not in page and " = {" not in page
    # Pictures come before the curves: they are what a person looks at first.
    assert page.index("neighbours_worst.png") < page.index("Neighbour function curves")


def test_neighbours_and_images_are_exact(image_run, tmp_path):
    out, result = image_run
    store = RunStore.open(out)
    pics = P.make_pictures(tmp_path, result, store)
    assert pics.ok and set(pics.png) == set(PICTURES)
    T = store.read("T", "emb")
    worst, rand = result["worst_case"]["s_index"], result["r_ref"][0]
    for name, anchor in (("neighbours_worst", worst), ("neighbours_random", rand)):
        got = pics.neighbours[name]
        assert got["anchor"] == anchor
        d = pair_distances_reference(store.read("S", "emb", anchor, anchor + 1), T, "angular")[0]
        ref = np.lexsort((np.arange(len(T)), d))[:P.N_NEIGHBOURS]          # float64, ties to the lower index
        assert got["t_index"] == ref.tolist() and got["distance"] == d[ref].tolist()
    modes = pics.neighbours["modes"]
    assert modes["anchors"] == [m["s_index"] for m in result["modes"][:P.MODES_SHOWN]]
    d = pair_distances_reference(store.read("S", "emb", modes["anchors"][-1], modes["anchors"][-1] + 1), T, "angular")[0]
    assert modes["t_index"][-1] == np.lexsort((np.arange(len(T)), d))[:P.MODE_MEMBERS].tolist()
    # The images shown are the generator's output on the stored latents, bit for bit, and those latents are
    # the generator's own stream (the store holds latents, never images).
    from modeaudit.tasks.models.generators import build_generator
    gen = build_generator(result["source"]["generator"], result["source"]["generator_options"])
    z = store.read("S", "latents", worst, worst + 1)
    np.testing.assert_array_equal(z, gen.latents(result["source"]["seed"], "S", worst, worst + 1))
    img = pics.samples["S"][worst]
    assert img.shape == (3, 16, 16) and np.array_equal(img, gen.generate(z)[0])
    j = pics.neighbours["neighbours_worst"]["t_index"][0]
    assert np.array_equal(pics.samples["T"][j], gen.generate(store.read("T", "latents", j, j + 1))[0])
    # The same bytes as the run's own plots (drawing is deterministic).
    assert pics.png["modes"] == RunLayout(out).plot("modes").read_bytes()


def test_nearest_rows_streamed_with_ties_equals_brute_force():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((5000, 12))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float16)
    X[3000:3040] = X[11]                  # 41 copies of one row: exact ties across blocks
    X[4999] = -X[11]
    A = np.concatenate([X[11:12], X[200:203]])
    idx, dist = P.nearest_rows(A, ((o, X[o:o + 700]) for o in range(0, len(X), 700)), 10)
    D = pair_distances_reference(A, X, "angular")
    for i in range(len(A)):
        ref = np.lexsort((np.arange(len(X)), D[i]))[:10]
        assert idx[i].tolist() == ref.tolist() and dist[i].tolist() == D[i, ref].tolist()
    # The anchor's copies all tie (float16 rows are not exactly unit: the distance is not 0, but one value).
    assert idx[0].tolist() == [11] + list(range(3000, 3009)) and len(set(dist[0].tolist())) == 1
    # Fewer rows than k: the tail is empty (index -1, distance inf).
    idx, dist = P.nearest_rows(A[:1], [(0, X[:3])], 5)
    assert idx[0, 3:].tolist() == [-1, -1] and np.isinf(dist[0, 3:]).all()


def test_embeddings_run_says_why_there_are_no_pictures(tmp_path, prefect_harness, scheduler):
    rng = np.random.default_rng(0)
    for name, n in (("s", 300), ("t", 2000)):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        np.save(tmp_path / f"{name}.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
    argv = ["audit", "--embeddings-s", str(tmp_path / "s.npy"), "--embeddings-t", str(tmp_path / "t.npy"),
            "--tests", "paper", "--no-efficiency", "--q", "50", "--scheduler", scheduler, "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    page = (tmp_path / "o" / "report.html").read_text()
    assert P.EMBEDDINGS_ONLY in page and "--embeddings-s" in page
    assert not any(RunLayout(tmp_path / "o").plot(n).exists() for n in PICTURES)
    assert "neighbours_worst" not in page and "modes.png" not in page
    info = json.loads((tmp_path / "o" / "result.json").read_text())["run_info"]
    assert info["model_sha256"] == {"generator": None, "descriptor": None}


def test_a_failure_in_drawing_keeps_the_result(tmp_path, prefect_harness, scheduler, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("no fonts today")
    monkeypatch.setattr(P, "make_pictures", boom)
    cfg = AuditConfig(out=str(tmp_path / "o"), scheduler=scheduler, generator="synthetic:planted", m=300, M=2000,
                      q=40, n_a=80, n_c=2000, tests="paper", efficiency=False, diversity_rows=0)
    result = audit_flow(cfg.to_dict())
    on_disk = json.loads((tmp_path / "o" / "result.json").read_text())
    assert on_disk["worst_case"] == result["worst_case"] and "verdict" in on_disk
    page = (tmp_path / "o" / "report.html").read_text()
    assert "Pictures are unavailable: drawing them failed (RuntimeError: no fonts today)" in page
    assert not RunLayout(tmp_path / "o").plot("modes").exists()


def test_calibration_report_has_grids_before_and_after_and_links(image_run, scheduler):
    out, result = image_run
    assert main(["calibrate", "--run", str(out), "--scheduler", scheduler, "--n-fit", "2000"]) == 0
    lay = RunLayout(out)
    page = lay.calibration_report("rejection").read_text()
    after = RunLayout(lay.calibration_audit("rejection"))
    for name in PICTURES:
        before_png, after_png = lay.plot(name).read_bytes(), after.plot(name).read_bytes()
        assert base64.b64encode(before_png).decode() in page and base64.b64encode(after_png).decode() in page
    for name in ("calibration_curves", "calibration_mccs"):
        assert (lay.calibration("rejection") / "plots" / f"{name}.svg").is_file()
    # Links both ways: calibration -> audits, audits -> calibration (relative).
    assert 'href="../../report.html"' in page and 'href="audit/report.html"' in page
    assert 'href="calibration/rejection/report.html"' in lay.report_html.read_text()
    assert 'href="../report.html"' in after.report_html.read_text()


def test_run_info_has_the_model_files_sha256(tmp_path):
    torch = pytest.importorskip("torch")
    import hashlib
    from modeaudit.tasks.audit_steps import run_info
    from modeaudit.tasks.models.generators import tiny_image_module
    path = tmp_path / "g.pt"
    torch.jit.trace(tiny_image_module(8, 16, 0), torch.zeros(2, 8)).save(str(path))
    info = run_info({"kind": "generator", "generator": f"torchscript:{path}",
                     "generator_options": {"latent_dim": 8, "batch_size": 16, "device": "cpu"},
                     "descriptor": "torch:tiny-cnn", "descriptor_options": {}})
    assert info["model_sha256"] == {"generator": hashlib.sha256(path.read_bytes()).hexdigest(), "descriptor": None}
