"""Before/after report of a calibration: DIR/calibration/<method>/report.html.

Same look as the audit report (its CSS, header and figure style): the verdicts and
MCCS before and after, the curves of the old and new worst cases, the MCCS
distributions, and the pictures of the audit and of the re-audit side by side
(read from each run's plots/, regenerated there from stored latents). Links both ways:
this page links to the audit before and the re-audit after; flows/calibrate.py then
refreshes those two reports' links to this page.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from modeaudit.storage.layout import PICTURES, REPORT_HTML, RunLayout, atomic_write_text
from modeaudit.tasks.report import style
from modeaudit.tasks.report.audit import _CSS

_PICTURE_TITLES = {"neighbours_worst": "The worst-case dense mode and its nearest neighbours in T",
                   "neighbours_random": "A random anchor and its nearest neighbours in T",
                   "modes": "The top distinct dense modes"}

_EXTRA_CSS = """
.pair{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:12px;align-items:start}
.pair>div{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:8px;min-width:0}
.pair img,figure img{display:block;width:100%;height:auto}
.pair h4{margin:0 0 4px;font-size:13px;color:var(--muted);font-weight:600}
.headline{font-size:18px;margin:4px 0}
.ok-text{color:var(--ok)}.bad-text{color:var(--bad)}
@media (max-width:900px){.pair{grid-template-columns:1fr}}
"""


def _log(v):
    return np.log10(np.maximum(np.asarray(v, np.float64), 1))


def _curves_fig(cal, before, after):
    r, c = np.asarray(cal["radii"]), cal["curves"]
    fig = style.new_figure(11, 4.0, "Neighbour function of the old worst case I_w and the new one I'_w, in T "
                                    "(before) and T' (after calibration)")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    for ax, res, title in ((ax1, before, "in T, the model before"), (ax2, after, "in T', the calibrated sampler")):
        style.style_axes(ax)
        ax.fill_between(r, _log(res["curves"]["ref_low"]), _log(res["curves"]["ref_high"]),
                        color=style.COLORS["band"], alpha=0.6, lw=0, label="reference band")
        ax.set_title(title)
        ax.set_xlabel("radius d")
    ax1.plot(r, _log(c["worst_before_in_T"]), color=style.COLORS["worst"], lw=2, label="I_w (worst before)")
    ax1.plot(r, _log(c["worst_after_in_T"]), color=style.COLORS["after"], lw=1.5, ls="--", label="I'_w (worst after)")
    ax2.plot(r, _log(c["worst_before_in_T_after"]), color=style.COLORS["worst"], lw=2, ls="--", label="I_w")
    ax2.plot(r, _log(c["worst_after_in_T_after"]), color=style.COLORS["after"], lw=1.5, label="I'_w")
    ax1.set_ylabel("log10(max(N(anchor, T, d), 1))")
    for ax in (ax1, ax2):
        ax.legend(fontsize=style.LEGEND_SIZE - 1, loc="upper left", frameon=False)
    return fig


def _box_fig(cal, a_before, a_after):
    # The width of the page's other figures (11 in): drawn narrower, it was scaled up, fonts and all.
    fig = style.new_figure(11, 3.9, "MCCS over the anchors A, before and after calibration")
    ax = fig.add_subplot()
    style.style_axes(ax, grid="y")
    ax.boxplot([a_before, a_after], showfliers=False)
    ax.set_xticks([1, 2], ["before (model M)", "after (calibrated M')"])
    ax.scatter([1], [cal["mccs_worst_before"]], color=style.COLORS["worst"], zorder=3, label="MCCS(I_w) before")
    ax.scatter([2], [cal["mccs_worst_after"]], color=style.COLORS["worst"], marker="x", zorder=3,
               label="MCCS(I_w) after")
    ax.scatter([2], [cal["mccs_new_worst_after"]], color=style.COLORS["after"], zorder=3, label="MCCS(I'_w)")
    ax.set_ylabel("MCCS over anchors A")
    ax.legend(fontsize=style.LEGEND_SIZE - 1, frameon=False)
    return fig


_LABELS = {"method": "method", "variant": "variant", "verdict_before": "verdict before",
           "verdict_after": "verdict after", "acceptance_rate": "acceptance rate of the sampler",
           "cost_per_accepted": "latent draws per accepted sample", "mccs_worst_before": "MCCS of I_w before",
           "mccs_worst_after": "MCCS of I_w after", "mccs_new_worst_after": "MCCS of the new worst case I'_w",
           "count_d0_worst_before": "neighbours of I_w in S within d0, before",
           "count_d0_new_worst_after": "neighbours of I'_w in S within d0, after",
           "fd_before_after": "Frechet distance before vs after (descriptor)"}


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _row(k, v):
    return f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>"


def _embed(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _audit_page(run_dir) -> str:
    """What to link for an audit: its report, or its result.json when it ran with --no-report."""
    lay = RunLayout(run_dir)
    return (lay.written_report or lay.result_json).name


def pictures_before_after(run_dir, after_dir, result_before: dict, rel_before: str, rel_after: str) -> str:
    """The audit's and the re-audit's picture grids side by side (from their plots/), or why there are none."""
    before, after = RunLayout(run_dir), RunLayout(after_dir)
    parts = []
    for name in PICTURES:
        b, a = before.plot(name), after.plot(name)
        if not (b.is_file() or a.is_file()):
            continue
        cells = []
        for label, path, rel in (("before: the audited model", b, rel_before), ("after: the calibrated sampler", a,
                                                                                 rel_after)):
            # Click for the full-size picture (the run's own plots/ file).
            body = (f'<a href="{rel}/plots/{name}.png">{_embed(path.read_bytes(), f"{name} {label}")}</a>'
                    if path.is_file() else '<p class="muted">not drawn for this run (see its report)</p>')
            cells.append(f'<div><h4>{html.escape(label)} (<a href="{rel}/report.html">report</a>)</h4>{body}</div>')
        parts.append(f"<h3>{html.escape(_PICTURE_TITLES[name])}</h3><div class=\"pair\">{''.join(cells)}</div>")
    if parts:
        return "".join(parts)
    from modeaudit.tasks.report.pictures import no_images_reason
    why = no_images_reason(result_before) or ""
    if not why and (result_before.get("source") or {}).get("kind") == "generator":
        from modeaudit.tasks.models.generators import build_generator
        try:
            src = result_before["source"]
            why = no_images_reason(result_before, build_generator(src["generator"], src.get("generator_options")))
        except Exception:  # noqa: BLE001 - only the sentence depends on it
            why = None
    return (f'<p class="note-box">{html.escape(why or "Pictures are unavailable for these runs: see their reports.")}'
            "</p>")


def _had_reference(result: dict) -> bool:
    src = result.get("source") or {}
    return bool(src.get("reference") or src.get("reference_generator"))


def write_calibration_report(out_dir, cal: dict, before: dict, after: dict, mccs_a_before, mccs_a_after, *,
                             run_dir=None, after_dir=None) -> Path:
    """Render the before/after page (atomic write) and return its path.

    run_dir: the audited run (default: two folders up from out_dir, DIR/calibration/<method>);
    after_dir: the re-audit (default out_dir/audit). Figures are also saved under out_dir/plots/.
    """
    out = Path(out_dir)
    run_dir = Path(run_dir) if run_dir is not None else out.parent.parent
    after_dir = Path(after_dir) if after_dir is not None else RunLayout(run_dir).calibration_audit(out.name)
    rel_before, rel_after = "../..", "audit"
    plots = RunLayout(out).plots       # DIR/calibration/<method>/plots
    dropped = cal["mccs_worst_after"] < cal["mccs_worst_before"]
    head = (f'<p class="headline {"ok-text" if dropped else "bad-text"}"><b>MCCS of the worst-case mode I_w: '
            f'{cal["mccs_worst_before"]:.4f} before, {cal["mccs_worst_after"]:.4f} after</b> '
            f'(new worst case I\'_w: {cal["mccs_new_worst_after"]:.4f}).</p>')
    if cal.get("verdict_before") or cal.get("verdict_after"):
        # Same tests, same reference (flows/calibrate.py): the headlines are comparable.
        head += (f'<p><b>Verdict: {html.escape(str(cal.get("verdict_before")))} &rarr; '
                 f'{html.escape(str(cal.get("verdict_after")))}</b> '
                 f'<span class="muted">(before &rarr; after; the re-audit ran the audit\'s tests'
                 f'{" against its reference" if _had_reference(before) else ""})</span></p>')
    rows = [_row(_LABELS[k], cal[k]) for k in _LABELS if k in cal]
    rows += [_row(f"MCCS over A {k} (mean ± std)", f"{v['mean']:.4f} ± {v['std']:.4f}")
             for k, v in (("before", cal["mccs_population_before"]), ("after", cal["mccs_population_after"]))]
    bo = cal["band_overlap"]
    rows.append(_row("reference bands overlap", f"at {bo['radii_overlapping']} of {bo['radii']} radii "
                                                f"(mean IoU {bo['mean_iou']:.3f})"))
    rows += [_row(k.replace("_", " "), v) for k, v in cal.get("truth", {}).items()]
    curves_png = style.save_figure(_curves_fig(cal, before, after), plots, "calibration_curves")
    box_png = style.save_figure(_box_fig(cal, mccs_a_before, mccs_a_after), plots, "calibration_mccs")
    grids = pictures_before_after(run_dir, after_dir, before, rel_before, rel_after)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>modeaudit calibration: {html.escape(cal['method'])}</title>
<style>{_CSS}{_EXTRA_CSS}</style></head><body><main>
<header class="top"><h1>modeaudit: calibration ({html.escape(cal['method'])}, {html.escape(cal['variant'])})</h1>
<div class="meta"><a href="{rel_before}/{_audit_page(run_dir)}">audit before</a> ·
<a href="{rel_after}/report.html">audit of the calibrated sampler</a></div></header>
<div class="card">{head}<table class="kv">{''.join(rows)}</table>
<p class="note">{html.escape(cal['fd_kind'])}. The calibrated sampler is the generator
<code>{html.escape(cal['generator'])}</code>.</p></div>
<section><h2>Pictures before and after</h2>{grids}</section>
<section><h2>Curves of the old and new worst cases in T and T' (seed 000, Figs. 4-5)</h2>
<figure>{_embed(curves_png, "curves")}<figcaption>Red: the worst case before calibration; blue: the worst case
after. Blue band: the reference band of each audit.</figcaption></figure></section>
<section><h2>MCCS before and after (seed 001, Figs. 5-6)</h2>
<figure>{_embed(box_png, "mccs")}<figcaption>Boxes: MCCS over the anchors A of each audit; dots: the worst
cases.</figcaption></figure></section>
</main></body></html>"""
    return atomic_write_text(out / REPORT_HTML, page)
