"""Results of an experiment as a table (Markdown, CSV, terminal) and the trade-off plot.

The point of cftune is a trade-off: task gain against forgetting. The table gives every metric
per run with its difference to the base model; the plot puts task accuracy against forgetting
(KL to the base, and the benchmark average when measured), like Figure 1 of arXiv 2505.13811;
the task axis is accuracy, or the reference solutions' NLL where accuracy is too coarse.

Row schema (one dict per run, produced by the runner; `write_report` takes a list of them):

    {"run": str,               # unique name, e.g. "cfs-r1"
     "method": str,            # "base" marks the base model (the reference for deltas)
     "parent": str | None,     # Wise-FT: the run whose weights were interpolated with the base
     "alpha": float | None,    # Wise-FT: the interpolation weight (0 = base, 1 = parent)
     "metrics": {name: {"value": float, "stderr": float | None,
                        "ci95": [lo, hi] | None, "n": int}},
     "steps": int | None, "tokens": int | None, "wall_time_s": float | None}

Metric names: `task_acc` (fraction correct), `task_nll` (reference solutions' NLL, nats per
token), `kl` (KL(base‖model), nats per sample),
`kl_per_token`, `bench_avg` (mean of each benchmark's primary metric), `bench/<name>` (e.g.
`bench/arc_easy`), `stream_capped` (fraction of a run's second-stream samples cut at the length
cap); any other name is shown too.
A row is drawn as part of a Wise-FT curve when it has both `parent` and `alpha`. A missing metric
is shown as "–" and left out of the plot; the base's KL to itself is 0 by definition, so a base
row without `kl` is drawn at 0.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cftune.config import field
from cftune.samples import atomic_write_text

BASE = "base"
TASK, TASK_NLL, KL, BENCH = "task_acc", "task_nll", "kl", "bench_avg"
INSTR_KL, INSTR_NLL, BENCH_PAIRED = "instr_kl", "instr_ref_nll", "bench_paired_avg"
INSTR_NLL_PAIRED = "paired/instr_ref_nll"  # its rise over the base's, paired per prompt
# A run's quantity as a fraction of another run's, seed by seed (`cftune.compare.seed_ratios`).
RATIOS = ("ratio/task_gain", "ratio/kl", "ratio/instr_kl", "ratio/instr_ref_nll_rise")
PAIRED_PREFIXES = ("paired/", "margin/")  # measured against another model: tables of their own
TASK_AXES = (TASK, TASK_NLL)  # what the plot's y axis may show
# A plot panel each, when measured. The reference NLL is drawn as its paired rise over the
# base's: its spread over prompts (±0.15) would hide differences of 0.2 that pairing resolves.
FORGETTING_AXES = (KL, INSTR_KL, INSTR_NLL_PAIRED, BENCH_PAIRED)
METRIC_ORDER = (TASK, TASK_NLL, KL, "kl_per_token", INSTR_KL, INSTR_NLL, BENCH, BENCH_PAIRED)
# Already measured against the base (0 for the base itself): a Δ column would repeat them.
VERSUS_BASE = (KL, "kl_per_token", "stream_capped", INSTR_KL, BENCH_PAIRED)
RESULTS_CSV, RESULTS_MD, TRADEOFF_PNG = "results.csv", "results.md", "tradeoff.png"
MISSING = "–"
AXIS_LABELS = {
    TASK: "Task accuracy",
    TASK_NLL: "Task: NLL of the reference solutions, nats per token",
    KL: "Forgetting: KL(base‖model) on CF samples, nats per sample",
    INSTR_KL: "Forgetting: KL(base‖model) on instruction responses, nats per response",
    INSTR_NLL_PAIRED: "Forgetting: rise of the human instruction responses' NLL over the "
    "base's, nats per token",
    BENCH: "Benchmark average accuracy",
    BENCH_PAIRED: "Forgetting: mean paired Δ accuracy vs base over benchmarks",
}
FIGSIZE_PER_PANEL, FIG_HEIGHT, DPI = 6.5, 5.0, 150  # inches, inches, pixels per inch


# ----------------------------------------------------------------------------- table

def order_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The base row(s) first, the others in the order given."""
    base = [r for r in rows if r.get("method") == BASE]
    return base + [r for r in rows if r.get("method") != BASE]


def base_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("method") == BASE), None)


def metric_names(rows: list[dict[str, Any]], paired: bool = False) -> list[str]:
    """Every metric in any row: the main ones first, then `bench/*`, then the rest, sorted;
    the per-benchmark paired metrics only with `paired` (they get tables of their own)."""
    names = {n for r in rows for n in (r.get("metrics") or {})
             if paired or not n.startswith(PAIRED_PREFIXES)}
    first = [n for n in METRIC_ORDER if n in names]
    bench = sorted(n for n in names if n.startswith("bench/"))
    return first + bench + sorted(names - set(first) - set(bench))


