"""Paired comparisons of evaluated models, and averages over seeds (issue 10).

Two models scored on the same items differ item by item; what both find hard cancels out of the
per-item differences, so a paired interval resolves effects an unpaired one cannot. An evaluation
result (`cftune run`'s `result.json`) keeps, next to its `metrics`, the per-item outcomes of every
yardstick under `items`:

    {"task_acc": [bool per problem], "task_nll": [NLL per problem],
     "kl": [log p_base − log p_model per held-out sample],
     "instr_kl": [KL per instruction], "instr_ref_nll": [reference NLL per instruction],
     "bench/<name>": {"primary": "acc" | "acc_norm", "records": [run_benchmark item records]}}

`paired_metrics(ref, model)` turns two such results into report metrics of `model` against `ref`
(the base, or another run), each in the report's `{value, stderr, ci95, n}` shape plus what
explains it (flips, McNemar p, significance):

- `paired/<bench>`, `paired/task_acc`: Δ accuracy (model − ref) with Newcombe's paired interval,
  flips right→wrong / wrong→right and the exact McNemar p;
- `margin/<bench>`: mean change of the gold choice's margin over the best wrong choice;
- `paired/task_nll`, `paired/instr_ref_nll`, `paired/kl`, `paired/instr_kl`: paired mean
  differences (t interval; the KLs only between two runs: against the base they are the KL);
- `bench_paired_avg`: the mean Δ over benchmarks (the forgetting axis of the plot).

A model replicated over seeds is a list of results: each item's outcome is averaged over seeds
first, then compared (`stats.paired_over_seeds`), since per-seed comparisons share the items
and the base and are not independent. `seed_metrics` averages scalar metrics over seeds with a
t interval on seeds − 1 degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from cftune import stats
from cftune.results.metrics import BENCH_PAIRED, PAIRED_PREFIXES, RATIOS

BENCH_PREFIX = "bench/"


def _metric(stats: dict, value_key: str = "delta", **extra: Any) -> dict[str, Any]:
    return {"value": stats[value_key], "stderr": stats.get("stderr"), "ci95": stats.get("ci95"),
            "n": stats.get("n"), "significant": stats.get("significant"), **extra}


def _mean_over_seeds(lists: Sequence[Sequence[float]]) -> list[float]:
    if len({len(v) for v in lists}) != 1:
        raise ValueError("seed replicates cover different items")
    return [sum(col) / len(col) for col in zip(*lists)]


def _proportions(ref: Sequence[Sequence[bool]], model: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """Paired Δ accuracy: exact (Newcombe, McNemar) for one run each, seed-averaged otherwise."""
    if len(ref) == 1 and len(model) == 1:
        s = stats.paired_proportions(ref[0], model[0])
        return _metric(s, flips=[s["right_to_wrong"], s["wrong_to_right"]],
                       mcnemar_p=s["mcnemar_p"], unpaired_stderr=s["unpaired_stderr"])
    s = stats.paired_over_seeds([[float(x) for x in r] for r in ref],
                                 [[float(x) for x in r] for r in model])
    return _metric(s, flips=[s["flips"]["right_to_wrong"], s["flips"]["wrong_to_right"]],
                   seeds=[s["n_seeds_a"], s["n_seeds_b"]])


def _bench_records(results: Sequence[dict], name: str) -> tuple[str, list[list[dict]]]:
    """The primary metric and each seed's item records (sorted by item index) of a benchmark."""
    entries = [r["items"][name] for r in results]
    primaries = {e["primary"] for e in entries}
    if len(primaries) != 1:
        raise ValueError(f"{name}: results scored by different metrics ({', '.join(primaries)})")
    return primaries.pop(), [sorted(e["records"], key=lambda x: x["index"]) for e in entries]


def _check_items(ref: list[list[dict]], model: list[list[dict]], name: str) -> None:
    indices = {tuple(x["index"] for x in recs) for recs in ref + model}
    if len(indices) != 1:
        raise ValueError(f"{name}: the models were scored on different items")


