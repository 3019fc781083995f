"""Report sections for the statistics beyond the paper: the global envelope, the
selection-aware null, the deficit test's reference balls, the two-sample balls, the distinct modes, sampling
efficiency.

Each section is (title, html) for modeaudit.tasks.report.audit.write_report(extra_sections=...).
"""
from __future__ import annotations

import html

import numpy as np
from modeaudit.tasks.report.style import COLORS, figure_img, new_figure, style_axes


def _img(fig, alt: str, name: str) -> str:
    # Embedded as PNG; inside style.plots_to(DIR/plots) also saved as plots/<name>.png and .svg.
    return figure_img(fig, alt, name)


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="tests"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _f(x, nd=4):
    if x is None:
        return "inf"
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def _log(v):
    return np.log10(np.maximum(np.asarray(v, np.float64), 1))


def envelope_section(result) -> tuple[str, str] | None:
    """The worst-case curve against the 1-alpha global (ERL) envelope of the reference anchors."""
    erl = result["tests"].get("erl")
    if not erl:
        return None
    r = np.asarray(result["radii"])
    fig = new_figure(7.5, 3.6, "Worst-case curve against the global (ERL) envelope of the reference anchors")
    ax = fig.add_subplot()
    style_axes(ax)
    hi = np.array([np.nan if v is None else v for v in erl["envelope_high"]], np.float64)
    ax.fill_between(r, 0, _log(hi), color="#c6dbef", label=f"{1 - erl['alpha']:.0%} global envelope (ERL)")
    ax.plot(r, _log(result["curves"]["ref_high"]), "--", color="#6baed6", lw=1, label="pointwise band top")
    obs = np.asarray(result["curves"]["obs"][0], np.float64)
    ax.plot(r, _log(obs), color="#cb181d", lw=2, label="worst-case curve")
    # Where the curve leaves the envelope: on a log axis a 5% excess is a hair's breadth, so mark those radii.
    above = np.isfinite(hi) & (obs > hi)
    if above.any():
        ax.plot(r[above], _log(obs[above]), "o", ms=5, mfc="none", mec="#67000d", mew=1.2,
                label=f"above the envelope ({int(above.sum())} radii)")
    ax.set_xlabel("radius d")
    ax.set_ylabel("log10(max(N(anchor, T, d), 1))")
    ax.legend(fontsize=8, loc="lower right")    # over the envelope's fill, not over the curves at small d
    excess = ""
    if above.any():
        ratio = obs[above] / np.maximum(hi[above], 1)
        j = int(np.argmax(ratio))
        excess = (f"The worst-case curve is above the envelope at {int(above.sum())} of {len(r)} radii "
                  f"(d = {r[above].min():.3g} to {r[above].max():.3g}); at most {ratio[j]:.3g}x its top "
                  f"(d = {r[above][j]:.3g}: {obs[above][j]:,.0f} against {hi[above][j]:,.0f}). ")
    elif np.isfinite(hi).any():
        excess = "The worst-case curve stays inside the envelope at every radius. "
    text = (f"<p>{excess}ERL p-value interval [{_f(erl['p_low'])}, {_f(erl['p_high'])}] with {erl['n_ref']} reference "
            "curves; the test decides on the conservative end. The envelope holds across all radii at once, unlike "
            "the pointwise band, but the worst case is still a selected maximum, so a rejection here is not by "
            "itself evidence of collapse: see the selection-aware test.</p>")
    return "Global envelope test (ERL)", _img(fig, "global envelope", "erl_envelope") + text


def _contrast_panel(ax, null_z, obs_z: float, p: float) -> None:
    """The contrast statistic: the permutation replicates' z as a histogram, the observed split's as a line."""
    style_axes(ax, grid="y")
    z = np.asarray(null_z, np.float64)
    lo, hi = float(min(z.min(), obs_z)), float(max(z.max(), obs_z))
    bins = np.linspace(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9), 21)
    ax.hist(z, bins=bins, color="#c7e9c0", edgecolor="#238b45", lw=0.6, label=f"{z.size} permutations")
    ax.axvline(obs_z, color="#cb181d", lw=2, label=f"observed (p = {_f(p)})")
    ax.set_xlabel("contrast z: the top modes'\nexcess in T over the reference")
    ax.set_ylabel("replicates")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.35)    # headroom: the legend sits above the bars
    ax.legend(fontsize=8, loc="upper center")


