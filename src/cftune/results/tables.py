"""The report's tables: every run's metrics with its difference to the base, the paired
comparisons with their intervals, as Markdown, CSV and a terminal table; and the trade-off curves
at matched task gain (`cftune.results.frontier`) as Markdown.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from typing import Any, TextIO

from cftune.results.frontier import HIGHER_IS_BETTER, MIN_DEFINED, NOT_RESOLVED
from cftune.results.metrics import (
    BENCH_PAIRED,
    MISSING,
    RATIOS,
    VERSUS_BASE,
    base_row,
    delta,
    metric,
    metric_names,
    order_rows,
)


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


def _fmt_summary(s: dict[str, Any], sign: bool = False) -> str:
    """`35.2 [33.2, 37.3]`; the interval shares the value's precision."""
    if s["value"] is None:
        return MISSING
    digits = _digits(s["value"])

    def number(x: float) -> str:
        return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"

    ci = s["ci95"]
    return number(s["value"]) + (f" [{number(ci[0])}, {number(ci[1])}]" if ci else "")


def _better(y: str) -> str:
    return "higher is better" if y in HIGHER_IS_BETTER else "lower is better"


def _verdict_text(d: dict[str, Any]) -> str:
    """The winner's name, or why not: the interval covers 0, or Δ is too often undefined."""
    if d["winner"]:
        return f"**{d['winner']}**"
    if d["defined"] is not None and d["defined"] < MIN_DEFINED:
        return f"{NOT_RESOLVED} (defined in {d['defined']:.0%} of replicates)"
    return NOT_RESOLVED


def _off_curve(family: dict[str, Any], yardsticks: list[str]) -> str:
    """The family's dominated points and the yardsticks they are dominated on ("all" when
    every one), or –."""
    off = [f"{p['run']} ("
           f"{'all' if len(p['dominated']) == len(yardsticks) else ', '.join(p['dominated'])})"
           for p in family["points"] if p.get("dominated")]
    return "; ".join(off) or MISSING


def frontier_markdown(result: dict[str, Any]) -> str:
    """frontier.md (`cftune.results.frontier`'s result as Markdown): each family's covered
    range, every yardstick at the reference gains, and the dominance table (pairs that share a
    reference gain)."""
    ref, boot, ys = result["reference"], result["bootstrap"], result["yardsticks"]
    how = (f"95% paired bootstrap intervals ({boot['replicates']} replicates over the items, "
           f"seed {boot['seed']})" if boot else "no intervals (no per-item scores)")
    out = ["## Trade-off curves at matched task gain\n",
           f"A family is a method with its sweep (seed-{result['seed']} runs; a Wise-FT curve "
           "ends at its parent, α = 1). Each family's forgetting is interpolated linearly in task "
           f"NLL at the task gain of every `{ref}` point along its lower envelope (a point another "
           "point of the family beats on both task gain and the yardstick is off the curve: a "
           "learning rate past the best both learns less and forgets more), never extrapolated "
           f"({MISSING} = outside the envelope's range); {how}. Task gain = base's task NLL − "
           "model's, nats per token.\n",
           "| family | points | task gain of the points | off the curve (on) |",
           "|---|---:|---:|---|"]
    out += [f"| {f['name']} | {len(f['points'])} | {fmt_number(f['task_gain_range'][0])} – "
            f"{fmt_number(f['task_gain_range'][1])} | {_off_curve(f, ys)} |"
            for f in result["families"]]
    refs = result["matched"]
    reaching = [f["name"] for f in result["families"]
                if any(m["values"][f["name"]][y]["value"] is not None for m in refs for y in ys)]
    for y in ys:
        out += ["", f"**{y}** at matched gain ({_better(y)})\n",
                "| family | " + " | ".join(f"{m['reference']} (gain {fmt_number(m['task_gain'])})"
                                          for m in refs) + " |",
                "|---|" + "---:|" * len(refs)]
        out += [f"| {f} | " + " | ".join(_fmt_summary(m["values"][f][y]) for m in refs) + " |"
                for f in reaching]
    others = [f["name"] for f in result["families"] if f["name"] not in reaching]
    if others:
        out += ["", f"Reaching none of the reference gains: {', '.join(others)}."]
    out += ["", "**Dominance at matched gain**: Δ = B − A averaged over the reference gains both "
            "curves cover, and the better family where the interval excludes 0 (Δ defined in "
            f"≥ {MIN_DEFINED:.0%} of the replicates).\n",
            "| A | B | gains | " + " | ".join(ys) + " |", "|---|---|---:|" + "---|" * len(ys)]
    pairs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for d in result["dominance"]:
        pairs.setdefault((d["a"], d["b"]), {})[d["yardstick"]] = d
    for (a, b), by_y in pairs.items():
        cells = [_fmt_summary(by_y[y], sign=True) + f" {_verdict_text(by_y[y])}"
                 if y in by_y else MISSING for y in ys]
        n = max(len(d["references"]) for d in by_y.values())
        out.append(f"| {a} | {b} | {n} | " + " | ".join(cells) + " |")
    if not pairs:
        out.append(f"| {MISSING} | {MISSING} | 0 |" + f" {MISSING} |" * len(ys))
    return "\n".join(out) + "\n"
