"""Audits across checkpoints, without Prefect: which files of a folder are checkpoints, their identity,
the history of audits (RUNS_DIR/history.json) and its index page (RUNS_DIR/index.html).

- **Checkpoints** are the regular files directly in CKPT_DIR (not recursive) ending in `.pt`
  (a TorchScript module, audited as `torchscript:PATH`) or `.onnx` (`onnx:PATH`), any case. Names
  starting with "." and ending in `.tmp`/`.part` are skipped: a writer should write to such a name
  and rename, so a half-written file is never audited.
- **Order**: oldest first, by modification time, then name.
- **Identity** is the sha256 of the file's bytes: a renamed or copied file is the same checkpoint
  (not audited again), a rewritten one is a new checkpoint.
- **Run folder**: RUNS_DIR/<stem>-<sha256[:12]>, derived, never chosen by the user.
- **history.json**: one entry per checkpoint (sha256) in audit order, written atomically. A failed
  audit is an entry {"status": "failed", "error": one line}; it is retried on the next pass, and the
  retry's entry replaces it (moved to the end: the order is the order of the last attempts).
"""
from __future__ import annotations

import datetime as _dt
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeaudit.storage.layout import (RESULT_JSON, REPORT_HTML, RunLayout, atomic_write_json, atomic_write_text,
                                      make_writable_dir)
from modeaudit.tasks.registry import ConfigError

# Checkpoint suffix -> generator registry prefix.
CHECKPOINT_KINDS = {".pt": "torchscript", ".onnx": "onnx"}
SKIP_SUFFIXES = (".tmp", ".part")
HISTORY_JSON = "history.json"
INDEX_HTML = "index.html"
WATCH_PLOTS = "plots"          # RUNS_DIR/plots/trends.{png,svg}
HISTORY_VERSION = 1
FD_ROWS = 10_000               # rows of T and of the reference the FD is computed on


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file found in CKPT_DIR."""
    path: Path
    mtime_ns: int
    sha256: str

    @property
    def kind(self) -> str:
        return CHECKPOINT_KINDS[self.path.suffix.lower()]

    @property
    def spec(self) -> str:
        """The generator spec the audit gets (absolute path)."""
        return f"{self.kind}:{self.path.absolute()}"

    @property
    def run_name(self) -> str:
        """The run folder's name under RUNS_DIR: <stem>-<sha256[:12]>."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", self.path.stem).strip("._") or "checkpoint"
        return f"{stem[:80]}-{self.sha256[:12]}"


def check_dirs(ckpt_dir: str | os.PathLike, runs_dir: str | os.PathLike) -> tuple[Path, Path]:
    """CKPT_DIR must be a folder; RUNS_DIR a folder (made if missing) that is not itself a run. ConfigError else."""
    ck, runs = Path(ckpt_dir), Path(runs_dir)
    if not ck.exists():
        raise ConfigError(f"checkpoint folder {ck} does not exist; give the folder your training writes "
                          "checkpoints (.pt, .onnx) to")
    if not ck.is_dir():
        raise ConfigError(f"checkpoint folder {ck} is a file, not a folder; give the folder holding the checkpoints")
    if runs.exists() and not runs.is_dir():
        raise ConfigError(f"--out {runs} is a file; give a folder for the runs (one run folder per checkpoint)")
    if (runs / "manifest" / "run.json").exists():
        raise ConfigError(f"--out {runs} is an audit run folder; give a folder of its own for the runs of a watch")
    if runs.is_dir() and not (runs / HISTORY_JSON).exists():
        # Without our history.json these are not ours: never overwrite a user's page or pictures.
        foreign = [n for n in (INDEX_HTML, "plots") if (runs / n).exists()]
        if foreign:
            raise ConfigError(f"--out {runs} holds {', '.join(foreign)} but no {HISTORY_JSON}, so modeaudit watch "
                              "did not write them and would overwrite them: choose an empty or new folder")
    make_writable_dir(runs, f"--out {runs}")
    return ck, runs


def is_checkpoint(p: Path) -> bool:
    name = p.name
    return (not name.startswith(".") and not name.lower().endswith(SKIP_SUFFIXES)
            and p.suffix.lower() in CHECKPOINT_KINDS and p.is_file())


def scan_checkpoints(ckpt_dir: str | os.PathLike) -> list[Checkpoint]:
    """Checkpoint files of CKPT_DIR, oldest first (mtime, then name), each with its sha256."""
    from modeaudit.tasks.models.generators import file_sha256
    found = []
    for p in Path(ckpt_dir).iterdir():
        if not is_checkpoint(p):
            continue
        try:
            st = p.stat()
            found.append(Checkpoint(p, st.st_mtime_ns, file_sha256(p)))
        except OSError:          # removed or unreadable while scanning: the next pass sees it again
            continue
    return sorted(found, key=lambda c: (c.mtime_ns, c.path.name))


# ---------------------------------------------------------------- history.json