def paired_metrics(ref: Sequence[dict], model: Sequence[dict],
                   with_kl: bool = False) -> dict[str, dict[str, Any]]:
    """Metrics of `model` paired against `ref` (each a list of results over seeds; one result
    for a single run). `with_kl` adds the paired difference of per-sample KL (between two
    fine-tuned runs; against the base it is the KL itself)."""
    if not ref or not model:
        raise ValueError("paired_metrics needs at least one result on each side")
    out: dict[str, dict[str, Any]] = {}
    names = [k for k in model[0].get("items", {}) if all(k in r.get("items", {}) for r in ref)]
    deltas = []
    for name in names:
        if name.startswith(BENCH_PREFIX):
            primary, ref_recs = _bench_records(ref, name)
            _, model_recs = _bench_records(model, name)
            _check_items(ref_recs, model_recs, name)
            bench = name[len(BENCH_PREFIX):]
            out[f"paired/{bench}"] = _proportions([[x["correct"] for x in r] for r in ref_recs],
                                                  [[x["correct"] for x in r] for r in model_recs])
            margins = [_mean_over_seeds([[stats.gold_margin(x, primary) for x in r]
                                         for r in recs]) for recs in (ref_recs, model_recs)]
            out[f"margin/{bench}"] = _metric(stats.paired_mean_difference(*margins))
            deltas.append(out[f"paired/{bench}"])
        elif name == "task_acc":
            out["paired/task_acc"] = _proportions([r["items"][name] for r in ref],
                                                  [r["items"][name] for r in model])
        elif name in ("task_nll", "instr_ref_nll") or (name in ("kl", "instr_kl") and with_kl):
            means = [_mean_over_seeds([r["items"][name] for r in side]) for side in (ref, model)]
            out[f"paired/{name}"] = _metric(stats.paired_mean_difference(*means))
    if deltas:
        se = math.sqrt(sum((d["stderr"] or 0.0) ** 2 for d in deltas)) / len(deltas)
        mean = sum(d["value"] for d in deltas) / len(deltas)
        out[BENCH_PAIRED] = {"value": mean, "stderr": se,
                                   "ci95": [mean - stats.Z95 * se, mean + stats.Z95 * se],
                                   "n": sum(d["n"] or 0 for d in deltas)}
    return out


def _per_seed(base: dict, result: dict) -> dict[str, float]:
    """The quantities of `RATIOS` for one evaluated run, in nats: task gain (the fall of the
    reference solutions' NLL below the base's), the two KLs to the base, and the rise of the
    instructions' reference NLL above the base's (gain and rise on the same items)."""
    items, ref = result.get("items", {}), base.get("items", {})
    out = {}
    if "task_nll" in items and "task_nll" in ref:
        out["ratio/task_gain"] = fmean(ref["task_nll"]) - fmean(items["task_nll"])
    if "instr_ref_nll" in items and "instr_ref_nll" in ref:
        out["ratio/instr_ref_nll_rise"] = fmean(items["instr_ref_nll"]) - fmean(ref["instr_ref_nll"])
    for name in ("kl", "instr_kl"):
        if name in result.get("metrics", {}):
            out[f"ratio/{name}"] = result["metrics"][name]["value"]
    return out


def seed_ratios(base: dict, ref: Sequence[dict], model: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """`model` as a fraction of `ref` (e.g. cfs's task gain as a fraction of full's), seed by
    seed (`ref[i]` and `model[i]` share seed i: data order and CF draw), then the mean of the
    per-seed ratios with a t interval over seeds. Why per seed: a seed's runs share their task
    batches, so their ratio cancels what that seed's data did to both."""
    if len(ref) != len(model) or not ref:
        raise ValueError("seed_ratios needs one ref and one model result per seed")
    pairs = [(_per_seed(base, r), _per_seed(base, m)) for r, m in zip(ref, model)]
    out = {}
    for name in RATIOS:
        if all(name in r and name in m and r[name] != 0 for r, m in pairs):
            s = stats.seed_interval([m[name] / r[name] for r, m in pairs])
            out[name] = {"value": s["value"], "stderr": s["stderr"] if s["n"] > 1 else None,
                         "ci95": s["ci95"], "n": s["n"]}
    return out


def seed_metrics(metric_sets: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean of each scalar metric over seed replicates with the t interval across seeds (n − 1
    degrees of freedom); metrics measured against another model are left to `paired_metrics`."""
    out: dict[str, dict[str, Any]] = {}
    for name in metric_sets[0]:
        if name.startswith(PAIRED_PREFIXES) or name == BENCH_PAIRED:
            continue
        values = [m[name]["value"] for m in metric_sets if m.get(name, {}).get("value") is not None]
        if len(values) != len(metric_sets):
            continue
        s = stats.seed_interval(values)
        out[name] = {"value": s["value"], "stderr": s["stderr"] if len(values) > 1 else None,
                     "ci95": s["ci95"], "n": len(values), "sd": s["sd"] if len(values) > 1 else None}
    return out
