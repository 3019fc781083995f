"""Image folders as inputs: --reference DIR (feature cache), --reference RUN_DIR, --images-s/-t, and their errors."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeaudit.flows.audit import audit_flow
from modeaudit.storage.layout import comparable_result
from modeaudit.storage.cache import FeatureCache
from modeaudit.tasks import inputs
from modeaudit.tasks.config import AuditConfig
from modeaudit.tasks.errors import InputError
from modeaudit.tasks.models import image_folders as imf

SMALL = dict(m=200, M=1000, q=50, n_a=100, n_c=1000, tests="paper,two_sample", efficiency=False, diversity_rows=0,
             modes=3, report=False)
CNN = dict(descriptor="torch:tiny-cnn")


def tiny_images(n, stream, size=16):
    """n images (n, size, size, 3) uint8 from the torch:tiny generator (a real-looking set, deterministic)."""
    from modeaudit.tasks.models.generators import build_generator
    g = build_generator("torch:tiny", {"size": size})
    x = g.generate(g.latents(7, stream, 0, n))
    return np.clip(np.round((x.transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255).astype(np.uint8)


def write_folder(folder, arrays, fmt="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"img{i:04d}.{fmt}")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    ref = write_folder(root / "ref", tiny_images(110, "ref"))
    # JPEG (upper-case suffix) in a class sub-folder, a grayscale and an RGBA PNG: all read, converted to RGB.
    extra = tiny_images(6, "extra")
    write_folder(ref / "class_b", extra[:4], fmt="JPG")
    Image.fromarray(extra[4][..., 0], "L").save(ref / "gray.png")
    Image.fromarray(np.dstack([extra[5], np.full((16, 16), 128, np.uint8)]), "RGBA").save(ref / "rgba.png")
    (ref / "notes.txt").write_text("not an image")          # ignored, counted
    (ref / ".hidden.png").write_bytes(b"x")                  # hidden: skipped
    write_folder(root / "S", tiny_images(150, "S"))
    write_folder(root / "T", tiny_images(400, "T"))
    return root


def flow(tmp, name, **kw):
    return audit_flow(AuditConfig(out=str(tmp / name), **kw).to_dict())


def strip(result):
    """result.json without what depends on the run's history (timings, shard reuse, cache hit/miss)."""
    return comparable_result(result)


class SyncClient:
    """Runs Dask submissions in this process (for the refusal test's in-process descriptor)."""

    def submit(self, fn, *args, pure=False, **kw):
        return fn(*args)

    def gather(self, futures):
        return list(futures)


@pytest.fixture(scope="module")
def cached_runs(data, tmp_path_factory, prefect_harness, scheduler):
    """A generator audit against the reference folder, twice with one cache; the second must embed nothing."""
    tmp = tmp_path_factory.mktemp("runs")
    kw = dict(generator="torch:tiny", **CNN, reference=str(data / "ref"), cache_dir=str(tmp / "cache"),
              scheduler=scheduler, **SMALL)
    first = flow(tmp, "a", **kw)
    real = imf.embed_on_cluster

    def no_embedding(*a, **k):
        raise AssertionError("an image was embedded although the folder is in the cache")
    imf.embed_on_cluster = no_embedding
    try:
        second = flow(tmp, "b", **kw)
    finally:
        imf.embed_on_cluster = real
    return first, second, tmp


def test_second_audit_against_the_same_folder_embeds_nothing(cached_runs, data):
    first, second, tmp = cached_runs
    assert first["source"]["cache"] == {"reference": "miss"} and second["source"]["cache"] == {"reference": "hit"}
    info = first["source"]["inputs"]["reference"]
    # 110 PNGs + 4 JPEGs + gray + RGBA; notes.txt ignored, .hidden.png skipped
    assert (info["kind"], info["files"], info["rows"], info["ignored_files"], info["refused"]) == (
        "images", 116, 116, 1, 0)
    assert info["image_size"] == [16, 16] and len(info["key"]) == 64
    assert first["normalization"]["reference"]["rows"] == 116
    assert "two_sample" in first["tests"] and first["source"]["reference"] == str(data / "ref")
    assert strip(first) == strip(second)           # identical numbers from the cache
    entries = list((tmp / "cache" / "features").glob("v*/*/*"))
    assert [e.name for e in entries] == [info["key"]]
    # The cache is outside the run directories, and the runs keep their own copy of the rows.
    rows, _ = FeatureCache(tmp / "cache").get(info["key"])
    from modeaudit.storage.store import RunStore
    np.testing.assert_array_equal(RunStore.open(tmp / "b").read_array("inputs/reference"), rows)


