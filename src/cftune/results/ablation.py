"""The ablation plot: one setting on x (CF temperature, λ, mixing ratio, where samples start),
task gain and every forgetting yardstick on y, one curve per method, 95% intervals drawn.

Why a plot of its own: the trade-off plot answers "which method", this one "which value of a
knob". Rows are the report's (`cftune.results.metrics`); the runner gives a cfs/kd row `x` (its value of
the config's `ablation` setting) and `curve` (method and mode). Rows without `x` (the base,
`full`) are drawn as horizontal references: the base is 0 on every Δ panel, `full` a dashed
line with its interval as a band, so each point reads as "how much of full's forgetting is
left".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cftune.results.metrics import BASE, BENCH_PAIRED, INSTR_KL, KL, order_rows, value
from cftune.results.plots import ci_error, plotted_rows

ABLATION_PNG = "ablation.png"
PANELS = (  # (metric, title): task gain first, then forgetting, each only when measured
    ("paired/task_nll", "Task: Δ reference NLL vs base\n(lower = more gain)"),
    (KL, "KL(base‖model) on CF samples\n(nats per sample)"),
    (INSTR_KL, "KL(base‖model) on instruction\nresponses (nats per response)"),
    ("paired/instr_ref_nll", "Instructions: Δ reference NLL\nvs base"),
    (BENCH_PAIRED, "Benchmarks: mean paired Δ\naccuracy vs base"),
)


def _positions(xs: list[Any]) -> tuple[dict[Any, float], bool]:
    """x value -> position: the values themselves when all are numbers, else their order
    (a switch such as `chat` is a category)."""
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    ordered = sorted(set(xs), key=lambda v: (str(type(v)), v))
    return ({x: float(x) for x in ordered} if numeric
            else {x: float(i) for i, x in enumerate(ordered)}), numeric


def plot_ablation(rows: list[dict[str, Any]], path: str | os.PathLike, setting: str,
                  title: str | None = None) -> Path | None:
    """Write the ablation plot of the rows that carry `x`; None when none does."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = plotted_rows(order_rows(rows))
    points = [r for r in rows if "x" in r]
    if not points:
        return None
    refs = [r for r in rows if "x" not in r and r.get("method") != BASE]
    panels = [(m, t) for m, t in PANELS if any(value(r, m) is not None for r in points)]
    pos, numeric = _positions([r["x"] for r in points])
    fig = Figure(figsize=(max(3.6 * len(panels), 6.5), 3.8), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    palette = colormaps["tab10"].colors
    curves = list(dict.fromkeys(r["curve"] for r in points))
    for ax, (name, panel_title) in zip(axes, panels):
        ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)  # the base
        for j, ref in enumerate(refs):
            v = value(ref, name)
            if v is None:
                continue
            lo, hi = ci_error(ref, name)
            ax.axhline(v, color="0.3", ls=("--", ":", "-.")[j % 3], lw=1, label=ref["run"])
            ax.axhspan(v - lo, v + hi, color="0.3", alpha=0.08, lw=0)
        for i, curve in enumerate(curves):
            mine = sorted((r for r in points if r["curve"] == curve and value(r, name) is not None),
                          key=lambda r: pos[r["x"]])
            if not mine:
                continue
            errors = list(zip(*[ci_error(r, name) for r in mine]))
            ax.errorbar([pos[r["x"]] for r in mine], [value(r, name) for r in mine], yerr=errors,
                        color=palette[i % len(palette)], marker="o", ms=4, capsize=3, lw=1.2,
                        label=curve)
        if not numeric:
            ax.set_xticks(list(pos.values()), [str(x) for x in pos])
            ax.set_xlim(-0.5, len(pos) - 0.5)
        ax.set_xlabel(setting)
        ax.set_title(panel_title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title or f"Ablation of {setting} (95% intervals; base at 0; lines: "
                 f"{', '.join(r['run'] for r in refs) or 'none'})", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
