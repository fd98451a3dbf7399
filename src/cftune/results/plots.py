"""The trade-off plot: task gain against each forgetting yardstick (CF KL, instruction KL, the
reference-NLL rise, the benchmark Δ), one panel each, Wise-FT runs joined into curves from the
base to their parent, labels placed where they overlap nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cftune.results.metrics import (
    AXIS_LABELS,
    BASE,
    BENCH,
    BENCH_PAIRED,
    FORGETTING_AXES,
    INSTR_KL,
    INSTR_NLL_PAIRED,
    KL,
    TASK,
    TASK_AXES,
    base_row,
    metric,
    order_rows,
    value,
)

FIGSIZE_PER_PANEL, FIG_HEIGHT, DPI = 6.5, 5.0, 150  # inches, inches, pixels per inch



# ----------------------------------------------------------------------------- plot

def _point(row: dict[str, Any], x_name: str, y_name: str = TASK) -> tuple[float, float] | None:
    """(x, y) of a run in a panel, or None when it lacks a coordinate."""
    x, y = value(row, x_name), value(row, y_name)
    if x is None and x_name in FORGETTING_AXES and row.get("method") == BASE:
        x = 0.0
    return None if x is None or y is None else (x, y)


def ci_error(row: dict[str, Any], name: str) -> tuple[float, float]:
    """(below, above) of the 95% interval: `ci95`, else ±1.96·stderr, else none."""
    m = metric(row, name)
    if not m:
        return 0.0, 0.0
    v = float(m["value"])
    if m.get("ci95"):
        lo, hi = m["ci95"]
        return max(v - float(lo), 0.0), max(float(hi) - v, 0.0)
    s = 1.96 * float(m["stderr"]) if m.get("stderr") is not None else 0.0
    return s, s


def _is_wiseft(row: dict[str, Any]) -> bool:
    return row.get("parent") is not None and row.get("alpha") is not None


def _wiseft_curves(rows: list[dict[str, Any]],
                   by_name: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """parent -> [base, Wise-FT rows by increasing alpha, parent], the endpoints when present.
    The parent is looked up in `by_name` (every row, by run): a seed replicate merged by Wise-FT
    ends its curve though only its group's row is drawn as a point."""
    base = base_row(rows)
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if _is_wiseft(r):
            curves.setdefault(r["parent"], []).append(r)
    for parent, points in curves.items():
        points.sort(key=lambda r: float(r["alpha"]))
        curves[parent] = ([base] if base else []) + points + (
            [by_name[parent]] if parent in by_name else [])
    return curves


def _place_labels(ax: Any, labels: list[tuple[str, float, float]], obstacles: list[Any],
                  fontsize: float) -> None:
    """Annotate points, trying a few offsets per label: the first that stays inside the axes and
    overlaps no marker, error bar or earlier label wins, else the one with the fewest overlaps
    (a small greedy stand-in for adjustText, which we don't depend on)."""
    renderer = ax.figure.canvas.get_renderer()
    offsets = [(7, 5, "left", "bottom"), (7, -5, "left", "top"), (-7, 5, "right", "bottom"),
               (-7, -5, "right", "top"), (0, 10, "center", "bottom"), (0, -10, "center", "top"),
               (14, 0, "left", "center"), (-14, 0, "right", "center"), (12, 14, "left", "bottom"),
               (-12, 14, "right", "bottom"), (12, -14, "left", "top"), (-12, -14, "right", "top")]
    axes_box = ax.get_window_extent(renderer)
    placed = list(obstacles)
    for text, x, y in labels:
        best = None
        for dx, dy, ha, va in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                              ha=ha, va=va, fontsize=fontsize, zorder=5)
            box = ann.get_window_extent(renderer)
            outside = not (axes_box.contains(box.x0, box.y0) and axes_box.contains(box.x1, box.y1))
            cost = (outside, sum(box.overlaps(p) for p in placed))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == (False, 0):
                break
        placed.append(best[2])


def _obstacles(ax: Any, points: list[tuple[tuple[float, float], tuple[float, float],
                                           tuple[float, float]]]) -> list[Any]:
    """Display-space boxes of each marker and its error bars: (point, xerr, yerr) per run."""
    from matplotlib.transforms import Bbox

    boxes = []
    for (x, y), (xl, xh), (yl, yh) in points:
        (px, py), = ax.transData.transform([(x, y)])
        (x0, y0), (x1, y1) = ax.transData.transform([(x - xl, y - yl), (x + xh, y + yh)])
        boxes += [Bbox([[px - 7, py - 7], [px + 7, py + 7]]),  # the marker
                  Bbox([[x0, py - 2], [x1, py + 2]]), Bbox([[px - 2, y0], [px + 2, y1]])]
    return boxes


def _color(row: dict[str, Any] | None, by_name: dict[str, dict[str, Any]],
           colors: dict[str, Any]) -> Any:
    """A run's colour: its method's, and for a Wise-FT point its parent's."""
    if row is not None and _is_wiseft(row):
        row = by_name.get(row["parent"])
    return colors.get((row or {}).get("method", ""), "0.4")


def _style(row: dict[str, Any], by_name: dict[str, dict[str, Any]],
           colors: dict[str, Any]) -> dict[str, Any]:
    if row.get("method") == BASE:
        return {"marker": "*", "ms": 16, "color": "black", "mec": "white", "zorder": 4}
    if _is_wiseft(row):
        return {"marker": "o", "ms": 5, "color": _color(row, by_name, colors), "zorder": 3}
    return {"marker": "o", "ms": 9, "color": _color(row, by_name, colors), "mec": "white",
            "zorder": 3}