def load_history(runs_dir: str | os.PathLike) -> dict:
    """RUNS_DIR/history.json, or an empty history. A damaged file is a ConfigError (never silently replaced)."""
    import json
    path = Path(runs_dir) / HISTORY_JSON
    if not path.exists():
        return {"version": HISTORY_VERSION, "entries": []}
    try:
        h = json.loads(path.read_text())
        if not isinstance(h, dict) or not isinstance(h.get("entries"), list):
            raise ValueError("no 'entries' list")
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is not a modeaudit history ({e}); move it away and rerun") from None
    return h


def audited(history: dict) -> set[str]:
    """sha256 of every checkpoint audited successfully (failed ones are retried)."""
    return {e["sha256"] for e in history["entries"] if e.get("status") == "ok"}


def attempts_of(history: dict, sha256: str) -> int:
    return next((int(e.get("attempts", 1)) for e in history["entries"] if e["sha256"] == sha256), 0)


def record(runs_dir: str | os.PathLike, history: dict, entry: dict) -> dict:
    """Append `entry` (replacing an earlier entry of the same sha256) and write history.json atomically."""
    history["entries"] = [e for e in history["entries"] if e["sha256"] != entry["sha256"]] + [entry]
    history["version"] = HISTORY_VERSION
    atomic_write_json(Path(runs_dir) / HISTORY_JSON, history)
    return history


def one_line(e: BaseException) -> str:
    """An error as one line: its message's first line (with the type for errors that are not ours)."""
    from modeaudit.storage.store import StoreError
    text = (str(e).strip().splitlines() or [""])[0][:500]
    if isinstance(e, (ConfigError, StoreError)) or type(e).__name__ == "FailedRun":
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def base_entry(ck: Checkpoint, attempts: int) -> dict:
    return {"checkpoint": str(ck.path.absolute()), "sha256": ck.sha256, "generator": ck.spec, "run": ck.run_name,
            "attempts": attempts, "audited_at": _now()}


def failed_entry(ck: Checkpoint, attempts: int, error: str) -> dict:
    return {**base_entry(ck, attempts), "status": "failed", "error": error}


def test_p_values(tests: dict) -> dict:
    """{test: p} of the tests that have one (two_sample: its smallest Holm-adjusted p); paper has none."""
    out = {}
    for name, t in tests.items():
        if isinstance(t, list):
            ps = [b.get("p_adj", b.get("p")) for b in t if b.get("p_adj", b.get("p")) is not None]
            out[name] = float(min(ps)) if ps else None
        elif isinstance(t, dict) and t.get("p") is not None:
            out[name] = float(t["p"])
        else:
            out[name] = None
    return out


def ok_entry(ck: Checkpoint, attempts: int, result: dict, run_dir: Path) -> dict:
    """The history entry of a finished audit (numbers from its result.json)."""
    tests = result.get("tests", {})
    return {**base_entry(ck, attempts), "status": "ok",
            # None when the audit ran with --no-report (the index then links result.json)
            "report": f"{ck.run_name}/{REPORT_HTML}" if RunLayout(run_dir).written_report else None,
            "result": f"{ck.run_name}/{RESULT_JSON}",
            "headline": result["verdict"]["headline"], "level": result["verdict"].get("level", "ok"),
            "worst_case": {"count_d0": result["worst_case"]["count_d0"], "mccs": result["worst_case"]["mccs"]},
            "mccs": {"mean": result["mccs"]["mean"], "std": result["mccs"]["std"]},
            "p_values": test_p_values(tests),
            "rejects": {n: (any(b["reject"] for b in t) if isinstance(t, list) else bool(t.get("reject")))
                        for n, t in tests.items()},
            "fd_reference": fd_to_reference(run_dir, result)}


def fd_to_reference(run_dir: str | os.PathLike, result: dict) -> float | None:
    """Frechet distance between the run's T embeddings and its reference set (first FD_ROWS rows of each), in the
    descriptor's space, when the reference is a reference generator (stored set R) or an .npy file; else None."""
    from modeaudit.storage.store import RunStore
    from modeaudit.tasks.metrics.fid import StreamingStats, frechet_distance_stats
    try:
        store = RunStore.open(run_dir)
        T = store.read("T", "emb", 0, min(FD_ROWS, store.layout("T").rows)).astype(np.float64)
        ref_path = (result.get("settings") or {}).get("reference")
        if "R" in store.set_names:
            R = store.read("R", "emb", 0, min(FD_ROWS, store.layout("R").rows)).astype(np.float64)
        elif ref_path and str(ref_path).endswith(".npy"):
            R = np.load(ref_path, mmap_mode="r")[:FD_ROWS].astype(np.float64)
        else:
            return None
        T /= np.linalg.norm(T, axis=1, keepdims=True)      # rows as the audit reads them: unit length
        R /= np.linalg.norm(R, axis=1, keepdims=True)
        if len(T) < 2 or len(R) < 2:
            return None
        return frechet_distance_stats(*(StreamingStats(x.shape[1]).update(x) for x in (T, R)))
    except Exception:  # noqa: BLE001 - informative only; never fails the audit's entry
        return None


# ---------------------------------------------------------------- index.html

