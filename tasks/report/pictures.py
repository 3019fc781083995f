"""Pictures in the report, regenerated on demand from the stored latents.

Generators are deterministic (latent row -> sample), so no image of S or T is ever
stored: the report regenerates only the few it shows, from the latents kept in the
run store (`S/latents`, `T/latents`).

* ``neighbours_worst``: the worst-case dense mode I_w (an S row) and its k nearest
  neighbours in T, each titled with its distance (seed 001, Fig. 4, left);
* ``neighbours_random``: the same for a random anchor I_r (``r_ref[0]``, the first of
  the random reference anchors; seed 001, Fig. 4, right);
* ``modes``: the top distinct dense modes (``result["modes"]``), a row each: the mode's
  anchor with its count within d0, then its nearest neighbours in T (seed 001, Fig. 7).

The neighbours are exact: one streamed pass over T's stored embedding blocks for all
anchors together (`nearest_rows`), a float32 GEMM to discard rows provably farther
than the running k-th neighbour, and the float64 distance of the join kernels
(`pair_distances_reference`: fixed summation order, libm acos) for the rest; ties go
to the lower T index. Memory O(block), time one read of T.

Pure compute and drawing (matplotlib's object API, no pyplot): never imports Prefect.
"""
from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from modeaudit.storage.layout import PICTURES, RunLayout
from modeaudit.tasks.join.kernels import _gemm_eps, _max_norm
from modeaudit.tasks.join.sources import Source
from modeaudit.tasks.metrics.knn import pair_distances_reference
from modeaudit.tasks.report import style

log = logging.getLogger("modeaudit.pictures")

__all__ = ["N_NEIGHBOURS", "MODES_SHOWN", "MODE_MEMBERS", "Pictures", "nearest_rows", "to_rgb", "regenerate",
           "make_pictures", "pictures_html", "no_images_reason", "EMBEDDINGS_ONLY"]

N_NEIGHBOURS = 8      # neighbours of the worst-case and the random anchor
MODES_SHOWN = 8       # distinct dense modes in the modes grid
MODE_MEMBERS = 4      # nearest T rows shown beside each mode's anchor

EMBEDDINGS_ONLY = "This run audits embeddings, not images, so there are no pictures to show"


@dataclass
class Pictures:
    """What the pictures stage produced: status "ok", "none" (no images to show) or "failed"."""
    status: str
    reason: str = ""
    png: dict[str, bytes] = field(default_factory=dict)            # name -> PNG bytes (also on disk)
    neighbours: dict[str, dict] = field(default_factory=dict)      # name -> {anchor, t_index, distance}
    samples: dict[str, dict] = field(default_factory=dict)         # "S"/"T" -> {row: regenerated sample (C, H, W)}

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------ exact k-NN

