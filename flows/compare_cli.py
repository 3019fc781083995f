"""`modeaudit compare RUN_A RUN_B --out DIR`: is run B more collapsed than run A?

Kept out of flows/cli.py (which hooks it in with two calls): no Prefect, no Dask. Both
runs are read from their directories (result.json for the modes, worst case, d0 and
theta; the store, or the embedding files an embeddings audit recorded, for the rows),
every input is checked before --out is created, and the statistics of
tasks/stats/compare.py run in this process. DIR/compare.json and DIR/compare.html are
written atomically. Exit codes as `audit`: 0, 2 (bad input, one line), 3 (--fail-on).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from pathlib import Path

from modeaudit.flows.args import HelpFormatter

COMPARE_JSON = "compare.json"
COMPARE_HTML = "compare.html"


def add_compare_parser(sub) -> argparse.ArgumentParser:
    """Add the `compare` subcommand to the CLI's subparsers."""
    from modeaudit.flows.args import count
    c = sub.add_parser("compare", help="is run B more collapsed than run A? (two finished audits, e.g. two "
                       "checkpoints)", formatter_class=HelpFormatter)
    c.add_argument("run_a", metavar="RUN_A", help="a finished audit's directory (the baseline)")
    c.add_argument("run_b", metavar="RUN_B", help="a finished audit's directory (the candidate)")
    c.add_argument("--out", required=True, metavar="DIR", help="directory for compare.json and compare.html")
    c.add_argument("--alpha", type=float, default=0.05, help="family-wise level of the ball tests (and 1 - the "
                   "MCCS interval's confidence)")
    c.add_argument("--modes", type=count, default=10, help="top distinct dense modes taken from each run "
                   "(at most as many as its result.json lists)")
    c.add_argument("--replicates", type=count, default=1000, help="bootstrap replicates of the MCCS difference")
    c.add_argument("--fd-rows", type=count, default=20000, help="rows of each T (seeded random subset) for the "
                   "Frechet distance")
    c.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the FD subset")
    c.add_argument("--kernel", default="fast", choices=["fast", "reference"], help="range-join kernel (both exact)")
    c.add_argument("--fail-on", choices=["collapse", "warning", "never"], default="never",
                   help="exit code 3 when the verdict reaches this level: collapse = B more collapsed than A; "
                   "warning = that, dense balls differing both ways, or B's worst-case MCCS significantly higher")
    return c


class _Bad(Exception):
    """A user error: printed as one line, exit 2."""


class _Run:
    """One finished audit opened for comparison: its result, T as a Source, and anchor rows of its S."""

    def __init__(self, path: str, what: str):
        from modeaudit.storage.layout import RunLayout
        self.path, self.what = Path(path), what
        p = self.path
        if not p.exists():
            raise _Bad(f"{what} {path}: no such directory; give the --out of a finished `modeaudit audit`")
        if not p.is_dir():
            raise _Bad(f"{what} {path} is a file, not a run directory; give the --out of a finished audit")
        rj = RunLayout(p).result_json
        if not rj.is_file():
            raise _Bad(f"{what} {path} holds no finished audit (no result.json); run `modeaudit audit --out {path}` "
                       "first")
        try:
            r = json.loads(rj.read_text())
            self.kind = r["source"]["kind"]
            self.modes = [int(m["s_index"]) for m in r["modes"]]
            self.worst = int(r["worst_case"]["s_index"])
            self.d0, self.theta = float(r["d0"]), float(r["settings"]["theta"])
            self.n_c = int(r["sizes"]["C"])
        except (ValueError, KeyError, TypeError) as e:
            raise _Bad(f"{rj} is not a complete modeaudit result ({type(e).__name__}: {e}); rerun the audit") from None
        self.result = r
        self.S, self.T = self._sources(r)
        if self.T.rows == 0 or self.S.rows == 0:
            raise _Bad(f"{what} {path}: its S or T is empty")
        bad = [i for i in [*self.modes, self.worst] if not 0 <= i < self.S.rows]
        if bad:
            raise _Bad(f"{what} {path}: result.json names S row {bad[0]} but S has {self.S.rows} rows; rerun the audit")
        self.n_c = min(self.n_c, self.T.rows)

    def _sources(self, r):
        from modeaudit.storage.store import RunStore, StoreError
        from modeaudit.tasks.join.sources import Source
        from modeaudit.tasks.errors import InputError
        from modeaudit.tasks.join.sources import check_scan, merge_scans, open_embeddings, reduction_ranges
        if self.kind == "generator":
            try:
                store = RunStore.open(self.path)
            except StoreError as e:
                raise _Bad(f"{self.what} {self.path}: {e}") from None
            for name in ("S", "T"):
                if name not in store.set_names:
                    raise _Bad(f"{self.what} {self.path}: its store holds no {name} embeddings")
            try:
                store.verify_sets(("S", "T"), f"{self.what} {self.path}")    # its messages name the run
            except StoreError as e:
                raise _Bad(str(e)) from None
            return Source.of_store(store, "S"), Source.of_store(store, "T")
        if self.kind == "embeddings":
            out = []
            for key, flag in (("embeddings_s", "--embeddings-s"), ("embeddings_t", "--embeddings-t")):
                f = r["source"].get(key)
                what = f"{self.what} {self.path}: its {flag}"
                try:
                    src = open_embeddings(f, what)
                    # The files may have changed since the audit: rows compare cannot use are an error here.
                    check_scan(merge_scans(src.scan_blocks(reduction_ranges(0, src.rows))), what)
                except (InputError, TypeError) as e:
                    raise _Bad(str(e)) from None
                out.append(src)
            return tuple(out)
        raise _Bad(f"{self.what} {self.path} audited {self.kind!r} inputs; compare reads generator runs and "
                   "embedding-file audits (audit the folders' embeddings with --embeddings-s/-t)")

    def anchor_rows(self, idx):
        import numpy as np
        rows = [self.S.read(i, i + 1) for i in idx]
        return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, self.S.dim), np.float32)

    def describe(self) -> dict:
        src = self.result["source"]
        return {"path": str(self.path.absolute()), "kind": self.kind, "generator": src.get("generator"),
                "generator_options": src.get("generator_options"), "seed": self.result["settings"].get("seed"),
                "rows_S": self.S.rows, "rows_T": self.T.rows, "dim": self.T.dim, "d0": self.d0, "theta": self.theta,
                "worst_case": self.worst, "modes": self.modes}


