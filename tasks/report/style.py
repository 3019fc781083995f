"""One look for every figure of the reports: colours, fonts, sizes, and one way to save a figure.

Every figure the audit and calibration reports draw is made with `new_figure`, its axes go
through `style_axes`, it carries a title (`new_figure(title=...)`), and it leaves through
`save_figure`, which writes the same drawing as PNG and SVG under ``plots/`` (paths from
`storage/layout.py`, atomic writes) and returns the PNG bytes the HTML embeds.

Pure matplotlib object API (``matplotlib.figure.Figure``): no pyplot, no ``rcParams``
changes, nothing global, so it is safe in worker threads and in any host process.
"""
from __future__ import annotations

import base64
import contextvars
import io
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:     # loaded by new_figure: importing the report modules stays cheap
    from matplotlib.figure import Figure

__all__ = ["COLORS", "DPI", "new_figure", "style_axes", "png_bytes", "svg_bytes", "save_figure",
           "plots_to", "figure_img"]

DPI = 110
TITLE_SIZE = 12.0
LABEL_SIZE = 10.0
TICK_SIZE = 9.0
LEGEND_SIZE = 9.0

COLORS = {
    "band": "#9ecae1", "median": "#08519c", "ref": "#b5b5b5", "worst": "#d62728", "obs": "#ff7f0e",
    "d0": "#444444", "hist": "#6baed6", "mean": "#08306b", "after": "#2171b5", "null": "#238b45",
    "nullband": "#c7e9c0", "envelope": "#c6dbef", "grid": "#e5e5e5", "muted": "#6b7280",
}


def wrap_title(title: str, width: float) -> str:
    """The title wrapped to the figure's width (about 9 characters an inch at TITLE_SIZE): never cut off."""
    import textwrap
    return textwrap.fill(title, max(30, int(width * 9)))


def new_figure(width: float, height: float, title: str | None = None, layout: str | None = "constrained") -> Figure:
    """A figure in the reports' style (constrained layout unless layout=None), with its title."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout=layout, facecolor="white")
    if title:
        fig.suptitle(wrap_title(title, width), fontsize=TITLE_SIZE, **({} if layout else {"y": 0.985, "va": "top"}))
    return fig


def style_axes(ax, *, grid: str | None = "both") -> None:
    """Light grid behind the data, no top/right spines, the reports' tick and label sizes."""
    if grid:
        ax.grid(True, axis=grid, color=COLORS["grid"], lw=0.6)
        ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.xaxis.label.set_size(LABEL_SIZE)
    ax.yaxis.label.set_size(LABEL_SIZE)
    ax.title.set_size(LABEL_SIZE + 0.5)


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG (no "Software" metadata, so the bytes do not change with the matplotlib version)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def svg_bytes(fig: Figure) -> bytes:
    """The figure as SVG (no date or creator metadata, so the bytes are reproducible)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return buf.getvalue()


def save_figure(fig: Figure, plots_dir: str | Path | None, name: str) -> bytes:
    """Write ``plots_dir/name.png`` and ``name.svg`` atomically (nothing when plots_dir is None); return the PNG."""
    from modeaudit.storage.layout import RunLayout, atomic_write_bytes
    png = png_bytes(fig)
    if plots_dir is not None:
        # The PNG's draw placed every axes (constrained layout); keep those positions for the SVG instead of
        # solving the layout again: the same drawing, a fifth less time per figure.
        if fig.get_layout_engine() is not None:
            fig.set_layout_engine("none")
        for fmt, payload in (("png", png), ("svg", svg_bytes(fig))):
            atomic_write_bytes(RunLayout.plot_in(Path(plots_dir), name, fmt), payload)
    return png


# Where figure_img also saves its figures (a run's plots/ folder), for the duration of a `with plots_to(...)`.
_PLOTS_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("modeaudit_plots_dir", default=None)


class plots_to:
    """Context: figures drawn through `figure_img` inside it are also saved as PNG + SVG in this folder."""

    def __init__(self, plots_dir: str | Path | None):
        self.dir = None if plots_dir is None else Path(plots_dir)

    def __enter__(self):
        self._token = _PLOTS_DIR.set(self.dir)
        return self

    def __exit__(self, *exc):
        _PLOTS_DIR.reset(self._token)


def figure_img(fig: Figure, alt: str, name: str | None = None) -> str:
    """An <img> embedding the figure (base64 PNG); saved as plots/<name>.png/.svg inside a `plots_to`."""
    import html
    png = save_figure(fig, _PLOTS_DIR.get() if name else None, name or "")
    return (f'<img alt="{html.escape(alt)}" style="max-width:100%" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
