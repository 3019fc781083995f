"""HTML report for one audit: verdict, neighbour-function figure, MCCS histogram, settings.

The page is self-contained (figures embedded as base64 PNG, inline CSS, no JS, no
external resources) so it can be mailed, attached to a CI run or opened offline.
The same PNGs are also written under ``out_dir/plots/`` for slides and diffs.

This module is a pure kernel: it never imports Prefect, and it never touches
matplotlib's global state (no pyplot, no ``matplotlib.use``) because it builds
``matplotlib.figure.Figure`` objects directly, which is thread-safe enough for Dask
workers and cannot clash with a backend chosen by the host process.
"""

from __future__ import annotations

import base64
import html
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from modeaudit.storage.layout import CALIBRATION, RunLayout, atomic_write_bytes
from modeaudit.tasks.report import style
from modeaudit.tasks.stats.registry import STAT_TESTS, uncontrolled

if TYPE_CHECKING:     # matplotlib loads when a figure is drawn: a run without a report, and the CLI, skip ~1 s of it
    from matplotlib.figure import Figure

__all__ = ["write_report", "figure_to_base64_png", "render_report_html",
           "neighbour_curves_figure", "mccs_histogram_figure", "verdict_level", "verdict_text"]

# How many individual reference curves to draw behind the band: enough to show the
# spread, few enough that the band and the red curve stay readable.
_N_CONTEXT_CURVES = 30
# One style for every figure (tasks/report/style.py).
_COLORS = style.COLORS


# --------------------------------------------------------------------------- figures

def figure_to_base64_png(fig: Figure) -> str:
    """Render a matplotlib figure to PNG and return it base64-encoded (ASCII str).

    Suitable for ``<img src="data:image/png;base64,...">``. The "Software" PNG
    metadata is dropped so the bytes do not change with the matplotlib version string.
    """
    return base64.b64encode(_figure_png_bytes(fig)).decode("ascii")


def _figure_png_bytes(fig: Figure) -> bytes:
    return style.png_bytes(fig)


