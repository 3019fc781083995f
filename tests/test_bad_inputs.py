"""Every case of the bad-input table (tests/bad_inputs.py, RELIABILITY.md): one line
`modeaudit: error: ...`, exit code 2, no traceback, no run directory left, no input changed."""
import contextlib
import hashlib
import io
import sys
from pathlib import Path

import pytest

from bad_inputs import CASES, expand, make_inputs
from modeaudit.flows.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    files = make_inputs(tmp)
    sys.path.insert(0, files["module_dir"])    # the python:badgen:* generators
    try:
        yield tmp, files
    finally:
        sys.path.remove(files["module_dir"])


FOUND_ON_THE_CLUSTER = ("S with an Inf", "S with an all-zero row", "T with a NaN", "reference with a NaN",
                        "T: a Zarr array with a damaged chunk")


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.relative_to(root).parts[0].startswith("out")
            and "__pycache__" not in p.parts}


@pytest.mark.parametrize("cid,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(cid, argv, fragment, inputs, prefect_harness, request):
    tmp, files = inputs
    out = tmp / f"out-{hashlib.sha1(cid.encode()).hexdigest()[:10]}"
    argv = expand(argv, files, str(out))
    if cid in FOUND_ON_THE_CLUSTER:
        # Found only once rows are read on the cluster: one case starts its own local cluster as a
        # user's run does, the others use the session's (a cluster start costs more than the case).
        argv += ["--scheduler", request.getfixturevalue("scheduler")]
    before = _tree(tmp)
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            rc = main(argv)
        except SystemExit as e:        # argparse's errors
            rc = e.code
    text = err.getvalue()
    errors = [line for line in text.splitlines() if line.startswith("modeaudit: error: ")]
    assert rc == 2, text
    assert "Traceback" not in text
    # Cases refused before any run starts print exactly that line; those found by the cluster
    # (NaN rows) may follow Prefect's progress lines, but end in the same single error line.
    assert len(errors) == 1 and text.strip().splitlines()[-1] == errors[0], text
    assert fragment in errors[0]
    assert not out.exists(), "a refused run left its directory behind"
    assert _tree(tmp) == before, "a refused run changed an input"


def test_the_table_in_reliability_md_lists_every_case():
    doc = (Path(__file__).parents[1] / "RELIABILITY.md").read_text()
    missing = [cid for cid, _, _ in CASES if f"| {cid} |" not in doc]
    assert not missing, f"regenerate the table with `python benchmarks/bad_inputs.py --markdown`: {missing}"