def write_index(runs_dir: str | os.PathLike, history: dict) -> Path:
    """RUNS_DIR/index.html: the trends over the audited checkpoints (plots/trends.png/.svg) and a table linking
    every report; failed audits are listed with their error."""
    from modeaudit.tasks.report.style import COLORS, new_figure, save_figure, style_axes
    runs = Path(runs_dir)
    entries = history["entries"]
    ok = [e for e in entries if e.get("status") == "ok"]
    img = ""
    if ok:
        x = np.arange(len(ok))
        names = [Path(e["checkpoint"]).name for e in ok]
        labels = [f"{n} ({e['sha256'][:7]})" if names.count(n) > 1 else n for n, e in zip(names, ok)]  # rewritten
        fig = new_figure(11, 6.5, title=f"Audits across checkpoints ({len(ok)} audited, oldest first)")
        axs = fig.subplots(2, 2, sharex=True)
        ax = axs[0, 0]
        ax.plot(x, [e["worst_case"]["mccs"] for e in ok], "o-", color=COLORS["worst"], label="worst case")
        m = np.array([e["mccs"]["mean"] for e in ok], float)
        s = np.array([e["mccs"]["std"] or 0.0 for e in ok], float)
        ax.plot(x, m, "o-", color=COLORS["mean"], label="population mean")
        ax.fill_between(x, m - s, m + s, color=COLORS["band"], alpha=0.6, label="mean ± std")
        ax.set_ylabel("MCCS")
        ax.legend(fontsize=8)
        ax = axs[0, 1]
        ax.plot(x, [e["worst_case"]["count_d0"] for e in ok], "o-", color=COLORS["worst"])
        ax.set_ylabel("worst-case count within d0")
        ax = axs[1, 0]
        names = sorted({n for e in ok for n, p in e["p_values"].items() if p is not None})
        for n in names:
            ax.plot(x, [e["p_values"].get(n) if e["p_values"].get(n) is not None else np.nan for e in ok], "o-",
                    label=n)
        if names:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no test with a p-value ran", ha="center", va="center", transform=ax.transAxes,
                    color=COLORS["muted"])
        ax.set_ylabel("test p-value")
        ax = axs[1, 1]
        fd = [e.get("fd_reference") for e in ok]
        if any(v is not None for v in fd):
            ax.plot(x, [np.nan if v is None else v for v in fd], "o-", color=COLORS["after"])
        else:
            ax.text(0.5, 0.5, "no reference set", ha="center", va="center", transform=ax.transAxes,
                    color=COLORS["muted"])
        ax.set_ylabel("FD to the reference")
        for ax in axs.ravel():
            style_axes(ax)
        for ax in axs[1]:
            ax.set_xticks(x)
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        save_figure(fig, runs / WATCH_PLOTS, "trends")
        img = (f'<p><img alt="trends" style="max-width:100%" src="{WATCH_PLOTS}/trends.png"> '
               f'(<a href="{WATCH_PLOTS}/trends.svg">SVG</a>)</p>')
    e_ = html.escape
    rows = []
    for i, e in enumerate(entries, 1):
        name = e_(Path(e["checkpoint"]).name)
        if e.get("status") == "ok":
            p = ", ".join(f"{e_(n)} {v:.3g}" for n, v in e["p_values"].items() if v is not None) or "–"
            fd = "–" if e.get("fd_reference") is None else f"{e['fd_reference']:.4g}"
            rows.append(f"<tr><td>{i}</td><td>{name}</td><td><code>{e['sha256'][:12]}</code></td>"
                        f"<td class='{e_(e['level'])}'>{e_(e['headline'])}</td><td>{e['worst_case']['count_d0']}</td>"
                        f"<td>{e['worst_case']['mccs']:.4g}</td><td>{e['mccs']['mean']:.4g} ± "
                        f"{(e['mccs']['std'] or 0):.3g}</td><td>{p}</td><td>{fd}</td>"
                        f"<td><a href=\"{e_(e.get('report') or e['result'])}\">"
                        f"{'report' if e.get('report') else 'result.json'}</a></td></tr>")
        else:
            rows.append(f"<tr><td>{i}</td><td>{name}</td><td><code>{e['sha256'][:12]}</code></td>"
                        f"<td class='failed' colspan='6'>audit failed (attempt {e.get('attempts', 1)}; retried on "
                        f"the next pass): {e_(e.get('error', ''))}</td><td></td></tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>modeaudit: audits across checkpoints</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;font-size:14px}}
.collapse{{color:#b91c1c;font-weight:bold}}.warning{{color:#b45309}}.ok{{color:#15803d}}.failed{{color:#b91c1c}}</style>
</head><body><h1>Audits across checkpoints</h1>
<p>{len(ok)} checkpoint(s) audited, {len(entries) - len(ok)} failed; oldest first. Updated {e_(_now())}.
The numbers are in <a href="{HISTORY_JSON}">{HISTORY_JSON}</a>.</p>
{img}
<table><tr><th>#</th><th>checkpoint</th><th>sha256</th><th>verdict</th><th>worst-case count</th>
<th>worst-case MCCS</th><th>MCCS mean ± std</th><th>p-values</th><th>FD to reference</th><th></th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    return atomic_write_text(runs / INDEX_HTML, page)
