"""Checks that a drawn figure is fit to print, with matplotlib's own renderer.

:func:`layout_problems` draws a figure and returns one line per problem:

- two pieces of text overlap (titles, axis labels, tick labels, offset texts such as "1e7",
  annotations, legends taken as one box, the suptitle), measured by ``get_window_extent``;
- an axis whose plotted values span more than two decades is linear (it should be logarithmic);
- the figure is wider than a landscape page (11 in), so printing shrinks its text below reading size;
- a legend entry shows a marker style (marker and hollow/filled) that no drawn artist has, or a
  text speaks of "hollow" markers when none is drawn.

The analysis tests run it on every plot of synthetic studies; it is also handy by hand on a new plot.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import numpy as np
from matplotlib.collections import PathCollection
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text

DECADES = 2.0  # an axis spanning more than this many decades of positive values must be logarithmic
MAX_WIDTH_IN = 11.0  # a landscape page's width: a wider figure is shrunk until its text cannot be read
TOLERANCE_PX = 0.5  # boxes that only touch (anti-aliasing, rounding) are not an overlap


def _shown(t: Text) -> bool:
    return t.get_visible() and bool(t.get_text().strip()) and t.get_alpha() != 0


def _ticklabels(axis) -> Iterable[Text]:
    lo, hi = sorted(axis.get_view_interval())
    span = hi - lo
    for locs, ticks in ((axis.get_majorticklocs(), axis.get_major_ticks), (axis.get_minorticklocs(), axis.get_minor_ticks)):
        for loc, tick in zip(locs, ticks(len(locs))):
            if lo - 1e-9 * span <= loc <= hi + 1e-9 * span:
                yield from (lab for lab in (tick.label1, tick.label2) if _shown(lab))


def texts_of(fig) -> list[tuple[str, object]]:
    """(description, artist) of every text of the figure that takes room; a legend is one entry."""
    out: list[tuple[str, object]] = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        name = f"axes {i}" + (f" '{ax.get_title()}'" if ax.get_title() else "")
        for t in (ax.title, getattr(ax, "_left_title", None), getattr(ax, "_right_title", None)):
            if t is not None and _shown(t):
                out.append((f"{name} title", t))
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not axis.get_visible():
                continue
            if _shown(axis.label):
                out.append((f"{name} {which} label '{axis.label.get_text()}'", axis.label))
            off = axis.get_offset_text()
            if _shown(off):
                out.append((f"{name} {which} offset text '{off.get_text()}'", off))
            for lab in _ticklabels(axis):
                out.append((f"{name} {which} tick label '{lab.get_text()}'", lab))
        for t in ax.texts:
            if _shown(t):
                out.append((f"{name} text '{t.get_text()}'", t))
        if ax.get_legend() is not None and ax.get_legend().get_visible():
            out.append((f"{name} legend", ax.get_legend()))
    for t in fig.texts:
        if _shown(t):
            out.append((f"figure text '{t.get_text()}'", t))
    for lg in fig.legends:
        if lg.get_visible():
            out.append(("figure legend", lg))
    return out


def _corners(art, renderer) -> np.ndarray:
    """The four corners of an artist's box in display pixels; a rotated text is a rotated rectangle, not its
    axis-aligned extent (45-degree tick labels overlap their neighbours' extents without touching them)."""
    bb = art.get_window_extent(renderer)
    angle = art.get_rotation() % 180 if isinstance(art, Text) else 0.0
    if not angle:
        return np.array([[bb.x0, bb.y0], [bb.x1, bb.y0], [bb.x1, bb.y1], [bb.x0, bb.y1]])
    flat = Text(0, 0, art.get_text(), fontproperties=art.get_fontproperties(), figure=art.get_figure(),
                linespacing=art.get_linespacing())
    fb = flat.get_window_extent(renderer)
    w, h, th = fb.width / 2, fb.height / 2, np.deg2rad(angle)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    # the centre of a rotated rectangle is the centre of its axis-aligned extent
    return np.array([(bb.x0 + bb.x1) / 2, (bb.y0 + bb.y1) / 2]) + np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) @ rot.T


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Separating-axis test of two convex quadrilaterals: they overlap by more than TOLERANCE_PX along every
    edge normal of both."""
    for poly in (a, b):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            n = np.array([-edge[1], edge[0]])
            norm = np.hypot(*n)
            if norm == 0:
                continue
            n = n / norm
            pa, pb = a @ n, b @ n
            if min(pa.max(), pb.max()) - max(pa.min(), pb.min()) <= TOLERANCE_PX:
                return False
    return True


def overlapping_texts(fig) -> list[str]:
    renderer = fig.canvas.get_renderer()
    boxes = []
    for desc, art in texts_of(fig):
        bb = art.get_window_extent(renderer)
        if bb.width > 0 and bb.height > 0:
            boxes.append((desc, _corners(art, renderer)))
    out = []
    for (d1, b1), (d2, b2) in itertools.combinations(boxes, 2):
        if _overlap(b1, b2):
            out.append(f"text overlaps: {d1} and {d2}")
    return out


def _values(ax, which: str) -> np.ndarray:
    """The positive data values plotted along x or y (lines, scatter points, bar tops), in data coordinates."""
    vals: list[np.ndarray] = []
    k = 0 if which == "x" else 1
    for line in ax.lines:
        if line.get_visible() and line.get_transform() == ax.transData:
            xy = np.asarray(line.get_xydata(), dtype=float)
            if xy.size:
                vals.append(xy[:, k])
    for c in ax.collections:
        if isinstance(c, PathCollection) and c.get_visible() and c.get_offset_transform() == ax.transData:
            off = np.asarray(c.get_offsets(), dtype=float)
            if off.size:
                vals.append(off[:, k])
    for p in ax.patches:
        if isinstance(p, Rectangle) and p.get_visible() and p.get_data_transform() == ax.transData:
            if which == "y":
                vals.append(np.array([p.get_y() + p.get_height()]))
            else:
                vals.append(np.array([p.get_x() + p.get_width() / 2]))
    if not vals:
        return np.array([])
    v = np.concatenate(vals)
    return v[np.isfinite(v)]


def linear_wide_axes(fig) -> list[str]:
    out = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or ax.images or hasattr(ax, "_colorbar"):
            continue
        for which, scale in (("x", ax.get_xscale()), ("y", ax.get_yscale())):
            v = _values(ax, which)
            if scale != "linear" or len(v) < 2 or (v <= 0).any():
                continue
            decades = np.log10(v.max() / v.min())
            if decades > DECADES:
                out.append(f"axes {i} '{ax.get_title()}': {which} spans {decades:.1f} decades "
                           f"({v.min():.3g} to {v.max():.3g}) on a linear scale")
    return out


def _hollow(mfc) -> bool:
    return isinstance(mfc, str) and mfc.lower() in ("none", "white", "w", "#ffffff")


def _marker_styles(fig) -> set[tuple[str, bool]]:
    drawn = set()
    for ax in fig.axes:
        for line in ax.lines:
            m = line.get_marker()
            if line.get_visible() and m not in (None, "None", "none", "", " ") and len(line.get_xdata()):
                drawn.add((str(m), _hollow(line.get_markerfacecolor()) or line.get_fillstyle() == "none"))
    return drawn


def legend_lies(fig) -> list[str]:
    drawn = _marker_styles(fig)
    out = []
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    for lg in legends:
        for h, t in zip(lg.legend_handles, lg.get_texts()):
            if isinstance(h, Line2D) and h.get_marker() not in (None, "None", "none", "", " "):
                style = (str(h.get_marker()), _hollow(h.get_markerfacecolor()) or h.get_fillstyle() == "none")
                if style not in drawn:
                    out.append(f"legend entry '{t.get_text()}' shows marker {style[0]!r}"
                               f"{' hollow' if style[1] else ''}, which no plotted point has")
    if not any(hollow for _, hollow in drawn):
        for desc, art in texts_of(fig):
            words = " ".join(x.get_text() for x in art.get_texts()) if isinstance(art, Legend) else art.get_text()
            if "hollow" in words.lower():
                out.append(f"{desc} speaks of hollow markers, but none is drawn")
    return out


def too_wide(fig) -> list[str]:
    """A figure wider than a landscape page's text (at the size it is saved) shrinks its text below reading size."""
    w = fig.get_tightbbox(fig.canvas.get_renderer()).width  # inches, what bbox_inches="tight" saves
    return [f"figure is {w:.1f} in wide, more than {MAX_WIDTH_IN:g} in: it cannot be printed at a readable size"] if w > MAX_WIDTH_IN else []


def layout_problems(fig) -> list[str]:
    """Every problem of a figure (see the module docstring); an empty list when it is fit to print."""
    fig.canvas.draw()
    return overlapping_texts(fig) + linear_wide_axes(fig) + legend_lies(fig) + too_wide(fig)