def nearest_rows(anchors: np.ndarray, blocks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of every anchor over streamed blocks, exactly.

    anchors: (a, d) unit rows; blocks: iterable of (global offset, (b, d) unit rows).
    Returns (index int64 (a, k), distance float64 (a, k)), ascending by (distance, index):
    d = arccos(clip(<a, b>)) / pi of the float32 rows in float64, the join kernels' value.
    Fewer than k rows in all: the tail is index -1, distance inf.

    A block row is evaluated exactly only if its float32 score is within 2 eps (the GEMM's
    error bound) of the block's k-th best score and of the running k-th neighbour's score:
    every row skipped is strictly farther than k rows already kept.
    """
    a32 = np.ascontiguousarray(anchors, dtype=np.float32)
    na = a32.shape[0]
    best_i = np.full((na, k), -1, np.int64)
    best_d = np.full((na, k), np.inf)
    norm_a = _max_norm(a32)
    for offset, block in blocks:
        b32 = np.ascontiguousarray(block, dtype=np.float32)
        nb = b32.shape[0]
        if nb == 0:
            continue
        eps = _gemm_eps(a32.shape[1], norm_a, _max_norm(b32))
        scores = b32 @ a32.T                                        # (nb, na) float32
        for i in range(na):
            s = scores[:, i]
            thr = -np.inf
            if nb > k:
                thr = float(np.partition(s, nb - k)[nb - k]) - 2 * eps
            if np.isfinite(best_d[i, -1]):
                thr = max(thr, float(np.cos(np.pi * best_d[i, -1])) - 2 * eps)
            cand = np.flatnonzero(s >= thr)
            if not len(cand):
                continue
            d = pair_distances_reference(a32[i:i + 1], b32[cand], "angular")[0]
            idx = np.concatenate([best_i[i], offset + cand])
            dist = np.concatenate([best_d[i], d])
            # Unused slots (index -1, inf) sort last; real ties go to the lower index.
            order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), dist))[:k]
            best_i[i], best_d[i] = idx[order], dist[order]
    return best_i, best_d


# ----------------------------------------------------------------------------- images

def to_rgb(images: np.ndarray) -> np.ndarray:
    """(n, C, H, W) samples in [-1, 1] -> (n, H, W, 3) float in [0, 1] for imshow (C = 1 as grey, C > 3: first 3)."""
    x = np.asarray(images, np.float64)
    if x.ndim != 4:
        raise ValueError(f"images must be (n, C, H, W), got shape {x.shape}")
    c = x.shape[1]
    x = x[:, :3] if c >= 3 else np.repeat(x[:, :1], 3, axis=1)
    return np.clip((np.transpose(x, (0, 2, 3, 1)) + 1.0) / 2.0, 0.0, 1.0)


def _latents(store, set_name: str, rows) -> np.ndarray:
    return np.concatenate([store.read(set_name, "latents", int(r), int(r) + 1) for r in rows])


def regenerate(generator, z: np.ndarray) -> np.ndarray:
    """The generator's samples for latent rows, one row per call.

    A network may give a row different bits in a different batch (BLAS blocking), so each
    picture is generate(z[j:j+1]): a function of its own latent only, the same whichever
    other rows a report happens to show. A few dozen rows: cheap even for large models.
    """
    if len(z) == 0:
        return np.zeros((0,), np.float32)
    return np.concatenate([np.asarray(generator.generate(z[j:j + 1])) for j in range(len(z))])


def no_images_reason(result: Mapping, generator=None) -> str | None:
    """Why this run has no pictures (one sentence), or None when it has images to show."""
    src = result.get("source") or {}
    if src.get("kind") == "embeddings":
        return (f"{EMBEDDINGS_ONLY}: the samples came in as embedding files (--embeddings-s/--embeddings-t). "
                "Audit a generator that makes images (e.g. --generator torchscript:gen.pt) to see them.")
    if generator is not None and generator.sample_kind != "image":
        return (f"{EMBEDDINGS_ONLY}: the generator {src.get('generator')} makes embedding rows directly. "
                "Pass a generator that makes images to see them.")
    return None


# ---------------------------------------------------------------------------- figures

_TILE = 1.3      # inches per picture
_GAP = 0.14      # inches between pictures
_LINE = 0.16     # inches per line of text above or below a picture


def grid_figure(title: str, rows: list[list[dict]], *, top_lines: int = 1, bottom_lines: int = 2):
    """Pictures in a grid on ONE axes (fast: no axes per picture, no layout engine).

    rows: lists of cells {img (H, W, 3) in [0, 1], top, bottom (text), frame (colour or None),
    bottom_color (optional)}; each picture keeps its aspect ratio in a square tile.
    """
    from matplotlib.patches import Rectangle
    ncols, nrows = max(len(r) for r in rows), len(rows)
    cell_w = _TILE + _GAP
    cell_h = _TILE + (top_lines + bottom_lines) * _LINE + _GAP
    width = ncols * cell_w + _GAP
    wrapped = style.wrap_title(title, width)
    title_h = 0.22 * (wrapped.count("\n") + 1) + 0.2
    height = nrows * cell_h + title_h
    fig = style.new_figure(width, height, title, layout=None)
    ax = fig.add_axes((0, 0, 1, 1 - title_h / height))
    ax.set_xlim(0, width)
    ax.set_ylim(nrows * cell_h, 0)
    ax.axis("off")
    fs = style.TICK_SIZE
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell is None:      # a spacer
                continue
            x0 = _GAP + c * cell_w
            y0 = r * cell_h + top_lines * _LINE + _GAP / 2
            img = cell["img"]
            h, w = img.shape[:2]
            sw, sh = (_TILE, _TILE * h / w) if w >= h else (_TILE * w / h, _TILE)
            xi, yi = x0 + (_TILE - sw) / 2, y0 + (_TILE - sh) / 2
            ax.imshow(img, extent=(xi, xi + sw, yi + sh, yi), interpolation="nearest", zorder=1)
            if cell.get("frame"):
                ax.add_patch(Rectangle((xi, yi), sw, sh, fill=False, ec=cell["frame"], lw=2.5, zorder=2))
            if cell.get("top"):
                ax.text(x0 + _TILE / 2, y0 - 0.04, cell["top"], ha="center", va="bottom", fontsize=fs,
                        color=cell.get("top_color", "black"), fontweight="bold" if cell.get("frame") else "normal")
            if cell.get("bottom"):
                ax.text(x0 + _TILE / 2, y0 + _TILE + 0.04, cell["bottom"], ha="center", va="top", fontsize=fs,
                        color=cell.get("bottom_color", "black"), linespacing=1.15)
    ax.set_aspect("equal", adjustable="datalim")
    return fig


def _dist_label(d: float, d0: float) -> str:
    return f"d = {d:.3f}\n= {d / d0:.2f} d0" if d0 else f"d = {d:.3f}"


def neighbours_figure(title: str, anchor_img, anchor_label: str, imgs, t_index, dist, d0: float, color: str):
    """One row: the anchor, then its neighbours in T (ascending distance), each titled with its distance
    (red when within d0)."""
    cells = [{"img": anchor_img, "top": anchor_label.split("\n")[0], "bottom": anchor_label.split("\n")[1],
              "frame": color, "top_color": color, "bottom_color": color}]
    for j, img in enumerate(imgs):
        cells.append({"img": img, "top": f"#{j + 1}: T {int(t_index[j]):,}", "bottom": _dist_label(float(dist[j]), d0),
                      "bottom_color": style.COLORS["worst"] if d0 and dist[j] <= d0 else "black"})
    return grid_figure(title, [cells])


def modes_figure(title: str, rows: list[dict], d0: float):
    """A row per distinct dense mode: its anchor (count within d0) and its nearest neighbours in T."""
    grid = []
    for r, row in enumerate(rows):
        color = style.COLORS["worst"] if r == 0 else style.COLORS["median"]
        cells = [{"img": row["anchor_img"], "top": f"mode {r + 1}: S {row['s_index']:,}",
                  "bottom": f"{row['count_d0']:,} in S\nwithin d0", "frame": color, "top_color": color}]
        for j, img in enumerate(row["imgs"]):
            d = row["dist"][j]
            cells.append({"img": img, "top": f"neighbour {j + 1} in T" if r == 0 else "",
                          "bottom": _dist_label(d, d0),
                          "bottom_color": style.COLORS["worst"] if d0 and d <= d0 else "black"})
        grid.append(cells)
    if len(grid) > 4:
        # Two modes side by side (a spacer between): the grid stays about as wide as the page, as in seed 001's Fig. 7.
        half = (len(grid) + 1) // 2
        width = max(len(g) for g in grid)
        grid = [grid[i] + [None] * (width - len(grid[i]) + 1) + (grid[i + half] if i + half < len(grid) else [])
                for i in range(half)]
        if len(grid) > 0 and len(rows) > half:
            for c, cell in enumerate(grid[0][width + 2:], start=1):
                cell["top"] = f"neighbour {c} in T"
    return grid_figure(title, grid)


# ------------------------------------------------------------------------------ stage

def make_pictures(out_dir, result: Mapping, store, generator=None, *, S_rows: np.ndarray | None = None,
                  k: int = N_NEIGHBOURS, n_modes: int = MODES_SHOWN, members: int = MODE_MEMBERS) -> Pictures:
    """Find the anchors' neighbours in T, regenerate their images and write plots/{neighbours_worst,
    neighbours_random, modes}.{png,svg}.

    generator: the run's generator (built from result["source"] when None). Returns
    Pictures("none", reason) for runs without images; raises on any other failure (the
    caller decides: the audit flow logs it and reports "pictures unavailable").
    """
    src = result.get("source") or {}
    reason = no_images_reason(result)
    if reason:
        return Pictures("none", reason)
    if generator is None:
        from modeaudit.tasks.models.generators import build_generator
        generator = build_generator(src["generator"], src.get("generator_options") or {})
    reason = no_images_reason(result, generator)
    if reason:
        return Pictures("none", reason)

    d0 = float(result["d0"])
    worst = int(result["worst_case"]["s_index"])
    r_ref = result.get("r_ref") or []
    rand = int(r_ref[0]) if len(r_ref) else None
    modes = [m for m in (result.get("modes") or [])][:n_modes]
    anchors = [worst] + ([rand] if rand is not None else []) + [int(m["s_index"]) for m in modes]
    if S_rows is None:
        a_emb = np.concatenate([store.read("S", "emb", a, a + 1) for a in anchors])
    else:
        a_emb = np.asarray(S_rows)[anchors]
    T = Source.of_store(store, "T")
    kk = min(max(k, members), T.rows)
    idx, dist = nearest_rows(a_emb, T.blocks(), kk)

    # Regenerate every image shown from its stored latent (a few dozen rows).
    t_rows = sorted({int(j) for j in idx.ravel() if j >= 0})
    s_rows = sorted(set(anchors))
    s_raw = regenerate(generator, _latents(store, "S", s_rows))
    t_raw = regenerate(generator, _latents(store, "T", t_rows))
    if s_raw.ndim != 4:
        return Pictures("none", f"The generator returns arrays of shape {s_raw.shape[1:]}, not images "
                                "(C, H, W), so there are no pictures to show.")
    s_img, t_img = dict(zip(s_rows, to_rgb(s_raw))), dict(zip(t_rows, to_rgb(t_raw)))

    sizes = result.get("sizes") or {}
    n_t = int(sizes.get("T", T.rows))
    plots = RunLayout(out_dir).plots
    pics = Pictures("ok", samples={"S": dict(zip(s_rows, s_raw)), "T": dict(zip(t_rows, t_raw))})
    mccs = result.get("worst_case", {}).get("mccs")
    specs = [("neighbours_worst", worst, 0, style.COLORS["worst"],
              f"Worst-case dense mode I_w (S row {worst:,}) and its {min(k, kk)} nearest neighbours among "
              f"|T| = {n_t:,} samples" + (f"  (MCCS {mccs:.3f})" if isinstance(mccs, float) else ""),
              "I_w, worst case")]
    if rand is not None:
        specs.append(("neighbours_random", rand, 1, style.COLORS["median"],
                      f"Random anchor I_r (S row {rand:,}) and its {min(k, kk)} nearest neighbours among "
                      f"|T| = {n_t:,} samples, for comparison", "I_r, random"))
    for name, s_index, row, color, title, label in specs:
        kn = min(k, kk)
        fig = neighbours_figure(title, s_img[s_index], f"{label}\nS {s_index:,}",
                                [t_img[int(j)] for j in idx[row, :kn]], idx[row, :kn], dist[row, :kn], d0, color)
        pics.png[name] = style.save_figure(fig, plots, name)
        pics.neighbours[name] = {"anchor": s_index, "t_index": idx[row, :kn].tolist(),
                                 "distance": dist[row, :kn].tolist()}
    if modes:
        first = 1 + (rand is not None)
        km = min(members, kk)
        rows = [{"s_index": int(m["s_index"]), "count_d0": int(m["count_d0"]), "anchor_img": s_img[int(m["s_index"])],
                 "imgs": [t_img[int(j)] for j in idx[first + r, :km]], "dist": dist[first + r, :km].tolist()}
                for r, m in enumerate(modes)]
        what = "The densest mode" if len(modes) == 1 else f"The top {len(modes)} distinct dense modes"
        fig = modes_figure(f"{what} of S (no two within d0 = {d0:g}; densest first), each with its {km} nearest "
                           f"neighbours among |T| = {n_t:,} samples", rows, d0)
        pics.png["modes"] = style.save_figure(fig, plots, "modes")
        pics.neighbours["modes"] = {"anchors": [r["s_index"] for r in rows],
                                    "t_index": idx[first:first + len(rows), :km].tolist(),
                                    "distance": dist[first:first + len(rows), :km].tolist()}
    assert set(pics.png) <= set(PICTURES)
    return pics


def safe_pictures(out_dir, result: Mapping, store, generator=None, **kw) -> Pictures:
    """make_pictures that never raises: a failure is logged and reported, the audit's result is kept."""
    try:
        return make_pictures(out_dir, result, store, generator, **kw)
    except Exception as e:  # noqa: BLE001 - a report stage must not lose the audit
        log.warning("pictures unavailable: %s: %s", type(e).__name__, e, exc_info=True)
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        return Pictures("failed", f"Pictures are unavailable: drawing them failed ({type(e).__name__}"
                                  f"{': ' + msg if msg else ''}). The audit's numbers are not affected.")


