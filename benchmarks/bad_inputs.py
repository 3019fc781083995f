"""Run the bad-input table through the installed `modeaudit` console script, as a user would.

    python benchmarks/bad_inputs.py [--markdown] [--only REGEX]

Every case (tests/bad_inputs.py) must exit 2 with one `modeaudit: error:` line, no traceback,
no run directory left. Prints one row per case; `--markdown` prints RELIABILITY.md's table.
Exit code 1 if any case does not hold. The in-process twin is tests/test_bad_inputs.py.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from bad_inputs import CASES, expand, make_inputs  # noqa: E402

BIN = Path(sys.executable).parent / "modeaudit"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print the RELIABILITY.md table")
    ap.add_argument("--only", help="regex: run only the cases whose id matches")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modeaudit-bad-"))
    files = make_inputs(tmp)
    env = {**os.environ, "PYTHONPATH": files["module_dir"], "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    failed = 0
    rows = []
    for i, (cid, argv, fragment) in enumerate(CASES):
        if args.only and not re.search(args.only, cid):
            continue
        out = tmp / f"out{i}"
        p = subprocess.run([str(BIN), *expand(argv, files, str(out))], capture_output=True, text=True, env=env,
                           timeout=300)
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("modeaudit: error: ")]
        ok = (p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr and fragment in errors[0]
              and not out.exists())
        failed += not ok
        line = errors[0] if errors else (p.stderr.strip().splitlines() or [""])[-1]
        line = line.replace(str(tmp) + "/", "").replace("modeaudit: error: ", "")
        shown = " ".join(a if a != "{out}" else "DIR" for a in argv).replace("{", "").replace("}", "")
        rows.append((cid, shown, p.returncode, line, ok))
        if not args.markdown:
            print(f"{'ok ' if ok else 'BAD'} rc={p.returncode} [{cid}] {line[:160]}", flush=True)
    if args.markdown:
        print("| case | command | exit | the one line it prints |")
        print("|---|---|---|---|")
        for cid, shown, rc, line, ok in rows:
            line = line.replace("|", "\\|")
            print(f"| {cid} | `modeaudit {shown}` | {rc}{'' if ok else ' **BAD**'} | {line} |")
    print(f"{len(rows) - failed}/{len(rows)} cases hold", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