def metric(row: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The metric entry `name` of `row`, or None when absent or without a value."""
    m = ((row or {}).get("metrics") or {}).get(name)
    return m if m and m.get("value") is not None else None


def value(row: dict[str, Any] | None, name: str) -> float | None:
    m = metric(row, name)
    return float(m["value"]) if m else None


def delta(row: dict[str, Any], base: dict[str, Any] | None, name: str) -> float | None:
    """`row`'s metric minus the base's, or None when either is missing."""
    v, b = value(row, name), value(base, name)
    return None if v is None or b is None else v - b


def fmt_number(x: float | None, sign: bool = False) -> str:
    """Three decimals for small numbers (accuracies, KL per token), fewer for large ones."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    digits = _digits(x)
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _digits(x: float) -> int:
    return 3 if abs(x) < 10 else 1 if abs(x) < 1000 else 0


def fmt_metric(m: dict[str, Any] | None) -> str:
    """`value ± stderr` (or just the value when there is no stderr)."""
    if m is None:
        return MISSING
    v = float(m["value"])
    if m.get("stderr") is None:
        return fmt_number(v)
    digits = _digits(v)  # the stderr shares the value's precision: "18.0 ± 1.8", not "± 1.800"
    return f"{v:.{digits}f} ± {float(m['stderr']):.{digits}f}"


def _fmt_count(x: float | None) -> str:
    return MISSING if x is None else f"{int(x):,}"


def _fmt_seconds(x: float | None) -> str:
    return MISSING if x is None else f"{x:.0f}"


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, cells): one row per run, base first; each metric with its Δ vs the base."""
    rows = order_rows(rows)
    names, base = metric_names(rows), base_row(rows)
    header = ["run", "method"]
    with_delta = [bool(base) and n not in VERSUS_BASE for n in names]
    for n, d in zip(names, with_delta):
        header += [n, f"Δ {n}"] if d else [n]
    header += ["steps", "tokens", "time (s)"]
    cells = []
    for r in rows:
        line = [str(r["run"]), str(r.get("method", MISSING))]
        for n, d in zip(names, with_delta):
            line.append(fmt_metric(metric(r, n)))
            if d:
                line.append(MISSING if r is base else fmt_number(delta(r, base, n), sign=True))
        line += [_fmt_count(r.get("steps")), _fmt_count(r.get("tokens")),
                 _fmt_seconds(r.get("wall_time_s"))]
        cells.append(line)
    return header, cells


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The results table in Markdown (GitHub flavour)."""
    header, cells = table(rows)
    esc = [[c.replace("|", "\\|") for c in line] for line in [header] + cells]
    right = [False, False] + [True] * (len(header) - 2)
    out = ["| " + " | ".join(esc[0]) + " |",
           "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in esc[1:]]
    return "\n".join(out) + "\n"


def print_table(rows: list[dict[str, Any]], file: TextIO | None = None) -> None:
    """The results table, aligned for a terminal."""
    header, cells = table(rows)
    widths = [max(len(line[i]) for line in [header] + cells) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    print("\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(c) for c in cells]),
          file=file or sys.stdout)


def _fmt_interval(m: dict[str, Any] | None, sign: bool = True) -> str:
    """`+0.012 [−0.004, +0.030]*`: the paired Δ, its 95% interval, * when it excludes 0
    (`sign` False for a ratio: `0.65 [0.58, 0.72]`)."""
    if m is None:
        return MISSING
    ci = m.get("ci95")
    text = fmt_number(float(m["value"]), sign=sign)
    if ci:
        text += f" [{fmt_number(ci[0], sign=sign)}, {fmt_number(ci[1], sign=sign)}]"
    return text + ("*" if m.get("significant") else "")


def paired_markdown(rows: list[dict[str, Any]], title: str = "Paired against the base") -> str:
    """One table per yardstick measured item by item (task and each benchmark): Δ vs the
    reference with its paired 95% interval (* = excludes 0), flips right→wrong / wrong→right,
    the exact McNemar p, and the gold-margin change (benchmarks)."""
    names = sorted({n.split("/", 1)[1] for r in rows for n in (r.get("metrics") or {})
                    if n.startswith("paired/")})
    if not names:
        return ""
    out = [f"## {title}\n"]
    for name in names:
        lines = []
        for r in rows:
            m = metric(r, f"paired/{name}")
            if m is None:
                continue
            flips = m.get("flips")
            margin = metric(r, f"margin/{name}")
            p = m.get("mcnemar_p")
            lines.append(f"| {r['run']} | {_fmt_interval(m)} | "
                         f"{f'{flips[0]} / {flips[1]}' if flips else MISSING} | "
                         f"{MISSING if p is None else f'{p:.3g}'} | {_fmt_interval(margin)} |")
        if lines:
            out += [f"**{name}**\n", "| run | Δ [95% CI] | flips r→w / w→r | McNemar p | "
                    "margin Δ [95% CI] |", "|---|---:|---:|---:|---:|", *lines, ""]
    return "\n".join(out) + "\n"


def comparisons_markdown(comparisons: list[dict[str, Any]]) -> str:
    """The `eval.compare` pairs: every yardstick's paired B − A."""
    if not comparisons:
        return ""
    out = ["## Paired comparisons between runs\n"]
    for c in comparisons:
        row = {"run": f"{c['model']} − {c['ref']}", "metrics": c["metrics"]}
        singles = [(n, c["metrics"][n]) for n in ("paired/kl", "paired/task_nll", BENCH_PAIRED)
                   if n in c["metrics"]]
        out.append(f"**{c['model']} vs {c['ref']}**: " + "; ".join(
            f"{n.replace('paired/', 'Δ ')} {_fmt_interval(m)}" for n, m in singles) + "\n")
        ratios = [(n, c["metrics"][n]) for n in RATIOS if n in c["metrics"]]
        if ratios:
            n_seeds = ratios[0][1]["n"]
            out.append(f"As fractions of {c['ref']}'s, seed by seed ({n_seeds} seed"
                       f"{'s' if n_seeds > 1 else ''}; t interval over seeds): " + "; ".join(
                f"{n.removeprefix('ratio/').replace('_', ' ')} {_fmt_interval(m, sign=False)}"
                for n, m in ratios) + "\n")
        out.append(paired_markdown([row], title="").replace("## \n\n", ""))
    return "\n".join(out)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """One line per run; per metric: value, stderr, ci95 bounds, n and Δ vs base (empty = none)."""
    rows = order_rows(rows)
    names, base = metric_names(rows, paired=True), base_row(rows)
    fields = ["run", "method", "group", "seed", "parent", "alpha", "steps", "tokens", "wall_time_s"]
    for n in names:
        fields += [n, f"{n}_stderr", f"{n}_ci95_lo", f"{n}_ci95_hi", f"{n}_n", f"{n}_delta"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        line: dict[str, Any] = {k: r.get(k) for k in fields[:9]}
        for n in names:
            m = metric(r, n) or {}
            ci = m.get("ci95") or [None, None]
            line.update({n: m.get("value"), f"{n}_stderr": m.get("stderr"),
                         f"{n}_ci95_lo": ci[0], f"{n}_ci95_hi": ci[1], f"{n}_n": m.get("n"),
                         f"{n}_delta": delta(r, base, n)})
        writer.writerow({k: "" if v is None else v for k, v in line.items()})
    return buf.getvalue()


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


# ----------------------------------------------------------------------------- files

def write_report(rows: list[dict[str, Any]], folder: str | os.PathLike,
                 title: str = "Task gain vs forgetting", y_name: str = TASK,
                 comparisons: list[dict[str, Any]] = ()) -> dict[str, Path]:
    """Write `results.csv`, `results.md` and `tradeoff.png` into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / RESULTS_CSV, "md": folder / RESULTS_MD, "png": folder / TRADEOFF_PNG}
    atomic_write_text(paths["csv"], to_csv(rows))
    atomic_write_text(paths["md"], f"# {title}\n\n" + to_markdown(rows) + (
        f"\nCells: value ± standard error (over seeds for `NAME (n seeds)` rows, with t "
        f"intervals in the CSV); Δ = difference to the base model; {MISSING} = not measured. "
        "`kl` is KL(base‖model) in nats per sample (lower = less forgetting); `task_nll` is the "
        "NLL of the reference solutions in nats per token (lower = better); `bench_paired_avg` "
        "the mean paired Δ accuracy against the base over the benchmarks.\n\n")
        + paired_markdown(rows) + comparisons_markdown(list(comparisons)))
    plot_tradeoff(rows, paths["png"], title=title, y_name=y_name)
    setting = next((r["ablation"] for r in rows if "ablation" in r), None)
    if setting:  # the config varies one setting: its own plot (cftune.ablation)
        from cftune.ablation import ABLATION_PNG, plot_ablation

        paths["ablation"] = plot_ablation(rows, folder / ABLATION_PNG, setting)
    return paths


@dataclass
class ReportConfig:
    """Settings of `cftune report RUN_DIR`: re-render an experiment's tables and plot from its
    stored results (results.json, comparisons.json), recomputing nothing."""

    folder: str = field("experiments/quickstart", "experiment folder holding results.json")
    plot_y: str = field(TASK, "task metric on the plot's y axis: task_acc | task_nll")
    title: str = field("Task gain vs forgetting", "title of the report and the plot")

    POSITIONAL = "folder"


def report(config: ReportConfig) -> Path:
    """Re-render `results.md`, `results.csv` and `tradeoff.png` of an experiment folder."""
    import json

    from cftune.errors import CftuneError

    folder = Path(config.folder)
    if not (folder / "results.json").is_file():
        raise CftuneError(f"{folder}: no results.json (run `cftune run CONFIG --out {folder}` "
                          f"first)")
    if config.plot_y not in TASK_AXES:
        raise CftuneError(f"plot_y '{config.plot_y}' is not one of {', '.join(TASK_AXES)}")
    rows = json.loads((folder / "results.json").read_text())
    comparisons_file = folder / "comparisons.json"
    comparisons = json.loads(comparisons_file.read_text()) if comparisons_file.is_file() else []
    paths = write_report(rows, folder, config.title, config.plot_y, comparisons)
    print_table(rows)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return folder
