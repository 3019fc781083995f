"""The table of bad inputs: every case must end in one line `modeaudit: error: ...`, exit code 2,
nothing written into the run directory and nothing of the user's changed.

Used by tests/test_bad_inputs.py (in-process, every case) and benchmarks/bad_inputs.py (through
the installed console script, and prints RELIABILITY.md's generated table). A case is
(id, argv, a fragment the error line must contain). `{name}` in argv is a file made by
`make_inputs`; `{out}` is a fresh run directory that must not exist afterwards.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

GOOD = ["--embeddings-s", "{s}", "--embeddings-t", "{t}"]
GEN = ["--generator", "synthetic:planted", "--preset", "demo"]


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_inputs(tmp: Path) -> dict[str, str]:
    """Write every input file the cases name into tmp; return name -> path."""
    tmp = Path(tmp)
    f: dict[str, Path] = {}

    def npy(name, arr, **kw):
        f[name] = tmp / f"{name}.npy"
        np.save(f[name], arr, **kw)

    npy("s", _unit(400, 8, 1))
    npy("t", _unit(3000, 8, 2))
    npy("r", _unit(3000, 8, 3))
    npy("t_w9", _unit(3000, 9, 4))
    npy("t_one", _unit(1, 8, 5))
    npy("t_50", _unit(50, 8, 5))
    npy("empty", np.zeros((0, 8), np.float32))
    npy("one_d", _unit(400, 8, 1)[:, 0].copy())
    npy("three_d", _unit(400, 8, 1).reshape(400, 2, 4))
    npy("ints", np.ones((400, 8), np.int64))
    npy("complex", _unit(400, 8, 1).astype(np.complex64))
    npy("strings", np.array([["a"] * 8] * 400))
    npy("objects", np.array([[{"x": 1}] * 8] * 400, dtype=object), allow_pickle=True)
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        a = _unit(400, 8, 1)
        a[17, 3] = value
        npy(name, a)
    z = _unit(400, 8, 1)
    z[5] = 0
    npy("zero_row", z)
    npy("width0", np.zeros((400, 0), np.float32))
    npy("s_w1", np.random.default_rng(6).standard_normal((400, 1)).astype(np.float32))
    npy("t_w1", np.random.default_rng(7).standard_normal((3000, 1)).astype(np.float32))
    npy("float16", _unit(400, 8, 1).astype(np.float16))
    f["truncated"] = tmp / "truncated.npy"
    f["truncated"].write_bytes(f["s"].read_bytes()[:-1000])
    f["text"] = tmp / "text.npy"
    f["text"].write_text("these are not embeddings\n")
    f["npz"] = tmp / "arrays.npz"
    np.savez(f["npz"], s=_unit(400, 8, 1))
    f["csv"] = tmp / "rows.csv"
    np.savetxt(f["csv"], _unit(400, 8, 1), delimiter=",")
    # A Zarr array with one chunk overwritten after it was written (it no longer decodes).
    import zarr
    f["t_damaged_zarr"] = tmp / "t_damaged.zarr"
    z = zarr.create_array(str(f["t_damaged_zarr"]), shape=(3000, 8), chunks=(1000, 8), dtype="float32")
    z[:] = _unit(3000, 8, 2)
    (f["t_damaged_zarr"] / "c" / "1" / "0").write_bytes(b"garbage\n")
    f["dir"] = tmp / "a_folder"
    f["dir"].mkdir()
    f["missing"] = tmp / "no_such_file.npy"
    f["pickle_pt"] = tmp / "model.pt"
    f["pickle_pt"].write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    f["text_pt"] = tmp / "not_a_model.pt"
    f["text_pt"].write_text("not a TorchScript archive")
    # Folders that look like runs (or do not) for `calibrate` and `--out`.
    user = tmp / "users_folder"
    (user / "plots").mkdir(parents=True)
    (user / "report.html").write_text("<p>my own report</p>")
    f["users_folder"] = user
    unfinished = tmp / "unfinished_run"
    (unfinished / "manifest").mkdir(parents=True)
    (unfinished / "manifest" / "run.json").write_text(json.dumps({"fingerprint": "x"}))
    f["unfinished_run"] = unfinished
    corrupt = tmp / "corrupt_run"
    (corrupt / "manifest").mkdir(parents=True)
    (corrupt / "manifest" / "run.json").write_text(json.dumps({"fingerprint": "x"}))
    (corrupt / "result.json").write_text('{"source": {"kind": "generator"}, "worst_')
    f["corrupt_run"] = corrupt
    emb_run = tmp / "embeddings_run"
    (emb_run / "manifest").mkdir(parents=True)
    (emb_run / "manifest" / "run.json").write_text(json.dumps({"fingerprint": "x"}))
    (emb_run / "result.json").write_text(json.dumps({"source": {"kind": "embeddings"}, **{
        k: {} for k in ("worst_case", "modes", "sizes", "settings", "radii", "d0", "curves")}}))
    f["embeddings_run"] = emb_run
    f["a_file"] = tmp / "a_file.txt"
    f["a_file"].write_text("a user's file")
    bad_fid = tmp / "fid_bad.npz"
    np.savez(bad_fid, mu=np.zeros(3))
    f["fid_bad"] = bad_fid
    f["module_dir"] = tmp / "pymods"
    f["module_dir"].mkdir()
    (f["module_dir"] / "badgen.py").write_text(
        "import numpy as np\n"
        "def scalar(z):\n    return 1.0\n"
        "def wrong_rows(z):\n    return np.ones((len(z) + 1, 4), np.float32)\n"
        "def nans(z):\n    return np.full((len(z), 4), np.nan, np.float32)\n"
        "def raises(z):\n    raise RuntimeError('boom inside the model')\n"
        "NOT_CALLABLE = 3\n")
    return {k: str(v) for k, v in f.items()}


def _a(*argv):
    return ["audit", *argv, "--out", "{out}"]


# (id, argv, fragment of the one-line error). Grouped as RELIABILITY.md groups them.
CASES: list[tuple[str, list[str], str]] = [
    # --- what to audit
    ("no source", _a(), "give either --generator"),
    ("generator and embeddings", _a(*GEN, *GOOD), "give either --generator"),
    ("only --embeddings-s", _a("--embeddings-s", "{s}"), "go together"),
    ("only --embeddings-t", _a("--embeddings-t", "{t}"), "go together"),
    ("unknown generator", _a("--generator", "bogus"), "unknown generator"),
    ("unknown generator option", _a(*GEN, "-G", "bogus=1"), "bogus"),
    ("-G without =", _a(*GEN, "-G", "dim"), "KEY=VALUE"),
    ("-G dim=abc", _a(*GEN, "-G", "dim=abc"), "dim"),
    ("-G dim=0", _a(*GEN, "-G", "dim=0"), "dim"),
    ("-G dim=-3", _a(*GEN, "-G", "dim=-3"), "dim"),
    ("-G identities=1e9", _a(*GEN, "-G", "identities=1e9"), "GiB"),
    ("-G planted_prob=1.5", _a(*GEN, "-G", "planted_prob=1.5"), "planted_prob"),
    ("-G planted_prob=-0.1", _a(*GEN, "-G", "planted_prob=-0.1"), "planted_prob"),
    ("-G latent_dim=1", _a(*GEN, "-G", "latent_dim=1"), "latent_dim"),
    ("-G dim=1e999", _a(*GEN, "-G", "dim=1e999"), "not a valid int"),
    ("-G dim=1", _a(*GEN, "-G", "dim=1"), "at least 2 columns"),
    ("-G world_seed=-1", _a(*GEN, "-G", "world_seed=-1"), "[0, 2**63)"),
    # Refused for the block size or the shard size, by the machine's memory: both messages name the latent_dim.
    ("-G latent_dim=1e6", _a(*GEN, "-G", "latent_dim=1e6"), "latent_dim=1,000,000"),
    ("-G latent_dim=2e5 at the default shard size", _a(*GEN, "-G", "latent_dim=2e5"), "latent_dim=200,000"),
    ("-G spread=nan", _a(*GEN, "-G", "spread=nan"), "spread"),
    ("unknown descriptor", _a(*GEN, "--descriptor", "bogus"), "unknown descriptor"),
    ("unknown descriptor option", _a(*GEN, "-D", "bogus=1"), "bogus"),
    ("image generator, embedding descriptor", _a("--generator", "torch:tiny", "--descriptor", "identity",
                                                 "--preset", "demo"), "images"),
    ("image generator, no descriptor", _a("--generator", "torch:tiny", "--preset", "demo"), "descriptor"),
    ("-G device=bogus", _a("--generator", "torch:tiny", "--descriptor", "torch:tiny-cnn", "-G", "device=bogus",
                           "--preset", "demo"), "device"),
    ("-G device=cuda without CUDA", _a("--generator", "torch:tiny", "--descriptor", "torch:tiny-cnn", "-G",
                                       "device=cuda", "--preset", "demo"), "cuda"),
    ("-D device=cuda without CUDA", _a("--generator", "torch:tiny", "--descriptor", "torch:tiny-cnn", "-D",
                                       "device=cuda", "--preset", "demo"), "cuda"),
    ("torchscript: missing file", _a("--generator", "torchscript:{missing}", "--descriptor", "torch:tiny-cnn",
                                     "--preset", "demo"), "no such file"),
    ("torchscript: a pickle", _a("--generator", "torchscript:{pickle_pt}", "--descriptor", "torch:tiny-cnn",
                                 "--preset", "demo"), "TorchScript"),
    ("torchscript: a text file", _a("--generator", "torchscript:{text_pt}", "--descriptor", "torch:tiny-cnn",
                                    "--preset", "demo"), "TorchScript"),
    ("torchscript: a folder", _a("--generator", "torchscript:{dir}", "--descriptor", "torch:tiny-cnn",
                                 "--preset", "demo"), "no such file"),
    ("torchscript descriptor: missing file", _a("--generator", "torch:tiny", "--descriptor",
                                                "torchscript:{missing}", "--preset", "demo"), "no such file"),
    ("python: no such module", _a("--generator", "python:no_such_module_xyz:f", "-G", "latent_dim=4",
                                  "--preset", "demo"), "no_such_module_xyz"),
    ("python: no such function", _a("--generator", "python:numpy:no_such_fn", "-G", "latent_dim=4",
                                    "--preset", "demo"), "no_such_fn"),
    ("python: not callable", _a("--generator", "python:badgen:NOT_CALLABLE", "-G", "latent_dim=4",
                                "--preset", "demo"), "callable"),
    ("python: no latent_dim", _a("--generator", "python:numpy:tanh", "--preset", "demo"), "latent_dim"),
    ("python: spec without callable", _a("--generator", "python:numpy", "-G", "latent_dim=4",
                                         "--preset", "demo"), "MODULE:CALLABLE"),
    ("python: scalar output", _a("--generator", "python:badgen:scalar", "-G", "latent_dim=4",
                                 "--preset", "demo"), "scalar"),
    ("python: wrong row count", _a("--generator", "python:badgen:wrong_rows", "-G", "latent_dim=4",
                                   "--preset", "demo"), "rows"),
    ("python: NaN samples", _a("--generator", "python:badgen:nans", "-G", "latent_dim=4",
                               "--preset", "demo"), "NaN"),
    ("python: the model raises", _a("--generator", "python:badgen:raises", "-G", "latent_dim=4",
                                    "--preset", "demo"), "boom inside the model"),
    ("unknown reference generator", _a(*GEN, "--reference-generator", "bogus"), "unknown generator"),
    ("-R with a bad option", _a(*GEN, "--reference-generator", "synthetic:null", "-R", "bogus=1"), "bogus"),
    ("reference generator of another width", _a(*GEN, "--reference-generator", "synthetic:null", "-R", "dim=64"),
     "width"),
    ("reference and reference generator", _a(*GEN, "--reference", "{r}", "--reference-generator", "synthetic:null"),
     "not both"),
    # --- embedding files
    ("missing S file", _a("--embeddings-s", "{missing}", "--embeddings-t", "{t}"), "no_such_file"),
    ("S is a folder without an array", _a("--embeddings-s", "{dir}", "--embeddings-t", "{t}"), "a_folder"),
    ("S is a text file", _a("--embeddings-s", "{text}", "--embeddings-t", "{t}"), "text.npy"),
    ("S is truncated", _a("--embeddings-s", "{truncated}", "--embeddings-t", "{t}"), "truncated.npy"),
    ("S is an .npz", _a("--embeddings-s", "{npz}", "--embeddings-t", "{t}"), "arrays.npz"),
    ("S is a CSV", _a("--embeddings-s", "{csv}", "--embeddings-t", "{t}"), "rows.csv"),
    ("S of 0 rows", _a("--embeddings-s", "{empty}", "--embeddings-t", "{t}"), "empty"),
    ("S 1-d", _a("--embeddings-s", "{one_d}", "--embeddings-t", "{t}"), "2-d"),
    ("S 3-d", _a("--embeddings-s", "{three_d}", "--embeddings-t", "{t}"), "2-d"),
    ("S of width 0", _a("--embeddings-s", "{width0}", "--embeddings-t", "{t}"), "width"),
    ("S of integers", _a("--embeddings-s", "{ints}", "--embeddings-t", "{t}"), "float"),
    ("S complex", _a("--embeddings-s", "{complex}", "--embeddings-t", "{t}"), "float"),
    ("S of strings", _a("--embeddings-s", "{strings}", "--embeddings-t", "{t}"), "float"),
    ("S of pickled objects", _a("--embeddings-s", "{objects}", "--embeddings-t", "{t}"), "objects.npy"),
    ("S with a NaN", _a("--embeddings-s", "{nan}", "--embeddings-t", "{t}"), "NaN or Inf"),
    ("S with an Inf", _a("--embeddings-s", "{inf}", "--embeddings-t", "{t}"), "NaN or Inf"),
    ("S with an all-zero row", _a("--embeddings-s", "{zero_row}", "--embeddings-t", "{t}"), "all-zero row"),
    ("T with a NaN", _a("--embeddings-s", "{s}", "--embeddings-t", "{nan}"), "NaN or Inf"),
    ("S and T of different widths", _a("--embeddings-s", "{s}", "--embeddings-t", "{t_w9}"), "width"),
    ("T: a Zarr array with a damaged chunk", _a("--embeddings-s", "{s}", "--embeddings-t", "{t_damaged_zarr}"),
     "cannot be read"),
    ("S and T of width 1", _a("--embeddings-s", "{s_w1}", "--embeddings-t", "{t_w1}"), "at least 2 columns"),
    ("S and T the same file", _a("--embeddings-s", "{t}", "--embeddings-t", "{t}"), "same file"),
    ("T of one row", _a("--embeddings-s", "{s}", "--embeddings-t", "{t_one}"), "rows"),
    ("T of 50 rows", _a("--embeddings-s", "{s}", "--embeddings-t", "{t_50}"), "rows"),
    ("--m above the rows of S", _a(*GOOD, "--m", "401"), "401"),
    ("--M above the rows of T", _a(*GOOD, "--M", "3001"), "3001"),
    ("missing reference", _a(*GOOD, "--reference", "{missing}"), "no_such_file"),
    ("reference of another width", _a(*GOOD, "--reference", "{t_w9}"), "width"),
    ("reference with a NaN", _a(*GOOD, "--reference", "{nan}"), "NaN or Inf"),
    ("two_sample without a reference", _a(*GOOD, "--tests", "two_sample"), "reference"),
    ("deficit without a reference", _a(*GOOD, "--tests", "paper,deficit"), "deficit"),
    # --- sizes and statistics
    ("--m 0", _a(*GEN, "--m", "0"), "|S|=0"),
    ("--m -5", _a(*GEN, "--m", "-5"), "negative"),
    ("--m abc", _a(*GEN, "--m", "abc"), "not a number"),
    ("--m 2.5", _a(*GEN, "--m", "2.5"), "not a whole number"),
    ("--m 1e99", _a(*GEN, "--m", "1e99"), "at most"),
    ("--M 0", _a(*GEN, "--M", "0"), "|T|=0"),
    ("--M smaller than --mccs-set", _a(*GEN, "--M", "5000", "--mccs-set", "6000"), "mccs"),
    ("--p 0", _a(*GEN, "--p", "0"), "--p"),
    ("--p above --m", _a(*GEN, "--m", "1000", "--p", "1001"), "--p"),
    ("--q 0", _a(*GEN, "--q", "0"), "--q"),
    ("--q above --m", _a(*GEN, "--m", "1000", "--q", "1001"), "--q"),
    ("--anchors 0", _a(*GEN, "--anchors", "0"), "anchors"),
    ("--mccs-set 0", _a(*GEN, "--mccs-set", "0"), "mccs"),
    ("--preset bogus", _a(*GEN[:2], "--preset", "bogus"), "invalid choice"),
    ("--d0 -1", _a(*GEN, "--d0", "-1"), "d0"),
    ("--d0 0", _a(*GEN, "--d0", "0"), "d0"),
    ("--d0 1.5", _a(*GEN, "--d0", "1.5"), "d0"),
    ("--d0 nan", _a(*GEN, "--d0", "nan"), "d0"),
    ("--d0 abc", _a(*GEN, "--d0", "abc"), "--d0"),
    ("--radii garbage", _a(*GEN, "--radii", "garbage"), "START:STOP:STEP"),
    ("--radii decreasing", _a(*GEN, "--radii", "0.5:0.1:0.01"), "radii"),
    ("--radii step 0", _a(*GEN, "--radii", "0.1:0.5:0"), "radii"),
    ("--radii to inf", _a(*GEN, "--radii", "0.1:inf:0.1"), "START:STOP:STEP"),
    ("--radii to 1e309", _a(*GEN, "--radii", "0.1:1e309:0.1"), "START:STOP:STEP"),
    ("--radii step 1e-12", _a(*GEN, "--radii", "0.1:0.5:1e-12"), "at most 10000"),
    ("--radii above 1", _a(*GEN, "--radii", "0.1:1.5:0.1"), "radii"),
    ("--alpha 0", _a(*GEN, "--alpha", "0"), "alpha"),
    ("--alpha 1", _a(*GEN, "--alpha", "1"), "alpha"),
    ("--alpha nan", _a(*GEN, "--alpha", "nan"), "alpha"),
    ("--theta 0", _a(*GEN, "--theta", "0"), "theta"),
    ("--theta -1", _a(*GEN, "--theta", "-1"), "theta"),
    ("--theta inf", _a(*GEN, "--theta", "inf"), "theta"),
    ("--seed -1", _a(*GEN, "--seed", "-1"), "seed"),
    ("--seed 2**64", _a(*GEN, "--seed", str(2 ** 64)), "seed"),
    ("--seed abc", _a(*GEN, "--seed", "abc"), "--seed"),
    ("--tests bogus", _a(*GEN, "--tests", "bogus"), "bogus"),
    ("--tests empty", _a(*GEN, "--tests", ""), "tests"),
    ("--tests with a stray comma", _a(*GEN, "--tests", "paper,,erl"), "tests"),
    ("--modes 0", _a(*GEN, "--modes", "0"), "modes"),
    ("--tie-weight 2", _a(*GEN, "--tie-weight", "2"), "tie"),
    ("--tie-weight -1", _a(*GEN, "--tie-weight", "-1"), "tie"),
    ("--null-replicates 0", _a(*GEN, "--null-replicates", "0"), "replicates"),
    ("--null-replicates too few for alpha", _a(*GEN, "--null-replicates", "5"), "replicates"),
    ("--selection-m 0", _a(*GEN, "--selection-m", "0"), "selection"),
    ("--selection-t 0", _a(*GEN, "--selection-t", "0"), "selection"),
    ("--n-ref 0", _a(*GEN, "--reference-generator", "synthetic:null", "--n-ref", "0"), "--n-ref"),
    ("--diversity-rows -1", _a(*GEN, "--diversity-rows", "-1"), "diversity"),
    ("--fail-on bogus", _a(*GEN, "--fail-on", "bogus"), "invalid choice"),
    # --- execution
    ("--workers 0", _a(*GEN, "--workers", "0"), "workers"),
    ("--threads-per-worker 0", _a(*GEN, "--threads-per-worker", "0"), "threads"),
    ("--shard-rows 0", _a(*GEN, "--shard-rows", "0"), "shard"),
    ("--store-dtype int8", _a(*GEN, "--store-dtype", "int8"), "invalid choice"),
    ("--kernel bogus", _a(*GEN, "--kernel", "bogus"), "invalid choice"),
    ("--kernel torch-cuda without a GPU", _a(*GEN, "--kernel", "torch-cuda"), "CUDA"),
    ("--scheduler malformed", _a(*GEN, "--scheduler", "not a url::"), "scheduler"),
    ("--scheduler at a closed port", _a(*GEN, "--scheduler", "tcp://127.0.0.1:9"), "127.0.0.1:9"),
    ("unknown option", _a(*GEN, "--bogus"), "unrecognized"),
    # --- the run directory
    ("--out empty", ["audit", *GEN, "--out", ""], "--out"),
    ("--out a URL", ["audit", *GEN, "--out", "s3://bucket/run"], "s3://"),
    ("--out a file", ["audit", *GEN, "--out", "{a_file}"], "a_file.txt"),
    ("--out a user's folder", ["audit", *GEN, "--out", "{users_folder}"], "not a modeaudit run"),
    ("--overwrite a user's folder", ["audit", *GEN, "--out", "{users_folder}", "--overwrite"], "not a modeaudit run"),
    # --- calibrate
    ("calibrate: no --run", ["calibrate"], "--run"),
    ("calibrate: missing run", ["calibrate", "--run", "{missing}"], "no finished audit"),
    ("calibrate: a user's folder", ["calibrate", "--run", "{users_folder}"], "no finished audit"),
    ("calibrate: an unfinished run", ["calibrate", "--run", "{unfinished_run}"], "no finished audit"),
    ("calibrate: corrupt result.json", ["calibrate", "--run", "{corrupt_run}"], "not a complete modeaudit result"),
    ("calibrate: an embeddings run", ["calibrate", "--run", "{embeddings_run}"], "not a generator"),
    ("calibrate: --method bogus", ["calibrate", "--run", "{corrupt_run}", "--method", "bogus"], "invalid choice"),
    ("calibrate: --variant bogus", ["calibrate", "--run", "{corrupt_run}", "--variant", "bogus"], "invalid choice"),
    ("calibrate: --modes 0", ["calibrate", "--run", "{corrupt_run}", "--modes", "0"], "modes"),
    ("calibrate: --clusters 0", ["calibrate", "--run", "{corrupt_run}", "--clusters", "0"], "clusters"),
    ("calibrate: --n-fit 0", ["calibrate", "--run", "{corrupt_run}", "--n-fit", "0"], "--n-fit"),
    ("calibrate: --image-range bogus", ["calibrate", "--run", "{corrupt_run}", "--image-range", "bogus"], "range"),
    ("calibrate: --fid-rows 0", ["calibrate", "--run", "{corrupt_run}", "--fid-rows", "0"], "--fid-rows"),
    # --- metrics and toy
    ("metrics: missing --fake", ["metrics", "--real", "{t}", "--out", "{out}"], "--fake"),
    ("metrics: missing real file", ["metrics", "--real", "{missing}", "--fake", "{t}", "--out", "{out}"],
     "no_such_file"),
    ("metrics: widths differ", ["metrics", "--real", "{t}", "--fake", "{t_w9}", "--out", "{out}"], "width"),
    ("metrics: a damaged Zarr chunk", ["metrics", "--real", "{t}", "--fake", "{t_damaged_zarr}", "--out", "{out}"],
     "cannot be read"),
    ("metrics: NaN rows", ["metrics", "--real", "{t}", "--fake", "{nan}", "--out", "{out}"], "NaN"),
    ("metrics: --k 0", ["metrics", "--real", "{t}", "--fake", "{s}", "--out", "{out}", "--k", "0"], "k"),
    ("metrics: --distance bogus", ["metrics", "--real", "{t}", "--fake", "{s}", "--out", "{out}",
                                   "--distance", "bogus"], "invalid choice"),
    ("metrics: a folder with no images (nor an array), no --descriptor", ["metrics", "--real", "{dir}", "--fake",
                                                                          "{t}", "--out", "{out}"],
     "no PNG or JPEG images"),
    ("metrics: an empty image folder", ["metrics", "--real", "{dir}", "--fake", "{t}", "--out", "{out}",
                                        "--descriptor", "torch:tiny-cnn"], "a_folder"),
    ("metrics: -D without --descriptor", ["metrics", "--real", "{t}", "--fake", "{s}", "--out", "{out}",
                                          "-D", "resize=32"], "--descriptor"),
    ("metrics: --kid-subsets 1e24", ["metrics", "--real", "{t}", "--fake", "{s}", "--out", "{out}",
                                     "--kid-subsets", "1" + "0" * 24], "at most 10000"),
    ("metrics: --workers 1e24", ["metrics", "--real", "{t}", "--fake", "{s}", "--out", "{out}",
                                 "--workers", "1" + "0" * 24], "local worker processes"),
    ("audit: --workers 1e24", _a("--embeddings-s", "{s}", "--embeddings-t", "{t}", "--workers", "1" + "0" * 24),
     "local worker processes"),
    ("toy train: unknown world", ["toy", "train", "--world", "bogus", "--method", "gan", "--steps", "10",
                                  "--out", "{out}"], "bogus"),
    ("toy train: unknown method", ["toy", "train", "--world", "ring8", "--method", "bogus", "--steps", "10",
                                   "--out", "{out}"], "bogus"),
    ("toy train: --steps 0", ["toy", "train", "--world", "ring8", "--method", "gan", "--steps", "0",
                              "--out", "{out}"], "steps"),
    ("toy score: unknown generator", ["toy", "score", "--world", "ring8", "--generator", "bogus",
                                      "--out", "{out}"], "unknown generator"),
    ("compare: missing run A", ["compare", "{missing}", "{corrupt_run}", "--out", "{out}"], "no_such_file"),
    ("compare: a corrupt result.json as run A", ["compare", "{corrupt_run}", "{users_folder}", "--out", "{out}"],
     "not a complete modeaudit result"),
    ("compare: --alpha 2", ["compare", "{corrupt_run}", "{unfinished_run}", "--out", "{out}", "--alpha", "2"], "alpha"),
    ("watch: missing checkpoint folder", ["watch", "{missing}", "--out", "{out}", "--once"], "no_such_file"),
    ("watch: checkpoint folder is a file", ["watch", "{a_file}", "--out", "{out}", "--once"], "a_file.txt"),
    ("watch: --out a file", ["watch", "{dir}", "--out", "{a_file}", "--once"], "a_file.txt"),
    ("watch: --out an audit run", ["watch", "{dir}", "--out", "{unfinished_run}", "--once"], "unfinished_run"),
    ("unknown command", ["bogus"], "invalid choice"),
]


def expand(argv: list[str], files: dict[str, str], out: str) -> list[str]:
    """argv with `{name}` replaced by the file made by make_inputs and `{out}` by out."""
    return [a.format(out=out, **files) for a in argv]