def test_changed_file_misses_and_damaged_entry_is_rebuilt(data, tmp_path, scheduler, caplog):
    from distributed import Client
    ref = tmp_path / "ref"
    shutil.copytree(data / "ref", ref)
    cfg = AuditConfig(out=str(tmp_path / "o"), embeddings_s="x", embeddings_t="y", **CNN, reference=str(ref),
                      cache_dir=str(tmp_path / "cache"))
    desc = inputs.input_descriptor(cfg)
    plan = inputs.folder_plan(str(ref), "reference", desc)
    with Client(scheduler) as client:
        rows, _, status = inputs.embed_folder(client, plan, cfg)
        assert status == "miss"
        # No cache: the same rows, computed again (a cache hit gives exactly what embedding gives).
        fresh, _, off = inputs.embed_folder(client, plan, cfg.replace(cache=False))
        assert off == "off"
        np.testing.assert_array_equal(fresh, rows)
        # The same bytes under a new mtime: still a hit (the key is the content) ...
        os.utime(ref / "img0003.png", (1, 1))
        imf._MEMO.clear()
        assert inputs.folder_plan(str(ref), "reference", desc).key == plan.key
        # ... one changed byte of pixel data: another key, a miss.
        original = (ref / "img0003.png").read_bytes()
        a = np.asarray(Image.open(ref / "img0003.png")).copy()
        a[0, 0, 0] ^= 1
        Image.fromarray(a).save(ref / "img0003.png")
        changed = inputs.folder_plan(str(ref), "reference", desc)
        assert changed.key != plan.key
        assert inputs.embed_folder(client, changed, cfg)[2] == "miss"
        # The plan of a file that changed after it was hashed is refused by the worker that decodes it.
        with pytest.raises(InputError, match="img0003.png changed while the audit ran"):
            inputs.embed_folder(client, plan, cfg.replace(cache=False))
        (ref / "img0003.png").write_bytes(original)
        # A damaged entry is ignored (with a log line) and rebuilt.
        npy = FeatureCache(tmp_path / "cache").entry(plan.key) / "emb.npy"
        b = bytearray(npy.read_bytes())
        b[-1] ^= 0xFF
        npy.write_bytes(bytes(b))
        with caplog.at_level(logging.WARNING, logger="modeaudit.cache"):
            again, _, status = inputs.embed_folder(client, plan, cfg)
        assert status == "miss" and "damaged" in caplog.text
        np.testing.assert_array_equal(again, rows)
        assert inputs.embed_folder(client, plan, cfg)[2] == "hit"


def test_refused_images_are_skipped_counted_and_listed(data, tmp_path):
    from modeaudit.tasks.models.descriptors import DESCRIPTORS, Descriptor
    listing = imf.list_images(data / "T", "--reference")
    batch = imf.load_images(listing.root, [(f.rel, f.sha256) for f in listing.files], (16, 16), "x")
    means = batch.mean(axis=(1, 2, 3))
    dark = means < np.median(means)

    class DarkRefuser(Descriptor):
        """Refuses the darker half of the images (as a face descriptor refuses images without a face)."""
        accepts = ("image",)

        def embed(self, samples):
            return samples.reshape(len(samples), -1)[:, :8].astype(np.float32) + 2.0

        def embed_masked(self, samples):
            return self.embed(samples), samples.mean(axis=(1, 2, 3)) >= np.median(means)

    if "test:refuse-dark" not in DESCRIPTORS.names():
        DESCRIPTORS.register("test:refuse-dark")(lambda: DarkRefuser("test:refuse-dark", {}))
    cfg = AuditConfig(out=str(tmp_path / "o"), embeddings_s="x", embeddings_t="y", descriptor="test:refuse-dark",
                      reference=str(data / "T"), cache_dir=str(tmp_path / "cache"))
    plan = inputs.folder_plan(cfg.reference, "reference", inputs.input_descriptor(cfg))
    rows, info, status = inputs.embed_folder(SyncClient(), plan, cfg)
    assert status == "miss" and 0 < dark.sum() < len(dark)
    assert info["refused"] == int(dark.sum()) and len(rows) == info["rows"] == int((~dark).sum())
    assert info["refused_files"] == [f.rel for f, d in zip(listing.files, dark) if d][:20]
    np.testing.assert_array_equal(rows, batch[~dark].reshape(len(rows), -1)[:, :8] + 2.0)
    # The refusals are cached with the rows.
    rows2, info2, status = inputs.embed_folder(SyncClient(), plan, cfg)
    assert status == "hit" and info2 == info and np.array_equal(rows2, rows)


