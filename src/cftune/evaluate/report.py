"""The comparison report: one row per metric, one column per model plus its delta to the base.

Intervals are normal 95% intervals (1.96 standard errors). A delta's interval adds the two
variances, which treats base and model as independent: conservative, since both score the same
items and their errors are positively correlated.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

from cftune import __version__
from cftune.evaluate.kl import Z95
from cftune.io import atomic_write_json, atomic_write_text
from cftune.results.metrics import higher_is_better


def _interval(value: float, se: float | None) -> list[float] | None:
    if se is None or math.isnan(se):
        return None
    return [value - Z95 * se, value + Z95 * se]


def build_entries(results: dict[str, dict[str, dict]], base: str) -> list[dict]:
    """eval.json entries: one per (model, metric) of each model's report metrics (the runner's
    names, `cftune.results.metrics`), with the difference to the base's value."""
    entries = []
    for model, metrics in results.items():
        for name, m in metrics.items():
            value, se = m["value"], m["stderr"]
            entry = {"model": model, "metric": name, "value": value, "stderr": se,
                     "ci95": m["ci95"], "n": m["n"], "higher_is_better": higher_is_better(name),
                     "compared_to": base}
            b = results.get(base, {}).get(name)
            if model != base and b is not None and value is not None:
                dse = math.hypot(se, b["stderr"]) if None not in (se, b["stderr"]) else None
                entry.update(delta=value - b["value"],
                             delta_ci95=_interval(value - b["value"], dse))
            entries.append(entry)
    return entries


def _fmt(value: float | None, se: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    text = f"{value:+.4f}" if signed else f"{value:.4f}"
    return text + (f" ±{Z95 * se:.4f}" if se is not None and not math.isnan(se) else "")


def table(entries: list[dict], models: list[str], base: str) -> list[list[str]]:
    """Rows of the comparison table (header first)."""
    label = {m: Path(m).name or m for m in models}
    header = ["metric", "n", f"{label[base]} (base)"]
    for m in models:
        if m != base:
            header += [label[m], "Δ vs base"]
    by_key = {(e["model"], e["metric"]): e for e in entries}
    metrics = list(dict.fromkeys(e["metric"] for e in entries))
    rows = [header]
    for metric in metrics:
        b = by_key.get((base, metric), {})
        n = next((e["n"] for e in entries if e["metric"] == metric), "")
        row = [metric, str(n), _fmt(b.get("value"), b.get("stderr"))]
        for m in models:
            if m == base:
                continue
            e = by_key.get((m, metric), {})
            d = e.get("delta_ci95")
            dse = (d[1] - d[0]) / (2 * Z95) if d else None
            row += [_fmt(e.get("value"), e.get("stderr")), _fmt(e.get("delta"), dse, signed=True)]
        rows.append(row)
    return rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"cftune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def write(out: Path, entries: list[dict], models: list[dict], base: str, config: dict,
          raw: dict, paired: dict | None = None, comparisons: list | None = None) -> str:
    """Write eval.json and eval.md under `out` (with the paired comparisons against the base and
    between `--compare` models); return the text table."""
    from cftune.results.tables import comparisons_markdown, paired_markdown

    out.mkdir(parents=True, exist_ok=True)
    rows = table(entries, [m["spec"] for m in models], base)
    note = ("Values ± half-width of the 95% interval (1.96 standard errors). KL(base ‖ model) in "
            "nats per sequence and per token; the Δ column treats base and model as independent; "
            "the paired tables below compare them item by item.")
    paired_rows = [{"run": spec, "metrics": m} for spec, m in (paired or {}).items()]
    atomic_write_text(out / "eval.md", f"# cftune eval\n\n{render_markdown(rows)}\n\n{note}\n\n"
                      + paired_markdown(paired_rows) + comparisons_markdown(comparisons or []))
    atomic_write_json(out / "eval.json", {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
        "base": base, "models": models, "config": config, "results": entries, "raw": raw,
        "paired": paired or {}, "comparisons": comparisons or [],
    })
    return render_text(rows)
