"""Before/after report of a calibration: DIR/calibration/<method>/report.html."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from modeaudit.storage.layout import REPORT_HTML, atomic_write_text
from modeaudit.tasks.report.audit import figure_to_base64_png

_CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;background:#f7f7f9}
section{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px 18px;margin:14px 0}
h1{font-size:22px}h2{font-size:17px;margin-top:0}table{border-collapse:collapse;font-size:14px}
td,th{padding:4px 10px;border-bottom:1px solid #eee;text-align:left}.ok{color:#1a7f37}.bad{color:#b42318}
.note{color:#666;font-size:13px}"""


def _log(v):
    return np.log10(np.maximum(np.asarray(v, np.float64), 1))


def _curves_fig(cal, before, after) -> Figure:
    r, c = np.asarray(cal["radii"]), cal["curves"]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    for ax, res, title in ((ax1, before, "T (before)"), (ax2, after, "T' (after)")):
        ax.fill_between(r, _log(res["curves"]["ref_low"]), _log(res["curves"]["ref_high"]), color="#c6dbef",
                        label="reference band")
        ax.set_title(title)
        ax.set_xlabel("radius d")
    ax1.plot(r, _log(c["worst_before_in_T"]), color="#cb181d", lw=2, label="I_w (worst before)")
    ax1.plot(r, _log(c["worst_after_in_T"]), color="#2171b5", lw=1.5, ls="--", label="I'_w (worst after)")
    ax2.plot(r, _log(c["worst_before_in_T_after"]), color="#cb181d", lw=2, ls="--", label="I_w")
    ax2.plot(r, _log(c["worst_after_in_T_after"]), color="#2171b5", lw=1.5, label="I'_w")
    ax1.set_ylabel("log10(max(N, 1))")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8, loc="upper left")
    return fig


def _box_fig(cal, a_before, a_after) -> Figure:
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot([a_before, a_after], showfliers=False)
    ax.set_xticks([1, 2], ["before (M)", "after (M')"])
    ax.scatter([1], [cal["mccs_worst_before"]], color="#cb181d", zorder=3, label="MCCS(I_w) before")
    ax.scatter([2], [cal["mccs_worst_after"]], color="#cb181d", marker="x", zorder=3, label="MCCS(I_w) after")
    ax.scatter([2], [cal["mccs_new_worst_after"]], color="#2171b5", zorder=3, label="MCCS(I'_w)")
    ax.set_ylabel("MCCS over anchors A")
    ax.legend(fontsize=8)
    return fig


def _img(fig, alt):
    return f'<img alt="{html.escape(alt)}" style="max-width:100%" src="data:image/png;base64,{figure_to_base64_png(fig)}">'


def _row(k, v):
    if isinstance(v, float):
        v = f"{v:.4g}"
    return f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"


def write_calibration_report(out_dir, cal: dict, before: dict, after: dict, mccs_a_before, mccs_a_after) -> Path:
    """Render the before/after page (atomic write) and return its path."""
    out = Path(out_dir)
    dropped = cal["mccs_worst_after"] < cal["mccs_worst_before"]
    head = (f'<p class="{"ok" if dropped else "bad"}"><b>MCCS of the worst-case mode I_w: '
            f'{cal["mccs_worst_before"]:.4f} before, {cal["mccs_worst_after"]:.4f} after</b> '
            f'(new worst case I\'_w: {cal["mccs_new_worst_after"]:.4f}).</p>')
    if cal.get("verdict_before") or cal.get("verdict_after"):
        # Same tests, same reference (flows/calibrate.py): the headlines are comparable.
        head += (f'<p><b>Verdict: {html.escape(str(cal.get("verdict_before")))} &rarr; '
                 f'{html.escape(str(cal.get("verdict_after")))}</b> '
                 f'<span class="note">(before &rarr; after; the re-audit ran the audit\'s tests against '
                 f'its reference)</span></p>')
    rows = [_row(k, cal[k]) for k in ("method", "variant", "verdict_before", "verdict_after", "acceptance_rate",
                                      "cost_per_accepted",
                                      "mccs_worst_before", "mccs_worst_after", "mccs_new_worst_after",
                                      "count_d0_worst_before", "count_d0_new_worst_after", "fd_before_after")]
    rows += [_row(f"MCCS population {k}", f"{v['mean']:.4f} ± {v['std']:.4f}")
             for k, v in (("before", cal["mccs_population_before"]), ("after", cal["mccs_population_after"]))]
    rows += [_row(f"reference bands: {k}", v) for k, v in cal["band_overlap"].items()]
    rows += [_row(f"truth: {k}", v) for k, v in cal.get("truth", {}).items()]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>modeaudit calibration</title>
<style>{_CSS}</style></head><body><h1>Calibration: {html.escape(cal['method'])} ({html.escape(cal['variant'])})</h1>
<section>{head}<table>{''.join(rows)}</table>
<p class="note">{html.escape(cal['fd_kind'])}. The calibrated sampler is the generator
<code>{html.escape(cal['generator'])}</code>; its audit is in {html.escape(cal['audit_after'])}.</p></section>
<section><h2>Curves of the old and new worst cases in T and T' (seed 000, Figs. 4-5)</h2>{_img(_curves_fig(cal, before, after), "curves")}</section>
<section><h2>MCCS before and after (seed 001, Figs. 5-6)</h2>{_img(_box_fig(cal, mccs_a_before, mccs_a_after), "mccs")}</section>
</body></html>"""
    return atomic_write_text(Path(out) / REPORT_HTML, page)