def _check_args(args) -> None:
    if not (isinstance(args.alpha, float) and math.isfinite(args.alpha) and 0 < args.alpha < 1):
        raise _Bad(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.replicates < 1 or args.fd_rows < 2:
        raise _Bad("--replicates must be >= 1 and --fd-rows >= 2")
    if not 0 <= args.seed < 2 ** 63:
        raise _Bad(f"--seed must lie in [0, 2**63), got {args.seed}")


def _check_not_foreign(out: Path, text: str) -> None:
    """Refuse an --out whose compare.json/compare.html no `modeaudit compare` wrote: they are the user's."""
    present = [n for n in (COMPARE_JSON, COMPARE_HTML) if (out / n).exists()]
    if not present:
        return
    try:
        doc = json.loads((out / COMPARE_JSON).read_text())
        ours = isinstance(doc, dict) and "modeaudit_version" in doc and "run_a" in doc and "run_b" in doc
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise _Bad(f"--out {text} holds {', '.join(present)} that modeaudit compare did not write; it would "
                   "overwrite them: choose an empty or new folder")


def _validate(args) -> tuple[_Run, _Run, Path]:
    _check_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _Bad(f"--out {args.out} is a file; choose a directory")
    _check_not_foreign(out, args.out)
    a, b = _Run(args.run_a, "RUN_A"), _Run(args.run_b, "RUN_B")
    if a.T.dim != b.T.dim:
        raise _Bad(f"RUN_A has {a.T.dim}-d embeddings but RUN_B {b.T.dim}-d; compare runs audited with the same "
                   "descriptor")
    if a.d0 != b.d0:
        raise _Bad(f"RUN_A was audited at d0={a.d0} but RUN_B at d0={b.d0}; rerun one with the other's --d0")
    if a.theta != b.theta:
        raise _Bad(f"RUN_A has MCCS theta={a.theta} but RUN_B theta={b.theta}; rerun one with the other's --theta")
    if not 0 < a.d0 < 1:
        raise _Bad(f"d0={a.d0}: the ball radius must lie in (0, 1)")
    return a, b, out


def compare_dirs(args) -> dict:
    """Validate, compute, write DIR/compare.json and compare.html; returns the compare.json dict."""
    from modeaudit import __version__
    from modeaudit.storage.layout import atomic_write_json, atomic_write_text
    from modeaudit.tasks.stats.compare import compare_runs
    t0 = time.perf_counter()
    a, b, out = _validate(args)
    ka, kb = a.modes[:args.modes], b.modes[:args.modes]
    res = compare_runs(a.anchor_rows(ka), b.anchor_rows(kb), a.T, b.T, d0=a.d0, alpha=args.alpha,
                       worst_a=a.anchor_rows([a.worst]), worst_b=b.anchor_rows([b.worst]), n_c_a=a.n_c,
                       n_c_b=b.n_c, theta=a.theta, replicates=args.replicates, seed=args.seed,
                       fd_rows=args.fd_rows, kernel=args.kernel, mode_ids_a=ka, mode_ids_b=kb)
    doc = {"modeaudit_version": __version__, "run_a": a.describe(), "run_b": b.describe(), **res,
           "settings": {"alpha": args.alpha, "modes": args.modes, "replicates": args.replicates,
                        "fd_rows": args.fd_rows, "seed": args.seed, "kernel": args.kernel}}
    doc["timings"] = {"total": round(time.perf_counter() - t0, 3)}
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / COMPARE_JSON, doc)
        atomic_write_text(out / COMPARE_HTML, render_html(doc))
    except OSError as e:
        raise _Bad(f"cannot write to --out {args.out} ({e.strerror or e}); choose a writable directory") from None
    return doc