def test_reference_run_dir_reuses_its_T_and_refuses_another_descriptor(cached_runs, tmp_path, scheduler,
                                                                     prefect_harness):
    first, _, tmp = cached_runs
    r = flow(tmp_path, "c", generator="torch:tiny", **CNN, reference=str(tmp / "a"), scheduler=scheduler,
             **{**SMALL, "seed": 1})
    info = r["source"]["inputs"]["reference"]
    assert info["kind"] == "run" and info["run_dir"] == str(tmp / "a") and info["rows"] == 1000
    assert info["descriptor"]["spec"] == "torch:tiny-cnn" and len(info["fingerprint"]) == 64
    assert r["normalization"]["reference"]["rows"] == 1000 and "two_sample" in r["tests"]
    # Another descriptor (other options) made other embeddings: refused, naming both.
    cfg = AuditConfig(out=str(tmp_path / "d"), embeddings_s="x", embeddings_t="y", descriptor="torch:tiny-cnn",
                      descriptor_options={"dim": 16}, reference=str(tmp / "a"))
    with pytest.raises(InputError, match="not comparable") as e:
        inputs.reference_run(cfg, inputs.input_descriptor(cfg))
    assert "'dim': 16" in str(e.value) and "'dim': 32" in str(e.value)
    # A damaged T shard of the earlier run is found before it is used.
    copy = tmp_path / "a_copy"
    shutil.copytree(tmp / "a", copy)
    chunk = sorted((copy / "store.zarr" / "T" / "emb").rglob("c/*/*"))[0]
    b = bytearray(chunk.read_bytes())
    b[10] ^= 0xFF
    chunk.write_bytes(bytes(b))
    same = cfg.replace(descriptor_options={}, reference=str(copy))
    ref_run = inputs.reference_run(same, inputs.input_descriptor(same))
    from distributed import Client
    with Client(scheduler) as client, pytest.raises(InputError, match="no longer match their checksums"):
        inputs.verify_reference_run(client, ref_run)


def test_images_s_and_t(data, tmp_path, scheduler, prefect_harness):
    r = flow(tmp_path, "img", images_s=str(data / "S"), images_t=str(data / "T"), **CNN, scheduler=scheduler,
             cache_dir=str(tmp_path / "cache"), **{**SMALL, "m": None, "M": None, "n_c": None,
                                                   "tests": "paper"})
    assert r["sizes"]["S"] == 150 and r["sizes"]["T"] == 400
    src = r["source"]
    assert src["kind"] == "images" and src["images_s"] == str(data / "S") and src["descriptor"] == "torch:tiny-cnn"
    assert src["inputs"]["S"]["files"] == 150 and src["inputs"]["T"]["rows"] == 400
    assert src["cache"] == {"S": "miss", "T": "miss"}
    assert r["normalization"]["T"]["rows"] == 400