# ------------------------------------------------------------------------------- HTML

def _figure(png_b64: str, name: str, alt: str, caption: str, rel: str = "plots") -> str:
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{png_b64}">'
            f'<figcaption>{caption} <a href="{rel}/{name}.png">PNG</a> · <a href="{rel}/{name}.svg">SVG</a>'
            f'</figcaption></figure>')


def pictures_html(pics: Pictures | None, result: Mapping, *, rel: str = "plots") -> str:
    """The report's pictures section body (trusted HTML): the grids, or one sentence saying why there are none."""
    import base64
    if pics is None:
        return '<p class="muted">Pictures were not drawn for this report.</p>'
    if not pics.ok:
        return f'<p class="note-box">{html.escape(pics.reason)}</p>'
    d0 = result.get("d0")
    parts = []
    b64 = {n: base64.b64encode(p).decode("ascii") for n, p in pics.png.items()}
    if "neighbours_worst" in b64:
        parts.append(_figure(b64["neighbours_worst"], "neighbours_worst", "worst-case anchor and its nearest "
                             "neighbours in T",
                             "The worst-case dense mode (red frame) and its nearest samples of T, closest first. "
                             f"Distances in red are within d0 = {d0}: near-copies of the same identity.", rel))
    if "neighbours_random" in b64:
        parts.append(_figure(b64["neighbours_random"], "neighbours_random", "random anchor and its nearest "
                             "neighbours in T",
                             "A random anchor for comparison: its neighbours should look more varied and lie "
                             "farther away than the worst case's.", rel))
    if "modes" in b64:
        parts.append(_figure(b64["modes"], "modes", "top distinct dense modes",
                             "The densest modes of S, no two within d0 of each other, with their count of S "
                             "samples within d0 and their nearest samples of T. Images are regenerated from the "
                             "stored latents; none is stored.", rel))
    return "".join(parts)