def _as_curves(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (anchors x radii), got shape {arr.shape}")
    return arr.astype(np.float64, copy=False)


def _float_vec(v: Any, n: int) -> np.ndarray | None:
    """Result-dict vector as float array of length n, or None when absent/mismatched."""
    if v is None:
        return None
    try:
        arr = np.array([np.nan if x is None else x for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) else None


def _band(result: Mapping, ref: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, median, high) of the reference band.

    The result dict is authoritative (it is what the test used); recompute from the
    raw reference curves only when it lacks the band, so the figure never disagrees
    with the verdict.
    """
    R = ref.shape[1]
    curves = result.get("curves") or {}
    low = _float_vec(curves.get("ref_low"), R)
    high = _float_vec(curves.get("ref_high"), R)
    med = _float_vec(curves.get("ref_median"), R)
    if ref.shape[0] > 0 and (low is None or high is None or med is None):
        q_low, q_med, q_high = np.quantile(ref, [alpha / 2, 0.5, 1 - alpha / 2], axis=0)
        low = q_low if low is None else low
        med = q_med if med is None else med
        high = q_high if high is None else high
    nan = np.full(R, np.nan)
    return (nan if low is None else low, nan if med is None else med,
            nan if high is None else high)


def _context_rows(q: int) -> np.ndarray:
    # Evenly spaced rows instead of an RNG draw: the reference anchors are already a
    # random sample, and this keeps the figure deterministic without a seed.
    k = min(_N_CONTEXT_CURVES, q)
    return np.unique(np.linspace(0, q - 1, k).round().astype(int)) if k else np.zeros(0, int)


def _fmt_int(n: Any) -> str:
    try:
        return f"{int(n):,}"
    except (TypeError, ValueError):
        return "?"


def neighbour_curves_figure(result: Mapping, obs_curves: Any, ref_curves: Any) -> Figure:
    """Seed-paper Fig. 1 style plot: observed (densest) anchors vs the reference band.

    Two panels share the x axis (radius d): linear counts, and log10(max(count, 1)) so
    the band stays visible when the worst case is orders of magnitude above it.
    """
    obs = _as_curves(obs_curves, "obs_curves")
    ref = _as_curves(ref_curves, "ref_curves")
    if obs.shape[0] < 1:
        raise ValueError("obs_curves needs at least one anchor (p >= 1)")
    R = obs.shape[1]
    if ref.shape[1] != R and ref.size:
        raise ValueError(f"ref_curves has {ref.shape[1]} radii, obs_curves has {R}")
    radii = _float_vec(result.get("radii"), R)
    if radii is None:
        raise ValueError(f"result['radii'] must list the {R} radii of the curves")
    settings = result.get("settings") or {}
    alpha = float(settings.get("alpha", (result.get("tests") or {}).get("paper", {}).get("alpha", 0.05)))
    low, med, high = _band(result, ref, alpha)
    d0 = result.get("d0")

    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    fig = Figure(figsize=(12.0, 4.9), layout="constrained")
    axes = fig.subplots(1, 2)
    ctx = ref[_context_rows(ref.shape[0])]

    def _log(a: np.ndarray) -> np.ndarray:
        return np.log10(np.maximum(a, 1.0))

    for ax, tf, ylabel in ((axes[0], lambda a: a, "neighbours N(anchor, T, d)"),
                           (axes[1], _log, "log10(max(N(anchor, T, d), 1))")):
        if len(ctx):
            segs = np.stack([np.broadcast_to(radii, ctx.shape), tf(ctx)], axis=-1)
            ax.add_collection(LineCollection(segs, colors=_COLORS["ref"], linewidths=0.6,
                                             alpha=0.7, zorder=1))
        if np.isfinite(low).any() and np.isfinite(high).any():
            ax.fill_between(radii, tf(low), tf(high), color=_COLORS["band"], alpha=0.55,
                            linewidth=0, zorder=2)
        if np.isfinite(med).any():
            ax.plot(radii, tf(med), color=_COLORS["median"], lw=1.3, ls="--", zorder=3)
        for row in obs[1:][::-1]:  # draw other top-p first so the worst case stays on top
            ax.plot(radii, tf(row), color=_COLORS["obs"], lw=0.9, alpha=0.85, zorder=4)
        ax.plot(radii, tf(obs[0]), color=_COLORS["worst"], lw=2.2, zorder=5)
        if isinstance(d0, (int, float)) and math.isfinite(d0):
            ax.axvline(float(d0), color=_COLORS["d0"], ls=":", lw=1.3, zorder=6)
        ax.set_xlabel("radius d = arccos(<a, b>) / pi")
        ax.set_ylabel(ylabel)
        ax.set_xlim(float(radii.min()), float(radii.max()) if R > 1 else float(radii.min()) + 1e-3)
        # Counts (and log10(max(count, 1))) are >= 0: never show a negative axis, and
        # give all-zero curves a visible non-degenerate range.
        ax.autoscale(axis="y")
        top = max(ax.get_ylim()[1], 1.0)
        ax.set_ylim(bottom=-0.02 * top, top=top)  # small pad: curves at 0 stay visible
        ax.grid(True, color="#e5e5e5", lw=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0].set_title("linear counts", fontsize=10)
    axes[1].set_title("log counts", fontsize=10)
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))

    wc = result.get("worst_case") or {}
    handles = [
        Line2D([], [], color=_COLORS["worst"], lw=2.2,
               label=f"worst-case dense mode (S index {_fmt_int(wc.get('s_index'))})"),
    ]
    if obs.shape[0] > 1:
        handles.append(Line2D([], [], color=_COLORS["obs"], lw=0.9,
                              label=f"other top-p anchors ({obs.shape[0] - 1})"))
    handles += [
        Patch(color=_COLORS["band"], alpha=0.55,
              label=f"reference band, pointwise [alpha/2, 1-alpha/2], alpha = {alpha:g}"),
        Line2D([], [], color=_COLORS["median"], lw=1.3, ls="--", label="reference median"),
    ]
    if len(ctx):
        handles.append(Line2D([], [], color=_COLORS["ref"], lw=0.8,
                              label=f"{len(ctx)} of {ref.shape[0]:,} reference anchors"))
    if isinstance(d0, (int, float)) and math.isfinite(d0):
        handles.append(Line2D([], [], color=_COLORS["d0"], ls=":", lw=1.3, label=f"d0 = {d0:g}"))
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False, fontsize=9)

    sizes = result.get("sizes") or {}
    fig.suptitle(
        f"Neighbour function N(anchor, T, d):  |T| = {_fmt_int(sizes.get('T'))},  "
        f"|S| = {_fmt_int(sizes.get('S'))},  p = {obs.shape[0]},  q = {ref.shape[0]:,}",
        fontsize=11.5)
    return fig


def mccs_histogram_figure(result: Mapping, mccs_values: Any) -> Figure:
    """Histogram of MCCS over the anchor set A, with the population mean +- std and
    the worst-case anchor's MCCS marked in red."""
    vals = np.asarray(mccs_values, dtype=np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    m = result.get("mccs") or {}
    wc_mccs = _finite_or_none((result.get("worst_case") or {}).get("mccs", m.get("worst_case")))
    mean = _finite_or_none(m.get("mean"))
    std = _finite_or_none(m.get("std"))
    if mean is None and vals.size:
        mean = float(vals.mean())
    if std is None and vals.size > 1:
        std = float(vals.std(ddof=1))  # seed paper 001 uses the m-1 denominator

    from matplotlib.figure import Figure
    fig = Figure(figsize=(12.0, 3.9), layout="constrained")
    ax = fig.subplots()
    if vals.size:
        lo, hi = float(vals.min()), float(vals.max())
        # numpy widens a zero-width range to +-0.5, which pushes MCCS (in [0, 1]) far
        # below 0 on the axis; use a narrow range instead.
        rng = (lo - 0.005, hi + 0.005) if hi - lo < 1e-9 else None
        ax.hist(vals, bins=min(60, max(5, int(np.sqrt(vals.size)))), range=rng, color=_COLORS["hist"],
                edgecolor="white", linewidth=0.4, label=f"{vals.size:,} anchors in A")
    else:
        ax.text(0.5, 0.5, "no finite MCCS values", transform=ax.transAxes,
                ha="center", va="center", color="#777777")
    if mean is not None:
        if std is not None and std > 0:
            ax.axvspan(mean - std, mean + std, color=_COLORS["mean"], alpha=0.08, lw=0,
                       label=f"mean ± std ({std:.3g})")
        ax.axvline(mean, color=_COLORS["mean"], ls="--", lw=1.4, label=f"mean = {mean:.4g}")
    if wc_mccs is not None:
        ax.axvline(wc_mccs, color=_COLORS["worst"], lw=2.2,
                   label=f"worst case MCCS = {wc_mccs:.4g}")
        ax.annotate(f"{wc_mccs:.4g}", xy=(wc_mccs, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(-5, -14), textcoords="offset points", color=_COLORS["worst"],
                    fontsize=10, ha="right")
        # axvline does not widen the x limits; an outlying worst case must stay visible.
        lo, hi = ax.get_xlim()
        pad = 0.03 * max(hi - lo, 1e-6)
        ax.set_xlim(min(lo, wc_mccs - pad), max(hi, wc_mccs + 4 * pad))
    theta = m.get("theta", (result.get("settings") or {}).get("theta"))
    theta_txt = f" (theta = {theta:g})" if isinstance(theta, (int, float)) else ""
    ax.set_title(f"MCCS over anchors A{theta_txt}: |A| = {_fmt_int((result.get('sizes') or {}).get('A'))}, "
                 f"|C| = {_fmt_int((result.get('sizes') or {}).get('C'))}", fontsize=11.5)
    ax.set_xlabel("MCCS (0 = no close neighbours, 1 = all of C at distance 0)")
    ax.set_ylabel("anchors")
    ax.grid(True, axis="y", color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
        # Outside the axes: the worst case usually sits in the right tail, exactly
        # where an in-axes legend would cover it.
        fig.legend(loc="outside lower center", ncol=4, frameon=False, fontsize=9)
    return fig


def _finite_or_none(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ------------------------------------------------------------------------------ HTML

def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    """Human-readable, escaped rendering of one value from the result dict."""
    if v is None:
        return '<span class="muted">null</span>'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return _e(f)
        return _e(f"{f:.4g}") if f != 0 else "0"
    if isinstance(v, Mapping):
        if not v:
            return '<span class="muted">none</span>'
        # A nested table, never raw JSON.
        return '<table class="sub">' + "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(x)}</td></tr>"
                                                for k, x in v.items()) + "</table>"
    if isinstance(v, (list, tuple)):
        if not v:
            return '<span class="muted">none</span>'
        if all(isinstance(x, Mapping) for x in v):
            return "".join(_fmt(x) for x in v[:5]) + (f'<span class="muted">… {len(v)} entries</span>'
                                                      if len(v) > 5 else "")
        # e.g. r_ref has q indices: the table is not the place for all of them
        shown = ", ".join(_fmt(x) for x in v[:12])
        return shown + (f' <span class="muted">… ({len(v):,} items)</span>' if len(v) > 12 else "")
    return _e(v)


def _rows(pairs: Sequence[tuple[str, Any]], *, raw_values: bool = False) -> str:
    return "".join(f"<tr><th>{_e(k)}</th><td>{v if raw_values else _fmt(v)}</td></tr>"
                   for k, v in pairs)


def _as_test(t):
    """A test result as a dict: list-valued tests (one dict per ball) reject when any ball does."""
    if isinstance(t, Mapping):
        return t
    if isinstance(t, (list, tuple)):
        return {"reject": any(bool(b.get("reject")) for b in t if isinstance(b, Mapping)), "balls": len(t),
                "rejected_balls": sum(bool(b.get("reject")) for b in t if isinstance(b, Mapping))}
    return {"reject": t}


def _verdict(tests: Mapping) -> tuple[str, str, str]:
    """(css class, headline, sub-line) from the per-test reject flags."""
    tests = {k: _as_test(v) for k, v in tests.items()}
    rejecting = [n for n, t in tests.items() if isinstance(t, Mapping) and t.get("reject")]
    # A rejection of a test whose error rate is not controlled (the registry says which)
    # is a hint, never "collapse detected": the paper's band test fires on any smooth peak.
    unc = uncontrolled()
    controlled = [n for n in tests if n not in unc]
    ctl_rej = [n for n in rejecting if n not in unc]
    unc_rej = [n for n in rejecting if n in unc]
    names = lambda xs: ", ".join(f"<code>{_e(x)}</code>" for x in xs)  # noqa: E731
    # A selection test against the parametric surrogate is valid only under the surrogate's
    # assumption (no identity clusters): alone, its rejection is a warning, not a verdict.
    surrogate = [n for n in ctl_rej if n == "selection" and tests[n].get("null_kind") == "surrogate"]
    if surrogate and len(surrogate) == len(ctl_rej):
        return ("warn", "Dense structure beyond a smooth model",
                f"{names(surrogate)} rejects against the parametric surrogate (one smooth bump on the sphere): "
                "some ball is denser than such a model predicts. That is collapse only if the real data has no "
                "cluster structure; rerun with <code>--reference</code> or <code>--reference-generator</code> "
                "for a test that decides.")
    if ctl_rej:
        sub = f"Rejected by {names(ctl_rej)}"
        if unc_rej:
            sub += f" (and by the uncontrolled {names(unc_rej)})"
        return "bad", "Collapse detected", sub + "."
    if unc_rej:
        if controlled:
            sub = (f"Only the uncontrolled {names(unc_rej)} test rejects; the controlled "
                   f"{names(controlled)} do not. Treat this as a hint, not as evidence.")
        else:
            sub = (f"Only {names(unc_rej)} rejects, and its error rate is not controlled; "
                   "no controlled test was run. Treat this as a hint, not as evidence.")
        return "warn", "Possible collapse (uncontrolled test only)", sub
    if not tests:
        return "none", "No tests were run", ""
    return "ok", "No collapse detected", f"None of {names(list(tests))} rejects."


_LEVELS = {"bad": "collapse", "warn": "warning", "ok": "ok", "none": "ok"}


def verdict_level(tests: Mapping) -> str:
    """"collapse", "warning" or "ok": what --fail-on gates on (the verdict's colour, for programs)."""
    return _LEVELS[_verdict(tests)[0]]


def verdict_text(tests: Mapping) -> tuple[str, str]:
    """(headline, explanation) of the report's verdict, as plain text (for the CLI and other programs)."""
    _, head, sub = _verdict(tests)
    return head, html.unescape(re.sub(r"<[^>]+>", "", sub))


def _tests_table(tests: Mapping, n_radii: int) -> str:
    rows = []
    for name, t in tests.items():
        t = _as_test(t)
        rej = bool(t.get("reject"))
        badge = ('<span class="badge bad">reject</span>' if rej
                 else '<span class="badge ok">no reject</span>')
        # Curves and envelopes are drawn in their own sections; the table keeps the scalars.
        details = _fmt({_label(k): v for k, v in t.items()
                        if k != "reject" and not isinstance(v, (list, tuple, Mapping))})
        note = STAT_TESTS[name].note.format(n_radii=n_radii) if name in STAT_TESTS else ""
        kind = ('<span class="badge warn">error rate not controlled</span>'
                if name in uncontrolled() else "")
        rows.append(
            f"<tr><td><code>{_e(name)}</code> {kind}"
            + (f'<div class="note">{_e(note)}</div>' if note else "")
            + f"</td><td>{badge}</td><td class=\"small\">{details}</td></tr>")
    return ("<table class=\"tests\"><thead><tr><th>test</th><th>result</th><th>details</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


_LABELS = {"p": "p-value", "p_low": "p-value, low end", "p_high": "p-value, high end", "alpha": "alpha",
           "radii_above": "radii above the band", "radii_below": "radii below the band", "balls": "balls tested",
           "rejected_balls": "balls rejected", "replicates": "null replicates", "null_kind": "null",
           "s_index": "worst case (S row)", "n_ref": "reference curves", "statistic": "statistic"}


def _label(key: str) -> str:
    return _LABELS.get(key, key.replace("_", " "))


def _worst_case_block(result: Mapping) -> str:
    wc = result.get("worst_case") or {}
    m = result.get("mccs") or {}
    d0 = result.get("d0")
    wc_m, mean, std = (_finite_or_none(wc.get("mccs", m.get("worst_case"))),
                       _finite_or_none(m.get("mean")), _finite_or_none(m.get("std")))
    z = ""
    if wc_m is not None and mean is not None and std:
        z = f' <span class="muted">({(wc_m - mean) / std:+.1f} std from the mean)</span>'
    pop = (f"{_fmt(mean)} ± {_fmt(std)}" if mean is not None else '<span class="muted">n/a</span>')
    items = [
        ("Worst-case anchor (index in S)", _fmt(wc.get("s_index"))),
        (f"Neighbours in S within d0 = {_fmt(d0)}", _fmt(wc.get("count_d0"))),
        ("MCCS of the worst case", f"<b>{_fmt(wc_m)}</b>{z}"),
        ("Population MCCS over A (mean ± std)", pop),
    ]
    ties = wc.get("ties")
    if isinstance(ties, int) and ties > 1:
        lo_hi = wc.get("tied_mccs_range") or [None, None]
        items.append(("Ties at the top count",
                      f"{ties} rows of S share the top count (the lowest index is shown); their MCCS spans "
                      f"[{_fmt(_finite_or_none(lo_hi[0]))}, {_fmt(_finite_or_none(lo_hi[1]))}] over "
                      f"{_fmt(wc.get('tied_mccs_rows'))} of them"))
    if "count_d0_weighted" in wc:
        items.append((f"Ranked by (pairs at exactly d0 weighted "
                      f"{_fmt((result.get('settings') or {}).get('tie_weight'))})",
                      f"{_fmt(wc.get('count_d0_weighted'))} ({_fmt(wc.get('pairs_at_d0'))} pairs at exactly d0)"))
    truth = result.get("truth")
    if isinstance(truth, Mapping):
        planted = truth.get("worst_case_is_planted")
        if planted is None:
            txt = '<span class="muted">unknown</span>'
        elif planted:
            txt = '<span class="badge ok">yes</span> the worst case is the planted mode'
        else:
            txt = '<span class="badge bad">no</span> the worst case is NOT the planted mode'
        items.append(("Ground truth (synthetic generator)", txt))
        items += [(f"truth: {k}", _fmt(v)) for k, v in truth.items() if k != "worst_case_is_planted"]
    return "<table class=\"kv\">" + _rows(items, raw_values=True) + "</table>"


_KNOWN_TOP = {"modeaudit_version", "source", "sizes", "d0", "radii", "settings", "worst_case",
              "r_obs", "r_ref", "curves", "tests", "mccs", "truth", "normalization", "timings", "run_info",
              # drawn in their own sections (tasks/report/stats.py), or the verdict at the top
              "modes", "sampling_efficiency", "diversity", "verdict"}


def _settings_block(result: Mapping) -> str:
    sizes = result.get("sizes") or {}
    radii = result.get("radii") or []
    parts = []

    general = [(f"|{k}|", v) for k, v in sizes.items()]
    general.append(("d0", result.get("d0")))
    if len(radii):
        r = np.asarray(radii, dtype=float)
        steps = np.diff(r)
        step = (f", step {steps[0]:.4g}" if steps.size and np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9)
                else "")
        general.append(("radii", f"{r.min():.4g} … {r.max():.4g} ({r.size} radii{step})"))
    else:
        general.append(("radii", None))
    general.append(("modeaudit version", result.get("modeaudit_version")))
    r_obs, r_ref = result.get("r_obs"), result.get("r_ref")
    if isinstance(r_obs, (list, tuple)):
        general.append(("R_obs (S indices)", r_obs))
    if isinstance(r_ref, (list, tuple)):
        general.append(("R_ref", f"{len(r_ref):,} random anchors"))
    parts.append(("Sizes and grid", general))

    settings = result.get("settings") or {}
    parts.append(("Settings", list(settings.items())))

    source = result.get("source") or {}
    src = [(k, v) for k, v in source.items() if k != "generator_options"]
    opts = source.get("generator_options")
    if isinstance(opts, Mapping):
        src += [(f"option: {k}", v) for k, v in opts.items()]
    elif opts is not None:
        src.append(("generator_options", opts))
    parts.append(("Source", src))

    norm = result.get("normalization") or {}
    if norm:
        rows = []
        for k, v in norm.items():
            if isinstance(v, Mapping):
                rows += [(f"{k}: {kk}", vv) for kk, vv in v.items()]
            else:
                rows.append((k, v))
        parts.append(("Normalization", rows))

    timings = result.get("timings") or {}
    if timings:
        rows = [(k, f"{v:.2f} s" if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                for k, v in timings.items()]
        total = sum(v for v in timings.values()
                    if isinstance(v, (int, float)) and not isinstance(v, bool))
        rows.append(("total", f"{total:.2f} s"))
        parts.append(("Timings", rows))

    other = [(k, v) for k, v in result.items() if k not in _KNOWN_TOP]
    if other:
        parts.append(("Other", other))

    cards = []
    for title, rows in parts:
        if not rows:
            continue
        # The source's nested tables (options, shards, inputs, cache keys) need the whole row to stay readable.
        wide = " wide" if title == "Source" else ""
        cards.append(f'<div class="card{wide}"><h3>{_e(title)}</h3><table class="kv">'
                     + _rows(rows)
                     + "</table></div>")
    return '<div class="grid">' + "".join(cards) + "</div>"


def effect_size(result: Mapping) -> dict | None:
    """The worst case's effect in counts a person can read, from result.json's numbers.

    In T when d0 is one of the curve radii (the worst case's curve and the reference
    median at d0: an independent sample, so not inflated by the selection in S); else in S
    from worst_case.count_d0 (no typical count there). None when the numbers are missing.
    """
    d0, radii = result.get("d0"), result.get("radii") or []
    curves, sizes, wc = result.get("curves") or {}, result.get("sizes") or {}, result.get("worst_case") or {}
    try:
        i = next((j for j, r in enumerate(radii) if math.isclose(float(r), float(d0), abs_tol=1e-12)), None)
        if i is not None and curves.get("obs") and curves.get("ref_median") and sizes.get("T"):
            n_w, n_t = float(curves["obs"][0][i]), float(sizes["T"])
            typ = _finite_or_none(curves["ref_median"][i])
            q = len(result.get("r_ref") or [])
            return {"set": "T", "n": int(n_t), "count": n_w, "fraction": n_w / n_t,
                    "typical_count": typ, "typical_fraction": None if typ is None else typ / n_t,
                    "ratio": None if not typ else n_w / typ, "typical_anchors": q, "d0": float(d0)}
        if wc.get("count_d0") is not None and sizes.get("S", 0) > 1:
            n = int(sizes["S"]) - 1
            return {"set": "S", "n": n, "count": float(wc["count_d0"]), "fraction": wc["count_d0"] / n,
                    "typical_count": None, "typical_fraction": None, "ratio": None, "typical_anchors": 0,
                    "d0": float(d0)}
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return None


def _pct(f: float) -> str:
    return f"{100 * f:.2g}%" if f < 0.1 else f"{100 * f:.1f}%"


def effect_sentence(result: Mapping) -> str:
    """One sentence in plain words (HTML): what share of the samples crowd around the worst case."""
    e = effect_size(result)
    if e is None:
        return ""
    wc = (result.get("worst_case") or {}).get("s_index")
    s = (f"<b>{_pct(e['fraction'])}</b> of the {e['n']:,} samples of {e['set']} lie within "
         f"d0 = {e['d0']:g} of one sample (the worst case, S row {_fmt_int(wc)})")
    if e["ratio"] is not None:
        s += (f": <b>{e['ratio']:.3g} times</b> as many as around a typical sample "
              f"({_pct(e['typical_fraction'])}, the median of {e['typical_anchors']:,} random anchors).")
    elif e["typical_count"] == 0:
        s += f", while a typical sample (the median of {e['typical_anchors']:,} random anchors) has none that close."
    else:
        s += "."
    return s


def _run_meta(result: Mapping) -> str:
    """Provenance for the header: when, where, which model files (sha256)."""
    info = result.get("run_info") or {}
    parts = []
    if info.get("finished_at"):
        parts.append(f"finished {_e(info['finished_at'])}")
    if info.get("host"):
        parts.append(f"on {_e(info['host'])}")
    for role in ("generator", "descriptor"):
        sha = (info.get("model_sha256") or {}).get(role)
        if sha:
            parts.append(f'{role} file sha256 <code title="{_e(sha)}">{_e(sha[:16])}…</code>')
    if info and not any((info.get("model_sha256") or {}).values()):
        parts.append("no model file (built-in model or embedding files)")
    return " · ".join(parts)


CAL_START, CAL_END = "<!--modeaudit:calibrations-->", "<!--/modeaudit:calibrations-->"


def calibration_links_html(out_dir) -> str:
    """Links from an audit report to its calibration reports (relative), or how to make one.

    Also, for the re-audit of a calibrated sampler (DIR/calibration/<method>/audit), the link back
    to that calibration's report.
    """
    out = pathlib.Path(out_dir)
    items = []
    if out.name == "audit" and out.parent.parent.name == CALIBRATION:
        if (out.parent / "report.html").exists():
            items.append(f'<p>This audit is the re-audit of a calibrated sampler: see the '
                         f'<a href="../report.html">calibration report ({_e(out.parent.name)})</a> '
                         f'and the <a href="../../../report.html">audit before calibration</a>.</p>')
    cal = out / CALIBRATION
    found = sorted(p.parent.name for p in cal.glob("*/calibration.json")) if cal.is_dir() else []
    for m in found:
        items.append(f'<p>Calibration <b>{_e(m)}</b>: <a href="{CALIBRATION}/{_e(m)}/report.html">calibration '
                     f'report (before and after)</a> · <a href="{CALIBRATION}/{_e(m)}/audit/report.html">audit of '
                     f'the calibrated sampler</a></p>')
    if not items:
        items.append('<p class="muted">No calibration of this run yet. <code>modeaudit calibrate --run DIR</code> '
                     "reshapes the latent sampler and audits it again; its report is linked here.</p>")
    return CAL_START + "".join(items) + CAL_END


def refresh_calibration_links(out_dir) -> None:
    """Rewrite the calibration links of DIR/report.html in place (atomically), e.g. after a calibration."""
    report = RunLayout(out_dir).report_html
    if not report.is_file():
        return
    page = report.read_text("utf-8")
    a, b = page.find(CAL_START), page.find(CAL_END)
    if a < 0 or b < a:
        return  # a report from an older version: leave it as it is
    atomic_write_bytes(report, (page[:a] + calibration_links_html(out_dir) + page[b + len(CAL_END):]).encode())


_CSS = """
:root{--fg:#1d2330;--muted:#6b7280;--line:#e3e6ec;--bg:#f6f7f9;--card:#fff;
--bad:#b42318;--badbg:#fee4e2;--ok:#067647;--okbg:#dcfae6;--warn:#93370d;--warnbg:#fef0c7}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px}
header.top{display:flex;justify-content:space-between;align-items:baseline;gap:16px;flex-wrap:wrap}
header.top h1{font-size:20px;margin:0}
header.top .meta{color:var(--muted);font-size:13px}
h2{font-size:17px;margin:28px 0 10px}
h3{font-size:14px;margin:0 0 8px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
code{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef0f4;
padding:1px 5px;border-radius:4px;word-break:break-all}
.verdict{border-radius:10px;padding:16px 20px;margin:16px 0 14px;border:1px solid}
.verdict .head{font-size:24px;font-weight:700}
.verdict .sub{margin-top:4px}
.verdict.bad{background:var(--badbg);border-color:#fda29b;color:var(--bad)}
.verdict.ok{background:var(--okbg);border-color:#75e0a7;color:var(--ok)}
.verdict.warn{background:var(--warnbg);border-color:#fec84b;color:var(--warn)}
.verdict.none{background:#eef0f4;border-color:var(--line)}
.verdict .sub code{background:rgba(255,255,255,.6)}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;min-width:0}
.two{display:grid;grid-template-columns:3fr 2fr;gap:14px;align-items:start}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;vertical-align:top;padding:5px 8px;border-bottom:1px solid var(--line);overflow-wrap:anywhere}
table.kv{table-layout:fixed}
.card.wide{grid-column:1/-1}
.card.wide table.kv th{width:20%}
table.sub th{white-space:nowrap}
tr:last-child>th,tr:last-child>td{border-bottom:0}
table.kv th{font-weight:500;color:var(--muted);width:46%}
table.tests thead th{color:var(--muted);font-weight:500;font-size:13px}
.small{font-size:13px}
.note{font-size:12.5px;color:var(--muted);margin-top:3px;max-width:520px}
.muted{color:var(--muted)}
.badge{display:inline-block;font-size:12px;font-weight:600;padding:1px 8px;border-radius:999px;white-space:nowrap}
.badge.bad{background:var(--badbg);color:var(--bad)}
.badge.ok{background:var(--okbg);color:var(--ok)}
.badge.warn{background:var(--warnbg);color:var(--warn)}
figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px}
figure img{display:block;width:100%;height:auto}
figcaption{font-size:13px;color:var(--muted);padding:6px 6px 0}
.howto p{margin:6px 0}
.effect{font-size:16px;margin:0 0 14px;padding:12px 16px;background:var(--card);border:1px solid var(--line);
border-radius:10px}
.note-box{background:#eef0f4;border-radius:8px;padding:10px 14px;margin:0}
table.sub th,table.sub td{padding:1px 6px 1px 0;border:0;font-size:13px}
table.sub th{font-weight:500;color:var(--muted)}
.pictures{margin-bottom:16px}
.pictures figure{margin-bottom:12px}
.pictures figure img{width:auto;max-width:100%;margin:0 auto}
@media (max-width:900px){.two{grid-template-columns:1fr}}
"""


def _mccs_caption(result: Mapping) -> str:
    """Where this run's worst case sits in the MCCS histogram, in standard deviations of the population: a
    worst case several of them into the right tail indicates collapse around it, one inside it does not."""
    m = result.get("mccs") or {}
    try:
        worst, mean, std = float(m["worst_case"]), float(m["mean"]), float(m["std"])
    except (KeyError, TypeError, ValueError):
        return "The worst case is marked in red."
    if not (std > 0 and np.isfinite(worst) and np.isfinite(mean)):
        return f"The worst case (red) has MCCS {_fmt(worst)}; the population has no spread to compare it with."
    z = (worst - mean) / std
    where = ("far in the right tail" if z >= 3 else "in the right tail" if z >= 1.5 else "within the bulk")
    meaning = ("which indicates intra-mode collapse around it" if z >= 3 else
               "not far enough by itself to indicate collapse (the tests above decide)")
    return (f"The worst case (red) is {where}, {z:+.1f} standard deviations from the population mean, "
            f"{meaning}.")


def render_report_html(result: Mapping, *, curves_png_b64: str, mccs_png_b64: str,
                       extra_sections: Sequence[tuple[str, str]] = (), pictures_fragment: str | None = None,
                       calibrations_fragment: str = "") -> str:
    """Build the full HTML page from the result dict and two base64 PNGs.

    Every string taken from ``result`` is escaped. ``extra_sections`` are
    (title, html_fragment) pairs: the title is plain text (escaped), the fragment is
    trusted HTML inserted verbatim.
    """
    tests = result.get("tests") or {}
    cls, head, sub = _verdict(tests)
    source = result.get("source") or {}
    src_name = source.get("generator") or source.get("kind") or "unknown source"
    if source.get("kind") == "embeddings":
        src_name = f"embeddings {source.get('embeddings_t') or source.get('embeddings_s') or ''}".strip()
    settings = result.get("settings") or {}
    d0 = result.get("d0")
    theta = (result.get("mccs") or {}).get("theta", settings.get("theta"))

    extras = "".join(f"<section><h2>{_e(t)}</h2>{frag}</section>" for t, frag in extra_sections)
    effect = effect_sentence(result)
    meta = _run_meta(result)
    pictures = ("" if pictures_fragment is None else
                f'<section class="pictures"><h2>Pictures: the worst case, a random anchor and the densest '
                f'modes</h2>{pictures_fragment}</section>')
    calib = (f'<section id="calibration"><h2>Calibration</h2><div class="card">{calibrations_fragment}</div>'
             f'</section>' if calibrations_fragment else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>modeaudit report: {_e(src_name)}</title>
<style>{_CSS}</style></head>
<body><main>
<header class="top"><h1>modeaudit: intra-mode collapse audit</h1>
<div class="meta">source <code>{_e(src_name)}</code> · seed {_fmt(source.get("seed"))} ·
modeaudit {_e(result.get("modeaudit_version", "?"))}{('<br>' + meta) if meta else ''}</div></header>

<div class="verdict {cls}"><div class="head">{_e(head)}</div>
{f'<div class="sub">{sub}</div>' if sub else ''}</div>
{f'<p class="effect">{effect}</p>' if effect else ''}
{pictures}

<div class="two">
<div class="card"><h3>Tests</h3>{_tests_table(tests, len(result.get("radii") or [])) if tests else '<span class="muted">none</span>'}</div>
<div class="card"><h3>Worst-case dense mode</h3>{_worst_case_block(result)}</div>
</div>

<section><h2>Neighbour function curves</h2>
<figure><img alt="neighbour function curves of the worst-case dense mode against the reference band"
src="data:image/png;base64,{curves_png_b64}">
<figcaption>Red: the densest anchor of S (worst-case dense mode), counted against T. Blue band:
pointwise [alpha/2, 1&minus;alpha/2] quantiles of the random reference anchors at each radius;
dashed: their median; grey: individual reference anchors. A red curve far above the band means
that anchor has many more near-duplicates than a typical sample. Dotted line: d0, the radius
used to pick the worst case.</figcaption></figure></section>

<section><h2>MCCS distribution</h2>
<figure><img alt="histogram of MCCS over the anchor set A"
src="data:image/png;base64,{mccs_png_b64}">
<figcaption>MCCS of every anchor in A against the disjoint sample set C. {_mccs_caption(result)}</figcaption></figure></section>

<section><h2>Settings</h2>{_settings_block(result)}</section>

<section class="howto"><h2>How to read this</h2><div class="card">
<p><b>Distance.</b> Every sample is embedded as a unit vector f; the distance of two samples is
d(a, b) = arccos(&lt;f<sub>a</sub>, f<sub>b</sub>&gt;) / &pi;, in [0, 1]: 0 is the same point,
0.5 is orthogonal.</p>
<p><b>Neighbour function.</b> N(I, T, d) counts the samples of T within distance d of the anchor I.
The worst-case dense mode is the sample of S with the most neighbours in S within
d0 = {_fmt(d0)}; its curve over d is compared with the curves of random anchors (the reference band).</p>
<p><b>MCCS.</b> With s(a, b) = (exp(max(0, &theta; &minus; d(a, b))) &minus; 1) / (exp(&theta;) &minus; 1),
&theta; = {_fmt(theta)}, MCCS(I) = 1 / (1 &minus; log(mean<sub>c&isin;C</sub> s(I, c))), and 0 when that mean is 0.
It lies in [0, 1]; larger means more mass close to I. The population mean &plusmn; std over A
describes a typical sample.</p>
<p><b>Pictures.</b> The images are regenerated from the latents kept in the run store (the generator is
deterministic; no image is stored). Under each neighbour: its distance d to the anchor and d as a multiple of
d0, in red when within d0. A collapsed mode shows near-copies; a random anchor's neighbours look more varied.</p>
<p><b>Tests.</b> A test "rejects" when it finds the worst case denser than chance allows.
<code>paper</code> (worst-case curve outside the pointwise band) and <code>erl</code> (outside the global
envelope) compare a selected maximum with random anchors, so their error rate is not controlled.
<code>selection</code> (against worst cases of the same selection under a null) and
<code>two_sample</code> (dense balls against a reference set) control it; see docs/statistics.md.</p>
</div></section>
{extras}
{calib}
</main></body></html>
"""


# ----------------------------------------------------------------------------- writing

def write_report(out_dir, result: dict, *, obs_curves, ref_curves, mccs_values,
                 extra_sections=(), pictures=None) -> pathlib.Path:
    """Render ``out_dir/report.html`` and the plots under ``out_dir/plots/``.

    Parameters
    ----------
    out_dir : path-like. Created if missing.
    result : the audit result dict (the same content as result.json).
    obs_curves : int array (p, R), N(anchor, T, d) of the p densest anchors; row 0 is the
        worst case. p >= 1.
    ref_curves : int array (q, R) for the q random reference anchors.
    mccs_values : float array (|A|,), MCCS of every anchor in A.
    extra_sections : sequence of (title, html_fragment); fragments are inserted verbatim.
    pictures : the pictures stage's outcome (tasks/report/pictures.py: Pictures), or None
        for no pictures section. Its grids are embedded, or its reason is shown.

    Returns the path of report.html. The page is self-contained (figures embedded as
    base64 PNG); ``plots/neighbour_curves.png`` and ``plots/mccs_histogram.png`` hold the
    same images. Every file is written atomically (temp file + os.replace).
    """
    out = pathlib.Path(out_dir)
    plots = RunLayout(out).plots
    plots.mkdir(parents=True, exist_ok=True)

    curves_png = style.save_figure(neighbour_curves_figure(result, obs_curves, ref_curves), plots, "neighbour_curves")
    mccs_png = style.save_figure(mccs_histogram_figure(result, mccs_values), plots, "mccs_histogram")
    from modeaudit.tasks.report.pictures import pictures_html

    page = render_report_html(
        result,
        curves_png_b64=base64.b64encode(curves_png).decode("ascii"),
        mccs_png_b64=base64.b64encode(mccs_png).decode("ascii"),
        extra_sections=[(str(t), str(f)) for t, f in extra_sections],
        pictures_fragment=None if pictures is None else pictures_html(pictures, result),
        calibrations_fragment=calibration_links_html(out),
    )
    report = RunLayout(out).report_html
    atomic_write_bytes(report, page.encode("utf-8"))
    return report
