"""The report's vocabulary: metric names, the row schema every table and plot reads, and the
accessors (`value`, `delta`) they share.

The point of cftune is a trade-off: task gain against forgetting. Every run is a row with its
metrics; tables give each with its difference to the base model, plots put the task axis
(accuracy, or the reference solutions' NLL where accuracy is too coarse) against each forgetting
yardstick, like Figure 1 of arXiv 2505.13811.

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

from typing import Any

BASE = "base"
TASK, TASK_NLL, KL, BENCH = "task_acc", "task_nll", "kl", "bench_avg"
INSTR_KL, INSTR_NLL, BENCH_PAIRED = "instr_kl", "instr_ref_nll", "bench_paired_avg"
INSTR_NLL_PAIRED = "paired/instr_ref_nll"  # its rise over the base's, paired per prompt
# A run's quantity as a fraction of another run's, seed by seed (`cftune.results.compare.seed_ratios`).
RATIOS = ("ratio/task_gain", "ratio/kl", "ratio/instr_kl", "ratio/instr_ref_nll_rise")
PAIRED_PREFIXES = ("paired/", "margin/")  # measured against another model: tables of their own
TASK_AXES = (TASK, TASK_NLL)  # what the plot's y axis may show
# A plot panel each, when measured. The reference NLL is drawn as its paired rise over the
# base's: its spread over prompts (±0.15) would hide differences of 0.2 that pairing resolves.
FORGETTING_AXES = (KL, INSTR_KL, INSTR_NLL_PAIRED, BENCH_PAIRED)
METRIC_ORDER = (TASK, TASK_NLL, KL, "kl_per_token", INSTR_KL, INSTR_NLL, BENCH, BENCH_PAIRED)
# Already measured against the base (0 for the base itself): a Δ column would repeat them.
VERSUS_BASE = (KL, "kl_per_token", "stream_capped", INSTR_KL, BENCH_PAIRED)
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


def higher_is_better(name: str) -> bool:
    """Accuracies (the task's, each benchmark's, their mean) rise with quality; every other
    metric (KLs, NLLs, perplexity) falls."""
    return name in (TASK, BENCH) or name.startswith("bench/")