def _f(x, nd=4) -> str:
    """A table cell: a number, or words where compare.json holds null or nan (the page shows no raw JSON)."""
    if x is None:
        return "&mdash;"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.{nd}g}"
    return html.escape(str(x))


def render_html(doc: dict) -> str:
    """A one-page report of compare.json (no external assets)."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(b['mode_of'])}{b['rank']}</td><td>{b['s_index']}</td><td>{b['x_a']}</td><td>{b['x_b']}</td>"
        f"<td>{_f(b['ratio_b_over_a'])}</td><td>[{_f(b['ci'][0])}, {_f(b['ci'][1])}]</td><td>{_f(b['p'])}</td>"
        f"<td>{_f(b['p_adj'])}</td><td>{'yes' if b['reject'] else 'no'}</td><td>{_f(b['direction'])}</td></tr>"
        for b in doc["test"]["balls"])
    m, fd = doc["mccs"], doc["fd"]
    colour = {"collapse": "#c0392b", "warning": "#d68910", "ok": "#1e8449"}[doc["verdict"]["level"]]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>modeaudit compare</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 8px;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}</style></head><body>
<h1>modeaudit compare</h1>
<p>A = <code>{e(doc['run_a']['path'])}</code><br>B = <code>{e(doc['run_b']['path'])}</code></p>
<h2 style="color:{colour}">{e(doc['verdict']['headline'])}</h2>
<p>more_collapsed = <b>{e(str(doc['more_collapsed']))}</b> at family-wise level alpha = {doc['alpha']}
(exact conditional binomial tests, two-sided, Holm over all {len(doc['test']['balls'])} balls of radius
d0 = {doc['radius']}; |T_A| = {doc['sizes']['T_a']}, |T_B| = {doc['sizes']['T_b']}).</p>
<table><tr><th>ball</th><th>S row</th><th>x_A</th><th>x_B</th><th>ratio B/A</th><th>CI</th><th>p</th>
<th>p (Holm)</th><th>reject</th><th>more mass in</th></tr>{rows}</table>
<h3>Worst-case MCCS (theta = {m['theta']})</h3>
<p>A: {_f(m['a'])} &nbsp; B: {_f(m['b'])} &nbsp; B - A = {_f(m['difference'])},
{100 * m['confidence']:.0f}% bootstrap interval [{_f(m['interval'][0])}, {_f(m['interval'][1])}]
({m['replicates']} replicates, seed {m['seed']}).</p>
<h3>Frechet distance between T_A and T_B</h3>
<p>{_f(fd['value'])} ({fd['rows_a']} and {fd['rows_b']} random rows, seed {fd['seed']}; descriptive: two samples
of one distribution have FD &gt; 0).</p></body></html>
"""


def run_compare(args) -> int:
    """Run `modeaudit compare`; user errors -> one line on stderr, exit 2; --fail-on -> exit 3."""
    from modeaudit.flows.cli import gate
    try:
        doc = compare_dirs(args)
    except _Bad as e:
        print(f"modeaudit: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"headline": doc["verdict"]["headline"], "more_collapsed": doc["more_collapsed"],
                      "mccs_difference": doc["mccs"]["difference"], "fd": doc["fd"]["value"],
                      "report": str(Path(args.out) / COMPARE_HTML)}, indent=1))
    return gate(doc["verdict"]["level"], args.fail_on)
