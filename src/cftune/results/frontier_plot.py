"""frontier.png: the trade-off curves of `cftune.results.frontier` drawn against task gain, a
panel per forgetting yardstick, so the matched-gain comparison can be seen as well as read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from cftune.results.frontier import HIGHER_IS_BETTER
from cftune.results.metrics import BENCH_PAIRED, INSTR_KL, INSTR_NLL_PAIRED, KL

LABELS = {KL: "CF KL(base‖model), nats per sample",
          INSTR_KL: "instruction KL(base‖model), nats per response",
          INSTR_NLL_PAIRED: "rise of the instructions' reference NLL, nats per token",
          BENCH_PAIRED: "mean paired Δ benchmark accuracy vs base"}
DPI = 150


def _limits(values: list[float], anchor: float, pad: float = 0.08) -> tuple[float, float]:
    """The span of `values`, padded, reaching out to `anchor` (the base's value) when it lies
    within half a span of them: the base line is drawn when near, the axes stay zoomed when not."""
    lo, hi = min(values), max(values)
    span = (hi - lo) or max(abs(hi), 1e-3)
    if lo - span / 2 <= anchor <= hi + span / 2:
        lo, hi = min(lo, anchor), max(hi, anchor)
        span = hi - lo
    return lo - pad * span, hi + pad * span


def _panel(ax: Any, result: dict[str, Any], y: str, colors: dict[str, Any]) -> None:
    """One yardstick against task gain: a line per family, faint 95% bars, each Wise-FT merge
    labelled with its α (a curve joined by task NLL need not run in α order), the reference
    gains as dotted verticals and the base (0 forgetting) as a dashed horizontal when in view."""
    xs_all, ys_all = [], []
    for f in result["families"]:
        pts = [(p["task_gain"]["value"], p[y]["value"], p[y]["ci95"]) for p in f["points"]]
        xs, vs = [p[0] for p in pts], [p[1] for p in pts]
        xs_all += xs
        ys_all += vs + [c for _, _, ci in pts if ci for c in ci]  # bars in view: noise shows
        main = f["name"] == result["reference"]
        on = [y not in p.get("dominated", ()) for p in f["points"]]
        marker, ms = ("s" if f["wise_ft"] else "o"), 7 if main else 4 if f["wise_ft"] else 6
        ax.plot([x for x, o in zip(xs, on) if o], [v for v, o in zip(vs, on) if o],
                "--" if f["wise_ft"] else "-", marker=marker, ms=ms,
                lw=2.6 if main else 1.6, color=colors[f["name"]], zorder=4 if main else 3,
                label=f["name"] + (" (reference)" if main else ""))
        if not all(on):  # off the envelope: hollow, not joined
            ax.plot([x for x, o in zip(xs, on) if not o], [v for v, o in zip(vs, on) if not o],
                    ls="none", marker=marker, ms=ms, mfc="none", color=colors[f["name"]],
                    zorder=3)
        bars = [(x, v, ci) for x, v, ci in pts if ci]
        if bars:
            ax.errorbar([b[0] for b in bars], [b[1] for b in bars],
                        yerr=[[b[1] - b[2][0] for b in bars], [b[2][1] - b[1] for b in bars]],
                        fmt="none", ecolor=colors[f["name"]], elinewidth=1, alpha=0.35, zorder=2)
        for p, x, v in zip(f["points"], xs, vs):
            if f["wise_ft"] and p["alpha"] != 1.0:  # α = 1 is the parent, named in the legend
                ax.annotate(f"α={p['alpha']:g}", (x, v), xytext=(4, 3), textcoords="offset points",
                            fontsize=7, color=colors[f["name"]], zorder=5)
    for m in result["matched"]:
        ax.axvline(m["task_gain"], color="0.55", lw=0.9, ls=":", zorder=1)
    ax.set_xlim(*_limits(xs_all, 0.0))
    ax.set_ylim(*_limits(ys_all, 0.0))
    bottom, top = ax.get_ylim()
    if bottom <= 0.0 <= top:
        ax.axhline(0.0, color="black", lw=1.0, ls=(0, (5, 3)), zorder=1)
    up = y in HIGHER_IS_BETTER
    ax.text(0.02 if up else 0.98, 0.98 if up else 0.02,
            f"better: {'↑' if up else '↓'} at equal gain", transform=ax.transAxes,
            ha="left" if up else "right", va="top" if up else "bottom", fontsize=8, color="0.4")
    ax.set_title(LABELS[y], fontsize=10)
    ax.set_xlabel("task gain: base − model task NLL, nats per token (more →)")
    ax.grid(True, alpha=0.25)


def plot_frontier(result: dict[str, Any], path: str | os.PathLike,
                  title: str = "Trade-off curves at matched task gain") -> Path:
    """frontier.png: a panel per yardstick, two columns, one legend below. Drawn on an Agg
    canvas of our own rather than through pyplot, so a caller's backend is left alone."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ys = result["yardsticks"]
    cols = min(2, len(ys))
    rows = math.ceil(len(ys) / cols)
    fig = Figure(figsize=(6.5 * cols, 4.4 * rows + 1.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    names = [f["name"] for f in result["families"]]
    # A Wise-FT curve in its parent family's colour (dashed): they meet at the parent.
    parents = {f["name"]: f["of"] for f in result["families"] if f["of"] in names}
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]  # 7: grey
    own = [n for n in names if n != result["reference"] and n not in parents]
    colors = {result["reference"]: "black",
              **{n: palette[i % len(palette)] for i, n in enumerate(own)}}
    colors.update({n: colors.get(p, "0.5") for n, p in parents.items()
                   if n != result["reference"]})
    for ax, y in zip(axes, ys):
        _panel(ax, result, y, colors)
    for ax in axes[len(ys):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="black", lw=1.0, ls=(0, (5, 3))),
                Line2D([], [], color="0.55", lw=0.9, ls=":")]
    labels += ["base (no forgetting)", f"reference gains ({result['reference']}'s points)"]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)),
               fontsize=9, frameon=False)
    wise = any(f["wise_ft"] for f in result["families"])
    off = any(p.get("dominated") for f in result["families"] for p in f["points"])
    notes = (["dashed: Wise-FT merges, ending at their parent (α = 1)"] if wise else []) + (
        ["hollow: off the family's envelope"] if off else []) + (
        ["bars: 95% paired bootstrap"] if result["bootstrap"] else [])
    fig.suptitle(title + (f"\n({'; '.join(notes)})" if notes else ""), fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