def selection_section(result) -> tuple[str, str] | None:
    """The re-selected worst case (as a fraction of T) against the null's worst cases."""
    sel = result["tests"].get("selection")
    if not sel:
        return None
    r = np.asarray(result["radii"])
    null_z = sel.get("contrast_null_z")
    fig = new_figure(10.0 if null_z else 7.5, 3.6,
                     "Selection-aware test: the observed worst case against worst cases under the null")
    if null_z:
        ax, az = fig.subplots(1, 2, width_ratios=[3, 1.3])
        _contrast_panel(az, null_z, sel["contrast_z"], sel["p_contrast"])
    else:
        ax = fig.add_subplot()
    style_axes(ax)
    hi = np.array([np.nan if v is None else v for v in sel["envelope_high"]], np.float64)
    if "obs_excess" not in sel:
        ax.fill_between(r, 0, hi, color="#c7e9c0", label=f"{1 - sel['alpha']:.0%} global envelope of null worst cases")
    ax.plot(r, sel["null_median"], "--", color="#238b45", lw=1, label="null worst case, median")
    if "obs_excess" in sel:
        # Surrogate null: curves are standardised excesses over the refitted model's prediction (0 = as predicted).
        # One-sided envelope: only its top matters; shade a strip below it so the line reads as a bound.
        span = max(1.0, float(np.nanmax(hi) - np.nanmin(np.r_[sel["null_median"], 0.0])))
        ax.fill_between(r, np.nanmin(np.r_[sel["null_median"], 0.0]) - 0.5 * span, hi, color="#c7e9c0",
                        label=f"{1 - sel['alpha']:.0%} global envelope of null worst cases (upper bound)")
        ax.plot(r, sel["obs_excess"], color="#cb181d", lw=2, label="observed worst case")
        ax.axhline(0, color="#888", lw=0.8)
        ax.set_ylabel("excess over surrogate (Poisson sds)")
    else:
        ax.plot(r, sel["obs_curve_fraction"], color="#cb181d", lw=2, label="observed worst case")
        ax.set_yscale("log")
        ax.set_ylabel("fraction of T within d")
    ax.set_xlabel("radius d")
    ax.legend(fontsize=8, loc="lower right")
    text = (f"<p><b>Null:</b> {html.escape(sel['null'])}.<br>The worst case was re-selected on the first "
            f"{sel['null_m']:,} rows of S and counted in {sel['null_T']:,} rows of T; each of the "
            f"{sel['replicates']} null replicates did the same on a draw from the null. p = {_f(sel['p'])} "
            f"(interval [{_f(sel['p_low'])}, {_f(sel['p_high'])}]): {'reject' if sel['reject'] else 'no reject'} "
            f"at alpha = {sel['alpha']}.</p>")
    if "p_contrast" in sel:
        text += (f"<p>Each split is also scored by its top {len(sel['contrast_modes'])} distinct modes "
                 "(chosen on its S): "
                 f"the largest excess of a ball's count in T over its count in the reference rows (conditional "
                 f"binomial z; observed {_f(sel['contrast_z'])}). The two statistics are combined by min-p over the "
                 f"same splits: p = {_f(sel['p'])} (curve alone {_f(sel['p_curve'])}, contrast alone "
                 f"{_f(sel['p_contrast'])}). The contrast is there for a collapsed mode that is not the worst "
                 "case (a larger natural mode is).</p>")
    if "obs_excess" in sel:
        fit = [[k.replace("_", " "), _f(v) if isinstance(v, float) else v]
               for k, v in (sel.get("surrogate_fit") or {}).items()]
        text += ("<p>Against a surrogate each curve (observed and null alike) is compared with what a projected "
                 "normal refitted to <i>its own</i> S predicts for the selected anchor (in Poisson standard "
                 "deviations), so the estimation error of the fit cancels. The fit:</p>"
                 + (_table(["surrogate parameter", "value"], fit) if fit else ""))
    return "Selection-aware test", _img(fig, "selection test", "selection_test") + text


def modes_section(result) -> tuple[str, str] | None:
    """Top distinct dense modes, with their two-sample results when a reference set was given."""
    modes = result.get("modes")
    if not modes:
        return None
    ts = {b["s_index"]: b for b in result["tests"].get("two_sample") or []}
    header = ["S index", "N(I, S, d0)"] + (["planted"] if "planted" in modes[0] else [])
    if ts:
        header += ["in T", "in reference", "mass ratio", "CI", "p (Holm)", "reject"]
    rows = []
    for m in modes:
        row = [m["s_index"], m["count_d0"]] + ([m["planted"]] if "planted" in m else [])
        b = ts.get(m["s_index"])
        if b:
            row += [b["x_t"], b["x_r"], _f(b["ratio"]), f"[{_f(b['ci'][0])}, {_f(b['ci'][1])}]", _f(b["p_adj"]),
                    b["reject"]]
        rows.append(row)
    text = ("<p>The densest anchors of S with no two within d0 of each other (the raw top anchors are usually "
            "one identity)." + (" Mass ratio = (share of T in the ball) / (share of the reference set in it)."
                                if ts else "") + "</p>")
    return "Distinct dense modes" + (" and two-sample test" if ts else ""), text + _table(header, rows)