def _legend(ax: Any, rows: list[dict[str, Any]], by_name: dict[str, dict[str, Any]],
            colors: dict[str, Any]) -> Any:
    """Which colour is which method, and what the dashed Wise-FT curves are."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="none", label=BASE, **_style(r, by_name, colors))
               for r in rows[:1] if r.get("method") == BASE]
    handles += [Line2D([], [], ls="none", marker="o", ms=8, color=c, mec="white", label=m)
                for m, c in colors.items()]
    handles += [Line2D([], [], ls="--", marker="o", ms=4,
                       color=_color(curve[-1], by_name, colors),
                       label=f"Wise-FT of {parent} (α: base→{parent})")
                for parent, curve in _wiseft_curves(rows, by_name).items()]
    return ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.9)


def _panel(ax: Any, rows: list[dict[str, Any]], by_name: dict[str, dict[str, Any]],
           x_name: str, y_name: str, colors: dict[str, Any], legend: bool) -> None:
    """One panel: the task metric `y_name` against `x_name`, a labelled point per row of
    `rows`, Wise-FT curves (parents found in `by_name`, every row by run)."""
    from matplotlib.ticker import PercentFormatter

    for curve in _wiseft_curves(rows, by_name).values():
        pts = [p for p in (_point(r, x_name, y_name) for r in curve) if p]
        if len(pts) > 1:
            ax.plot(*zip(*pts), "--", color=_color(curve[-1], by_name, colors), lw=1.3, alpha=0.8,
                    zorder=1)
    labels, drawn = [], []
    for r in rows:
        p = _point(r, x_name, y_name)
        if p is None:
            continue
        xerr, yerr = ci_error(r, x_name), ci_error(r, y_name)
        style = _style(r, by_name, colors)
        ax.errorbar([p[0]], [p[1]], xerr=[[xerr[0]], [xerr[1]]], yerr=[[yerr[0]], [yerr[1]]],
                    ecolor=style["color"], elinewidth=1, capsize=2, alpha=0.9, ls="none", **style)
        labels.append((f"α={float(r['alpha']):g}" if _is_wiseft(r) else str(r["run"]), *p))
        drawn.append((p, xerr, yerr))
    ax.set_xlabel(AXIS_LABELS[x_name])
    ax.set_ylabel(AXIS_LABELS[y_name])
    if x_name in (BENCH, BENCH_PAIRED):
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(True, alpha=0.3)
    ax.margins(0.18)
    if y_name == TASK:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        bottom, top = ax.get_ylim()  # accuracy lives in [0, 1]: don't waste room beyond it
        ax.set_ylim(max(bottom, -0.04), min(top, 1.04))
    # Less forgetting is lower KL (left) but higher benchmark accuracy (right); a better task
    # score is higher accuracy but lower NLL.
    lower_is_better = x_name in (KL, INSTR_KL, INSTR_NLL_PAIRED)
    x, ha, arrow = (0.02, "left", "←") if lower_is_better else (0.98, "right", "→")
    up = "↑" if y_name == TASK else "↓"
    hint = ax.text(x, 0.98, f"better: {up} {arrow}", transform=ax.transAxes, ha=ha, va="top",
                   fontsize=8, color="0.45")
    extra = [_legend(ax, rows, by_name, colors)] if legend else []
    ax.figure.canvas.draw()  # fixes the limits, so data -> pixel transforms are final
    renderer = ax.figure.canvas.get_renderer()
    obstacles = _obstacles(ax, drawn) + [a.get_window_extent(renderer) for a in [hint] + extra]
    _place_labels(ax, labels, obstacles, fontsize=8)


def plotted_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """With seed replicates, their group rows (the mean over seeds) stand for them."""
    grouped = {r["group"] for r in rows if r.get("seeds")}
    return [r for r in rows if r.get("seeds") or r.get("group") not in grouped]


def plot_tradeoff(rows: list[dict[str, Any]], path: str | os.PathLike,
                  title: str = "Task gain vs forgetting", y_name: str = TASK) -> Path:
    """Write the trade-off plot: a panel per forgetting yardstick measured (CF KL, instruction
    KL, instruction reference NLL, paired benchmark Δ, else the benchmark average); the y axis
    is the task metric `y_name` (`task_acc` or `task_nll`).

    The size is fixed (6.5 x 5 inches per panel at 150 dpi) so reports line up across runs. We
    draw on an Agg canvas of our own rather than through pyplot, so a caller's backend (a
    notebook, a GUI) is left alone.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if y_name not in TASK_AXES:
        raise ValueError(f"y_name must be one of {TASK_AXES} (got {y_name!r})")
    by_name = {r["run"]: r for r in rows}
    rows = plotted_rows(order_rows(rows))
    measured = [n for n in FORGETTING_AXES if any(value(r, n) is not None for r in rows)]
    panels = measured + ([BENCH] if BENCH_PAIRED not in measured and
                         any(value(r, BENCH) is not None for r in rows) else [])
    panels = panels or [KL]
    fig = Figure(figsize=(FIGSIZE_PER_PANEL * len(panels), FIG_HEIGHT), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    methods = [m for m in dict.fromkeys(r.get("method", "") for r in rows if not _is_wiseft(r))
               if m != BASE]
    palette = colormaps["tab10"].colors
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    for i, (ax, x_name) in enumerate(zip(axes[0], panels)):
        _panel(ax, rows, by_name, x_name, y_name, colors, legend=i == 0)
        if not any(_point(r, x_name, y_name) for r in rows):
            ax.text(0.5, 0.5, f"no run has both {y_name} and {x_name}", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")
    fig.suptitle(title, fontsize=13)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