def test_cli_errors(data, tmp_path, capsys, monkeypatch):
    """Bad folders: exit 2, one line `modeaudit: error: ...`, no traceback, nothing written. The console script
    runs as a subprocess for one case (each start costs seconds of imports on a loaded machine), the others go
    through the same entry point in this process."""
    from modeaudit.flows.cli import main
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(data / "S", corrupt)
    png = (corrupt / "img0007.png").read_bytes()
    (corrupt / "img0007.png").write_bytes(png[:len(png) // 2])            # cut short
    mixed = tmp_path / "mixed"
    shutil.copytree(data / "T", mixed)
    Image.fromarray(tiny_images(1, "big", size=24)[0]).save(mixed / "img0150.png")
    monkeypatch.setenv("MODEAUDIT_CACHE", str(tmp_path / "cache"))
    img = ["--descriptor", "torch:tiny-cnn"]
    cases = {
        "corrupt": (["--generator", "torch:tiny", *img, "--reference", str(corrupt)],
                    "img0007.png is not a readable image"),
        "empty": (["--images-s", str(empty), "--images-t", str(data / "T"), *img],
                  "holds no PNG or JPEG images (searched recursively; 1 other file(s) ignored)"),
        "mixed": (["--images-s", str(data / "S"), "--images-t", str(mixed), *img],
                  "images of different sizes (img0000.png is 16x16, img0150.png is 24x24)"),
        "identity": (["--generator", "synthetic:planted", "--reference", str(data / "ref")],
                     "descriptor 'identity' takes embeddings, not images"),
    }
    for k, (args, match) in cases.items():
        argv = ["audit", *args, "--out", str(tmp_path / f"out_{k}")]
        if k == "corrupt":
            p = subprocess.run([str(Path(sys.executable).parent / "modeaudit"), *argv], capture_output=True,
                               text=True, timeout=300)
            code, err = p.returncode, p.stderr
        else:
            code, err = main(argv), capsys.readouterr().err
        assert code == 2, (k, err)
        assert err.startswith("modeaudit: error: ") and "Traceback" not in err and len(err.splitlines()) == 1, (k, err)
        assert match in err, (k, err)
        assert not (tmp_path / f"out_{k}").exists(), k        # refused before anything was written
    assert not (tmp_path / "cache").exists()


def test_decoding_conversion_and_declared_size(data, tmp_path):
    """Grayscale -> three equal channels, alpha dropped, [-1, 1]; a declared input size resizes; a JPEG cut short
    is an error naming the file when it is decoded."""
    listing = imf.list_images(data / "ref", "--reference")
    rels = [f.rel for f in listing.files]
    assert rels == sorted(rels) and rels[:4] == [f"class_b/img000{i}.JPG" for i in range(4)]
    assert "gray.png" in rels and "rgba.png" in rels and ".hidden.png" not in rels and listing.ignored == 1
    by = {f.rel: f for f in listing.files}
    x = imf.load_images(listing.root, [(r, by[r].sha256) for r in ("gray.png", "rgba.png")], (16, 16), "x")
    assert x.dtype == np.float32 and x.shape == (2, 3, 16, 16) and -1 <= x.min() and x.max() <= 1
    assert np.array_equal(x[0, 0], x[0, 1]) and np.array_equal(x[0, 0], x[0, 2])
    rgba = np.asarray(Image.open(data / "ref" / "rgba.png"))
    np.testing.assert_array_equal(x[1], rgba[..., :3].transpose(2, 0, 1) / np.float32(127.5) - 1)

    class Declares:
        input_size = 8
    assert imf.target_size(listing, Declares(), "d", "x") == (8, 8)
    y = imf.load_images(listing.root, [("gray.png", by["gray.png"].sha256)], (8, 8), "x")
    assert y.shape == (1, 3, 8, 8)
    jpg = tmp_path / "cut"
    jpg.mkdir()
    whole = (data / "ref" / "class_b" / "img0000.JPG").read_bytes()
    (jpg / "a.jpg").write_bytes(whole[:-20])
    cut = imf.list_images(jpg, "--images-s")          # a JPEG's header is fine: found when decoded
    with pytest.raises(InputError, match="a.jpg cannot be decoded"):
        imf.load_images(cut.root, [(f.rel, f.sha256) for f in cut.files], (16, 16), "--images-s")


def test_an_embeddings_run_is_refused_as_reference_run(tmp_path):
    from modeaudit.storage.store import RunStore
    np.save(tmp_path / "t.npy", np.ones((200, 4), np.float32))
    RunStore.create_or_open(tmp_path / "emb_run", {"embeddings": {"T": {"path": str(tmp_path / "t.npy")}},
                                                   "modeaudit_store": 1}, [])
    cfg = AuditConfig(out=str(tmp_path / "o"), generator="torch:tiny", **CNN, reference=str(tmp_path / "emb_run"))
    assert inputs.reference_kind(cfg.reference) == "run"
    with pytest.raises(InputError, match=f"stores no embeddings of its own to reuse; pass its T embeddings file "
                                         f"\\({tmp_path / 't.npy'}\\)"):
        inputs.reference_run(cfg, {"spec": "torch:tiny-cnn", "options": {}})
    with pytest.raises(InputError, match="this run's own --out"):
        inputs.reference_run(cfg.replace(out=cfg.reference), None)


def test_cache_entries_are_published_whole(tmp_path):
    """A second writer of the same entry keeps the first; a folder without meta.json is no entry and is replaced."""
    cache = FeatureCache(tmp_path)
    key = "ab" * 32
    junk = cache.entry(key)
    junk.mkdir(parents=True)
    (junk / "emb.npy").write_bytes(b"half an entry")
    assert cache.get(key) is None
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert cache.put(key, rows, {"files": []}) == junk and cache.put(key, rows + 1, {"files": []}) == junk
    got, meta = cache.get(key)
    np.testing.assert_array_equal(got, rows)
    assert meta["rows"] == 3 and meta["key"] == key
    assert sorted(p.name for p in junk.parent.iterdir()) == [key]        # no temporary folder left behind