def deficit_section(result) -> tuple[str, str] | None:
    """The deficit test's reference balls: counts in T and in the held-out reference rows, ratio, CI, Holm p."""
    d = result["tests"].get("deficit")
    if not d:
        return None
    if "balls" not in d:
        return "Deficit test (missing mass)", f"<p class=\"note\">Not run: {html.escape(str(d.get('skipped', '')))}</p>"
    rows = [[b["ref_index"], b["count_select"], b["x_t"], b["x_r"], _f(b["ratio"]),
             f"[{_f(b['ci'][0])}, {_f(b['ci'][1])}]", _f(b["p_adj"]), b["reject"]] for b in d["balls"]]
    text = (f"<p>Balls of radius d0 = {_f(d['radius'])} centred on the {d['n_balls']} densest distinct rows of the "
            f"first {d['reference_rows_select']:,} reference rows, counted in T ({d['T_rows']:,} rows) and in the other "
            f"{d['reference_rows_counted']:,} reference rows. A rejected ball holds less of the model's mass than of the "
            "reference's (mass ratio below 1): a mode the model drops or starves, which the tests centred on generated "
            f"samples cannot see. {d['rejected_balls']} of {d['n_balls']} rejected (one-sided, Holm, "
            f"alpha = {_f(d['alpha'])}); the CI is per ball and two-sided.</p>")
    header = ["reference row", "N(row, selection rows, d0)", "in T", "in held-out reference", "mass ratio", "CI",
              "p (Holm)", "reject"]
    return "Deficit test (missing mass)", text + _table(header, rows)


def efficiency_section(result) -> tuple[str, str] | None:
    """MCCS as |C| and |A| grow; the worst case as |S| grows."""
    e = result.get("sampling_efficiency")
    if not e:
        return None
    fig = new_figure(10, 3.5, "Sampling efficiency: MCCS as |C| and |A| grow")
    a1, a2, a3 = fig.subplots(1, 3)
    for ax in (a1, a2, a3):
        style_axes(ax)
    a1.set_title("worst case and a random anchor")
    a2.set_title("population over A, vs |C|")
    a3.set_title("population over A, vs |A|")
    a1.plot(e["C_sizes"], e["mccs_worst_vs_C"], "o-", color=COLORS["worst"], label="worst case")
    a1.plot(e["C_sizes"], e["mccs_random_vs_C"], "o-", color="#636363", label="random anchor")
    a1.set_xscale("log"), a1.set_xlabel("|C|"), a1.set_ylabel("MCCS"), a1.legend(fontsize=8)
    for ax, x, mu, sd, lab in ((a2, e["C_sizes"], e["mccs_mean_vs_C"], e["mccs_std_vs_C"], f"|C| (|A| = {e['A_for_C_curve']})"),
                               (a3, e["A_sizes"], e["mccs_mean_vs_A"], e["mccs_std_vs_A"], "|A|")):
        mu, sd = np.asarray(mu), np.asarray(sd)
        ax.plot(x, mu, "o-", color="#08519c")
        ax.fill_between(x, mu - sd, mu + sd, color="#9ecae1", alpha=0.6)
        ax.set_xscale("log"), ax.set_xlabel(lab), ax.set_ylabel("MCCS mean ± std")
    rows = [[w["S_size"], w["s_index"], _f(w["distance_to_final"], 3), w["same_identity"]]
            + ([w["planted"]] if "planted" in w else []) for w in e["worst_case_vs_S"]]
    header = ["|S|", "worst case (S index)", "distance to final worst case", "same identity (<= d0)"]
    if e["worst_case_vs_S"] and "planted" in e["worst_case_vs_S"][0]:
        header.append("planted")
    return "Sampling efficiency", _img(fig, "sampling efficiency", "sampling_efficiency") + _table(header, rows)


def diversity_section(result) -> tuple[str, str] | None:
    """The peers' metrics of T against the reference set (precision/recall, density/coverage, KID, support)."""
    d = result.get("diversity")
    if not d or "metrics" not in d:
        return None
    m = d["metrics"]
    rows = [[html.escape(k), _f(m.get(k))] for k in ("precision", "recall", "density", "coverage", "kid")]
    rows.append(["support size (birthday)", "—" if m.get("support_size") is None else f"{m['support_size']:.3g}"])
    note = (f"<p class=\"note\">T against the reference set, first {d['rows_T']:,} and {d['rows_reference']:,} rows, "
            "k = 5, Euclidean on the unit embeddings (as prdc and torch-fidelity compute them); formulas and "
            "sources: docs/metrics.md. These describe fidelity and coverage; they are not collapse tests.</p>")
    return "Diversity metrics", note + _table(["metric", "value"], rows)


def stats_sections(result) -> list[tuple[str, str]]:
    """Every section that applies to this result: each run test's own (from the registry), then modes and efficiency."""
    from modeaudit.tasks.stats.registry import STAT_TESTS
    out = [STAT_TESTS[n].report_section(result) for n in result.get("tests", {}) if n in STAT_TESTS]
    out += [f(result) for f in (modes_section, diversity_section, efficiency_section)]
    return [s for s in out if s]
