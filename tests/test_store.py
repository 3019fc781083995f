"""Tests for modeaudit.storage.store: round trip, atomic completion, resume, verify, concurrency."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import random
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from modeaudit.storage.store import ArraySpec, RunStore, SetLayout, StoreError, fingerprint_hash

FP = {"generator": "toy", "seed": 7, "d_grid": [0.1, 0.5, 0.01]}


def _layouts(rows_s=23, shard_s=5, rows_t=12, shard_t=4, emb_dtype="float16"):
    return [
        SetLayout(
            "S",
            rows_s,
            shard_s,
            (
                ArraySpec("latents", "float32", 3),
                ArraySpec("emb", emb_dtype, 8),
                ArraySpec("planted", "bool", None),
            ),
        ),
        SetLayout("T", rows_t, shard_t, (ArraySpec("emb", "float16", 8),)),
    ]


def _expected(kind: str, start: int, stop: int) -> np.ndarray:
    """Deterministic per-row data, so any process can rebuild what a shard must hold."""
    rows = np.arange(start, stop)
    if kind == "latents":
        return ((rows[:, None] * 3 + np.arange(3)) * 0.5).astype(np.float64)
    if kind == "emb":
        return np.sin(rows[:, None] * 8.0 + np.arange(8)).astype(np.float32)
    if kind == "planted":
        return rows % 3 == 0
    raise KeyError(kind)


def _shard_data(layout: SetLayout, start: int, stop: int) -> dict[str, np.ndarray]:
    return {a.kind: _expected(a.kind, start, stop) for a in layout.arrays}


def _write_all(store: RunStore, set_name: str) -> list[str]:
    lay = store.layout(set_name)
    return [store.write_shard(set_name, i, _shard_data(lay, a, b)) for i, a, b in lay.shards()]


def _concurrent_worker(args):
    # Module-level so the spawn start method can import it in the child.
    root, set_name, index = args
    store = RunStore.open(root)
    _, start, stop = store.layout(set_name).shard(index)
    return index, store.write_shard(set_name, index, _shard_data(store.layout(set_name), start, stop))


@pytest.fixture
def store(tmp_path):
    return RunStore.create_or_open(tmp_path / "run", FP, _layouts())


# --------------------------------------------------------------------------- #


def test_layout_shards_include_short_last_shard():
    lay = _layouts()[0]
    assert lay.shards() == [(0, 0, 5), (1, 5, 10), (2, 10, 15), (3, 15, 20), (4, 20, 23)]
    assert SetLayout("E", 0, 5, ()).shards() == []
    assert ArraySpec("x", "f4", 2).dtype == "float32"  # spellings normalised
    with pytest.raises(StoreError, match="shard_rows"):
        SetLayout("S", 10, 0, ())
    with pytest.raises(StoreError, match="duplicate"):
        SetLayout("S", 10, 5, (ArraySpec("a", "f4", 1), ArraySpec("a", "f4", 2)))
    with pytest.raises(StoreError, match="name"):
        SetLayout("a/b", 10, 5, ())


def test_round_trip_and_checksums(store):
    lay = store.layout("S")
    order = lay.shards()
    random.Random(0).shuffle(order)  # shard write order must not matter
    returned = {i: store.write_shard("S", i, _shard_data(lay, a, b)) for i, a, b in order}

    assert store.missing_shards("S") == []
    for spec in lay.arrays:
        got = store.read("S", spec.kind)
        want = _expected(spec.kind, 0, lay.rows).astype(spec.dtype)
        assert got.dtype == np.dtype(spec.dtype)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        store.read("S", "latents", 4, 11), _expected("latents", 4, 11).astype("float32")
    )

    sums = store.shard_checksums("S")
    assert sums == [returned[i] for i, _, _ in lay.shards()]
    # Per-kind checksum is sha256 of the C-order bytes in the stored dtype.
    entry = json.loads((store.root / "manifest" / "S" / "4.json").read_text())
    assert (entry["start"], entry["stop"]) == (20, 23)
    want_emb = np.ascontiguousarray(_expected("emb", 20, 23).astype("float16"))
    assert entry["checksums"]["emb"] == hashlib.sha256(want_emb.tobytes()).hexdigest()
    assert entry["combined"] == sums[4]
    # T is independent of S.
    assert store.missing_shards("T") == store.layout("T").shards()
    with pytest.raises(StoreError, match="incomplete"):
        store.shard_checksums("T")


@pytest.mark.parametrize(
    "start,stop,block_rows",
    [(0, None, 5), (3, 21, 5), (0, None, 7), (2, 23, 7), (6, 6, 5), (0, None, 100)],
)
def test_source_blocks_cover_every_row_once_in_order(store, start, stop, block_rows):
    # The one block iterator (Source.blocks): global offsets, edges on multiples of block_rows.
    from modeaudit.tasks.join.sources import Source
    _write_all(store, "S")
    src = Source("store", str(store.root), 23, 8, "S", dtype="float16", stored_unit=True)
    stop_ = 23 if stop is None else stop
    offsets, parts = [], []
    for off, block in src.blocks(start, stop, block_rows):
        assert block.shape[1:] == (8,)
        assert 0 < len(block) <= block_rows
        offsets.append(off)
        parts.append(block)
    pos = start
    for off, block in zip(offsets, parts):
        assert off == pos  # contiguous, in order, no overlap
        pos += len(block)
    assert pos == stop_
    if parts:
        np.testing.assert_array_equal(
            np.concatenate(parts), _expected("emb", start, stop_).astype("float16")
        )
    # Blocks never straddle a multiple of block_rows (with block_rows = shard rows: a chunk).
    assert all(off // block_rows == (off + len(b) - 1) // block_rows for off, b in zip(offsets, parts))


def test_write_shard_rejects_bad_data(store):
    lay = store.layout("S")
    good = _shard_data(lay, 0, 5)
    with pytest.raises(StoreError, match="missing \\['planted'\\]"):
        store.write_shard("S", 0, {k: v for k, v in good.items() if k != "planted"})
    with pytest.raises(StoreError, match="unexpected \\['extra'\\]"):
        store.write_shard("S", 0, {**good, "extra": np.zeros(5)})
    with pytest.raises(StoreError, match="expected shape \\(5, 8\\)"):
        store.write_shard("S", 0, {**good, "emb": np.zeros((5, 7))})
    with pytest.raises(StoreError, match="expected shape \\(3, 3\\)"):
        store.write_shard("S", 4, {**_shard_data(lay, 20, 23), "latents": np.zeros((5, 3))})
    with pytest.raises(StoreError, match="cannot store float64 as bool"):
        store.write_shard("S", 0, {**good, "planted": np.zeros(5)})
    with pytest.raises(StoreError, match="shards 0..4"):
        store.write_shard("S", 5, good)
    with pytest.raises(StoreError, match="no sample set 'X'"):
        store.write_shard("X", 0, good)
    assert store.missing_shards("S") == lay.shards()  # nothing was recorded


def test_crash_before_manifest_then_resume_writes_only_missing(tmp_path, monkeypatch):
    root = tmp_path / "run"
    store = RunStore.create_or_open(root, FP, _layouts())
    lay = store.layout("S")
    real_record = RunStore._record_completion

    def crash_on_shard_2(self, path, entry):
        if entry["index"] == 2:
            raise KeyboardInterrupt("simulated crash after data, before manifest")
        return real_record(self, path, entry)

    monkeypatch.setattr(RunStore, "_record_completion", crash_on_shard_2)
    for i, a, b in lay.shards():
        try:
            store.write_shard("S", i, _shard_data(lay, a, b))
        except KeyboardInterrupt:
            pass
    monkeypatch.setattr(RunStore, "_record_completion", real_record)

    # The data of shard 2 did land, but it must not count as complete.
    np.testing.assert_array_equal(store.read("S", "planted", 10, 15), _expected("planted", 10, 15))
    assert not store.is_complete("S", 2)
    assert store.missing_shards("S") == [(2, 10, 15)]
    assert not list((root / "manifest" / "S").glob("*.tmp"))
    with pytest.raises(StoreError, match=r"incomplete shard\(s\) \(2\)"):
        store.shard_checksums("S")

    # Resume in a fresh "process": only shard 2 is rewritten.
    writes = []
    real_write_rows = RunStore._write_rows

    def counting(self, set_name, kind, start, stop, values):
        writes.append((set_name, kind, start))
        return real_write_rows(self, set_name, kind, start, stop, values)

    monkeypatch.setattr(RunStore, "_write_rows", counting)
    resumed = RunStore.create_or_open(root, FP, _layouts())
    for i, a, b in resumed.missing_shards("S"):
        resumed.write_shard("S", i, _shard_data(lay, a, b))
    assert sorted(writes) == sorted(("S", k, 10) for k in ("latents", "emb", "planted"))
    assert resumed.missing_shards("S") == []
    assert all(resumed.is_complete("S", i, verify=True) for i, _, _ in lay.shards())


def test_interrupted_rewrite_of_complete_shard_is_not_complete(store, monkeypatch):
    lay = store.layout("S")
    _write_all(store, "S")
    assert store.is_complete("S", 1)

    def boom(self, *args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(RunStore, "_write_rows", boom)
    with pytest.raises(RuntimeError):
        store.write_shard("S", 1, _shard_data(lay, 5, 10))
    # The old record was dropped before any new data was written.
    assert not store.is_complete("S", 1)
    assert store.missing_shards("S") == [(1, 5, 10)]


def test_verify_detects_corrupted_chunk(store):
    _write_all(store, "S")
    assert all(store.is_complete("S", i, verify=True) for i in range(5))
    store.array("S", "emb")[6:7] = np.full((1, 8), 0.25, dtype="float16")
    assert store.is_complete("S", 1)  # manifest alone cannot see it
    assert not store.is_complete("S", 1, verify=True)
    assert store.missing_shards("S", verify=True) == [(1, 5, 10)]
    assert all(store.is_complete("S", i, verify=True) for i in (0, 2, 3, 4))
    # A 1-d kind is checked too.
    store.array("S", "planted")[20:23] = ~_expected("planted", 20, 23)
    assert not store.is_complete("S", 4, verify=True)


def test_create_or_open_same_run_resumes_keeping_complete_shards(tmp_path):
    root = tmp_path / "run"
    store = RunStore.create_or_open(root, FP, _layouts())
    lay = store.layout("S")
    for i, a, b in lay.shards()[:3]:
        store.write_shard("S", i, _shard_data(lay, a, b))
    # Same fingerprint in a different spelling: tuple vs list, np.int64 vs int, "f2" vs "float16".
    fp2 = {"d_grid": (0.1, 0.5, 0.01), "seed": np.int64(7), "generator": "toy"}
    again = RunStore.create_or_open(str(root), fp2, _layouts(emb_dtype="f2"))
    assert again.missing_shards("S") == lay.shards()[3:]
    np.testing.assert_array_equal(again.read("S", "latents", 0, 15), _expected("latents", 0, 15))
    assert json.loads((root / "manifest" / "run.json").read_text())["fingerprint"]["seed"] == 7


@pytest.mark.parametrize(
    "fp,layouts,key",
    [
        ({**FP, "seed": 8}, _layouts(), "fingerprint.seed"),
        ({**FP, "extra": 1}, _layouts(), "fingerprint.extra"),
        ({k: v for k, v in FP.items() if k != "d_grid"}, _layouts(), "fingerprint.d_grid"),
        (FP, _layouts(shard_s=6), "layouts.S.shard_rows"),
        (FP, _layouts(rows_t=13), "layouts.T.rows"),
        (FP, _layouts(emb_dtype="float32"), "layouts.S.arrays.emb.dtype"),
        (FP, _layouts()[:1], "layouts.T"),
    ],
)
def test_create_or_open_different_run_names_key(tmp_path, fp, layouts, key):
    root = tmp_path / "run"
    RunStore.create_or_open(root, FP, _layouts())
    with pytest.raises(StoreError) as err:
        RunStore.create_or_open(root, fp, layouts)
    msg = str(err.value)
    assert key in msg
    assert "new --out" in msg and "--overwrite" in msg


def test_overwrite_starts_fresh(store):
    _write_all(store, "S")
    fresh = RunStore.create_or_open(store.root, {**FP, "seed": 8}, _layouts(), overwrite=True)
    assert fresh.missing_shards("S") == fresh.layout("S").shards()
    assert not fresh.read("S", "latents").any()


def test_unwritable_root_raises(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for root in (afile / "run", afile):
        with pytest.raises(StoreError, match="cannot write to .*choose a writable --out"):
            RunStore.create_or_open(root, FP, _layouts())


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="no modeaudit run"):
        RunStore.open(tmp_path)
    import zarr

    zarr.open_group(str(tmp_path / "foreign" / "store.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a .*modeaudit run.*--overwrite"):
        RunStore.create_or_open(tmp_path / "foreign", FP, _layouts())
    with pytest.raises(StoreError, match="URL"):
        RunStore.create_or_open("s3://bucket/run", FP, _layouts())


def test_concurrent_writers_in_processes(store):
    lay = store.layout("S")
    jobs = [(str(store.root), "S", i) for i, _, _ in lay.shards()]
    # spawn, like Dask's worker processes: nothing inherited but the path.
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        results = dict(pool.map(_concurrent_worker, jobs))
    reopened = RunStore.open(store.root)
    assert reopened.missing_shards("S") == []
    assert reopened.shard_checksums("S") == [results[i] for i, _, _ in lay.shards()]
    for spec in lay.arrays:
        np.testing.assert_array_equal(
            reopened.read("S", spec.kind), _expected(spec.kind, 0, lay.rows).astype(spec.dtype)
        )
    assert all(reopened.is_complete("S", i, verify=True) for i, _, _ in lay.shards())
    # Same data written serially gives the same checksums (determinism).
    serial = RunStore.create_or_open(store.root.parent / "serial", FP, _layouts())
    assert _write_all(serial, "S") == reopened.shard_checksums("S")


def test_pickle_reopens_by_path(store):
    import pickle

    _write_all(store, "S")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.root == store.root
    assert clone.shard_checksums("S") == store.shard_checksums("S")


def test_json_files(store):
    path = store.write_json("results/summary.json", {"n": np.int64(3), "x": [np.float32(0.5)]})
    assert path == store.root / "results" / "summary.json"
    assert store.read_json("results/summary.json") == {"n": 3, "x": [0.5]}
    store.write_json("results/summary.json", {"n": 4})
    assert store.read_json("results/summary.json") == {"n": 4}
    assert not list((store.root / "results").glob("*.tmp"))
    assert store.read_json("results/none.json", default=None) is None
    with pytest.raises(StoreError, match="does not exist"):
        store.read_json("results/none.json")
    for bad in ("../escape.json", "/abs.json", "store.zarr/x.json"):
        with pytest.raises(StoreError):
            store.write_json(bad, {})


def test_extra_arrays(store):
    store.write_array("results/self_counts", np.arange(10, dtype=np.int64), chunks=(4,))
    np.testing.assert_array_equal(store.read_array("results/self_counts"), np.arange(10))
    store.write_array("results/self_counts", np.array([1.5, 2.5]))  # overwrite, new shape/dtype
    got = store.read_array("results/self_counts")
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [1.5, 2.5])
    store.write_array("results/scalar", np.int64(4))
    assert store.read_array("results/scalar").shape == ()
    with pytest.raises(StoreError, match="inside sample set 'S'"):
        store.write_array("S/emb", np.zeros(3))
    with pytest.raises(StoreError, match="no array"):
        store.read_array("results/missing")


def test_fingerprint_hash_is_canonical():
    a = fingerprint_hash({"a": 1, "b": [1, 2]})
    assert a == fingerprint_hash({"b": (1, 2), "a": np.int64(1)})
    assert a != fingerprint_hash({"a": 1, "b": [2, 1]})
    assert a == hashlib.sha256(b'{"a":1,"b":[1,2]}').hexdigest()
    with pytest.raises(StoreError):
        fingerprint_hash({"a": object()})
