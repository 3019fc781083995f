"""The statistical tests an audit can run: one registration each.

A test is a name, whether its error rate (for "is there collapse?") is controlled,
whether it needs a reference set, when it runs by default, how it runs (a function of
the audit's TestContext returning its result.json entry), its one-line note in the
report, and optionally its report section ("module:function", loaded when the report
is drawn). Adding a test is one module with its statistic plus one `register` call
here; the flow, the CLI's --tests, the verdict and the report read this registry.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from modeaudit.tasks.registry import ConfigError


@dataclass
class TestContext:
    """What a test may use: the settings, the cluster, the sets and what the paper's stages computed."""
    cfg: Any
    client: Any
    S_rows: Any          # S as rows in memory (float32/float16), unit length
    T: Any               # T as a Source
    ref: Any             # the reference set as a Source, or None
    counts: Any          # N(I, S minus I, d0) for every row of S
    curves: Any          # (p + q, R) curves: the p densest anchors first, then the q random ones
    modes: Any           # indices into S of the top distinct dense modes
    result: dict         # result.json as assembled so far (the paper's test is in result["tests"]["paper"])


@dataclass(frozen=True)
class StatTest:
    """One registered test (see the module docstring)."""
    name: str
    controlled: bool
    needs_reference: bool
    note: str
    run: Callable[[TestContext], Any]
    default_when: Callable[[Any], bool] = lambda cfg: True
    section: str | None = None

    def report_section(self, result: dict):
        """(title, html) of this test's report section, or None."""
        if not self.section:
            return None
        mod, _, fn = self.section.partition(":")
        return getattr(importlib.import_module(mod), fn)(result)


STAT_TESTS: dict[str, StatTest] = {}


def register(test: StatTest) -> StatTest:
    """Add a test (names are unique)."""
    if test.name in STAT_TESTS:
        raise RuntimeError(f"statistical test {test.name!r} registered twice")
    STAT_TESTS[test.name] = test
    return test


def has_reference(cfg) -> bool:
    """A reference set or a reference generator was given."""
    return bool(cfg.reference or cfg.reference_generator)


def parse_tests(text) -> tuple:
    """Validated tuple of test names from 'paper,erl,...' (unknown names rejected with the list of known ones)."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    bad = [t for t in names if t not in STAT_TESTS]
    if bad or not names:
        raise ConfigError(f"unknown test {bad[0] if bad else '(none)'!r} in --tests; choose from: "
                          f"{', '.join(STAT_TESTS)}")
    return tuple(dict.fromkeys(names))


def default_tests(cfg) -> tuple:
    """The tests run when --tests is not given: every registered default that applies to cfg."""
    return tuple(t.name for t in STAT_TESTS.values()
                 if t.default_when(cfg) and (has_reference(cfg) or not t.needs_reference))


def uncontrolled() -> frozenset:
    """Names of the tests whose error rate is not controlled (their rejection alone is a hint)."""
    return frozenset(n for n, t in STAT_TESTS.items() if not t.controlled)


# --------------------------------------------------------------------------- the tests

def _paper(ctx: TestContext):
    return ctx.result["tests"]["paper"]     # computed with the curves (tasks/stats/paper.py)


def _erl(ctx: TestContext):
    from modeaudit.tasks.stats.steps import erl
    p = ctx.cfg.p
    return erl(ctx.curves[0], ctx.curves[p:], ctx.cfg.alpha)


def _selection(ctx: TestContext):
    from modeaudit.tasks.audit_steps import null_spec
    from modeaudit.tasks.stats.steps import selection
    c = ctx.cfg
    return selection(ctx.client, ctx.S_rows, ctx.T, m_sel=c.selection_m, n_t=c.selection_t,
                     null=null_spec(c, ctx.ref), d0=c.d0, radii=c.radii, replicates=c.null_replicates,
                     alpha=c.alpha, kernel=c.kernel, modes=c.modes if ctx.ref is not None else 0)


def _deficit(ctx: TestContext):
    from modeaudit.tasks.stats.steps import deficit
    c = ctx.cfg
    return deficit(ctx.client, ctx.T, ctx.ref, c.d0, c.alpha, c.kernel, c.modes)


def _two_sample(ctx: TestContext):
    from modeaudit.tasks.stats.steps import two_sample
    c = ctx.cfg
    return two_sample(ctx.client, ctx.S_rows, ctx.modes, ctx.T, ctx.ref, c.d0, c.alpha, c.kernel)


register(StatTest(
    "paper", controlled=False, needs_reference=False, run=_paper,
    note=("Seed paper's band test. Its error rate is not controlled: it compares a selected maximum with "
          "random anchors, pointwise at each of the {n_radii} radii, so it can reject on any smooth density peak.")))
register(StatTest(
    "erl", controlled=False, needs_reference=False, run=_erl,
    # The ERL p-value has resolution 1/(q+1): with too few reference anchors it is left out by default.
    default_when=lambda c: c.q is None or (c.q + 1) * c.alpha >= 1,
    section="modeaudit.tasks.report.stats:envelope_section",
    note=("Global envelope (extreme rank length) test over all {n_radii} radii at once: it fixes the pointwise "
          "multiplicity, but still compares a selected maximum with random anchors.")))
register(StatTest(
    "selection", controlled=True, needs_reference=False, run=_selection,
    section="modeaudit.tasks.report.stats:selection_section",
    note=("Selection-aware: the worst case is compared with worst cases that the same selection produces under "
          "a null (see the section below); error rate controlled with a reference set, and with the parametric "
          "surrogate only under its assumption.")))
register(StatTest(
    "two_sample", controlled=True, needs_reference=True, run=_two_sample,
    note=("Each top distinct dense ball counted in T and in the reference set: exact conditional binomial test, "
          "Holm-adjusted across balls; error rate controlled.")))
register(StatTest(
    "deficit", controlled=True, needs_reference=True, run=_deficit,
    # Opt-in (--tests ...,deficit): it answers "does the model miss mass the reference has?", a coverage
    # question every imperfect model fails at a large enough reference (docs/statistics.md, "Deficit test").
    default_when=lambda c: False,
    section="modeaudit.tasks.report.stats:deficit_section",
    note=("Balls centred on the densest distinct reference rows, counted in T and in held-out reference rows: "
          "exact conditional binomial test, one-sided 'less' (the model has too little mass there: a dropped or "
          "starved mode), Holm-adjusted across balls; error rate controlled.")))
