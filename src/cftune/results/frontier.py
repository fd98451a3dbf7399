"""Methods' trade-off curves compared at matched task gain (issue 29).

A method trained harder gains more on the task and forgets more, so one point per method cannot
rank methods. Each method is trained at several strengths (learning rate, λ₂, merge α …): its
points, sorted by task NLL and joined by straight lines, are its trade-off curve, and curves are
compared where they reach the same task gain.

- Families. A family is a method with its sweep: a row's `family` field when it has one, else
  its run group (the run name without the seed suffix `-sN`) without a sweep suffix `-KEY=VALUE`
  (`lora-r64-learning_rate=0.003` → `lora-r64`) and, for a Wise-FT merge, without `-aALPHA`
  (`wise-kd-a0.25` → `wise-kd`). The group rather than `method`, since families share methods
  (`lora` and `lora-r64`; `cfs` and `cfs-weighted`). A Wise-FT merge at α = 1 is its parent's
  weights, the same model, so the parent's row is also its curve's α = 1 end. The α = 0 end, the
  base, is left out: no trained family reaches zero gain; the base is the plot's reference line.
  Points are the single-run rows of the lowest evaluated seed (seed 0): the `NAME (n seeds)`
  rows exist only for the replicated runs, and curves averaged over seeds in some points and not
  in others would differ in noise, not only in method.
- The curve is the family's lower envelope, per yardstick. A learning-rate sweep is not
  monotone: past the best rate a model both learns less and forgets more (cfs at 5e-4 against
  2e-4), and joining every point in order of task NLL would put that dominated point on the
  curve and make the method look worse at a gain its better rate exceeds (10.8 nats of CF KL
  interpolated where its 2e-4 point, with more gain, has 7.9). So a point another point of the
  family beats on both task NLL and the yardstick is left off that yardstick's curve: no user
  would choose it. What remains is the trade-off the family offers.
- Matched gain. A family's forgetting is interpolated linearly in task NLL, along its envelope,
  at the task NLL of each reference point (every point of the `full` family by default), for
  every yardstick. Outside the envelope's covered range [lowest task NLL of the family, highest
  of its envelope's points] it is None ("–"): a curve is never extrapolated.
- Paired bootstrap. Every model is scored on the same items, so a replicate draws each item set
  (task problems, held-out CF samples, instructions, each benchmark's items) with replacement
  once and applies that draw to every model; each model's yardsticks, the reference points' task
  NLL and every interpolation are recomputed per replicate, and the 95% interval is the
  percentile interval (the envelope too is found again in each replicate). What items share
  across models (a hard problem, a long sample) cancels in the differences. The interval is conditional on the trained models: it holds the items'
  sampling noise, not the training seed's.
- Dominance. For each pair of families A, B (the reference family first) and each yardstick:
  Δ = B − A of the forgetting, averaged over the reference gains both curves cover (one number
  per pair; per reference gain, the matched-gain table has the levels), with its interval. The
  verdict names the better family when the interval excludes 0 (lower KL or NLL rise is better,
  a higher benchmark Δ is better) and Δ is defined in at least 95% of the replicates (near a
  curve's end a replicate's reference gain can fall outside it), else "not resolved".

This module computes the numbers (frontier.json's content); `cftune.results.frontier_plot` draws
frontier.png, `cftune.results.tables.frontier_markdown` writes the Markdown section, and
`cftune.results.report.write_frontier` writes the three files beside the report.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from cftune.errors import CftuneError
from cftune.io import read_json
from cftune.results.metrics import (
    BASE,
    BENCH_PAIRED,
    INSTR_KL,
    INSTR_NLL,
    INSTR_NLL_PAIRED,
    KL,
    TASK_NLL,
)

YARDSTICKS = (KL, INSTR_KL, INSTR_NLL_PAIRED, BENCH_PAIRED)  # forgetting, in the plot's order
HIGHER_IS_BETTER = (BENCH_PAIRED,)  # Δ accuracy vs the base; the others are forgetting costs
A_BETTER, B_BETTER, NOT_RESOLVED = "A better", "B better", "not resolved"
MIN_DEFINED = 0.95  # share of replicates a Δ must be defined in for a verdict

_SEED = re.compile(r"-s\d+$")
_SWEEP = re.compile(r"-[A-Za-z_][\w.]*=[^=]+$")  # the runner's `NAME-KEY=VALUE`
_ALPHA = re.compile(r"-a[\d.eE+-]+$")  # the runner's Wise-FT `NAME-aALPHA`
_EVAL_FOLDER = re.compile(r"^(?P<run>.+)-[0-9a-f]{10}$")  # evals/RUN-HASH


# ----------------------------------------------------------------------------- families

def is_wiseft(row: dict[str, Any]) -> bool:
    return row.get("parent") is not None and row.get("alpha") is not None


def family_name(row: dict[str, Any]) -> str:
    """The family of a report row: its `family` field, else its group without the sweep (or
    Wise-FT α) suffix."""
    if row.get("family"):
        return str(row["family"])
    group = str(row.get("group") or _SEED.sub("", str(row["run"])))
    return (_ALPHA if is_wiseft(row) else _SWEEP).sub("", group)


def point_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that are curve points: one model each (no seed averages, no base), all of the
    lowest seed evaluated, each with a task NLL (its place on the curve; a report of task
    accuracy alone has no curves)."""
    single = [r for r in rows if r.get("method") != BASE and not r.get("seeds")
              and _task_nll(r) is not None]
    first = min((r["seed"] for r in single if r.get("seed") is not None), default=None)
    return [r for r in single if r.get("seed") == first]


def _task_nll(row: dict[str, Any]) -> float | None:
    return ((row.get("metrics") or {}).get(TASK_NLL) or {}).get("value")


def families(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """family → its point rows, in the rows' order; a Wise-FT family ends with its parent."""
    by_run = {r["run"]: r for r in rows}
    out: dict[str, list[dict[str, Any]]] = {}
    for r in point_rows(rows):
        out.setdefault(family_name(r), []).append(r)
    for members in out.values():
        runs = {m["run"] for m in members}
        for parent in dict.fromkeys(m["parent"] for m in members if is_wiseft(m)):
            if parent in by_run and parent not in runs and _task_nll(by_run[parent]) is not None:
                members.append(by_run[parent])  # α = 1: the merge is the parent itself
                runs.add(parent)
    return out


# ----------------------------------------------------------------------------- interpolation

def interpolate_columns(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Column j's curve (points (xs[:, j], ys[:, j]) joined in order of x) at x[j]; NaN where
    x[j] lies outside [min xs[:, j], max xs[:, j]]: never extrapolated. Shapes: x (R,),
    xs and ys (points, R)."""
    order = np.argsort(xs, axis=0, kind="stable")
    xs, ys = np.take_along_axis(xs, order, 0), np.take_along_axis(ys, order, 0)
    inside = (x >= xs[0]) & (x <= xs[-1])
    if len(xs) == 1:
        return np.where(inside, ys[0], np.nan)
    hi = np.clip((xs < x).sum(axis=0), 1, len(xs) - 1)[None]  # first point at or right of x
    x0, x1 = np.take_along_axis(xs, hi - 1, 0)[0], np.take_along_axis(xs, hi, 0)[0]
    y0, y1 = np.take_along_axis(ys, hi - 1, 0)[0], np.take_along_axis(ys, hi, 0)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(x1 > x0, (x - x0) / (x1 - x0), 0.0)
    # (1 − t)·y0 + t·y1, not y0 + t·(y1 − y0): exactly y1 at a point (t = 1), so a curve through
    # the reference model itself matches it exactly
    return np.where(inside, (1.0 - t) * y0 + t * y1, np.nan)


def dominated_columns(xs: np.ndarray, ys: np.ndarray, higher_is_better: bool = False
                      ) -> np.ndarray:
    """(points, R) booleans: point i of column j is beaten by another point of the column on
    both task NLL (lower) and the yardstick (lower forgetting, or higher where
    `higher_is_better`), one of the two strictly. NaN is never compared as better."""
    s = -ys if higher_is_better else ys
    x_i, x_j, s_i, s_j = xs[:, None], xs[None, :], s[:, None], s[None, :]
    beats = (x_j <= x_i) & (s_j <= s_i) & ((x_j < x_i) | (s_j < s_i))  # [i, j, R]
    return beats.any(axis=1)


def envelope_columns(x: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                     higher_is_better: bool = False) -> np.ndarray:
    """`interpolate_columns` along each column's lower envelope: its dominated points
    (`dominated_columns`) are replaced by a copy of its lowest-NLL point, which is on the
    envelope and, repeated, changes neither the joined curve nor its lower end; the covered
    range ends at the envelope's highest task NLL."""
    off = dominated_columns(xs, ys, higher_is_better)
    s = -ys if higher_is_better else ys
    first = np.lexsort((s, xs), axis=0)[0][None]  # lowest NLL, then best value: never dominated
    xs = np.where(off, np.take_along_axis(xs, first, 0), xs)
    ys = np.where(off, np.take_along_axis(ys, first, 0), ys)
    return interpolate_columns(x, xs, ys)


def interpolate(x: float, points: Sequence[tuple[float, float]],
                higher_is_better: bool = False) -> float | None:
    """The family's curve (the lower envelope of `points`, (task NLL, forgetting) pairs) at
    task NLL `x`, or None outside its range."""
    xs, ys = (np.array([[p[i]] for p in points], dtype=float) for i in (0, 1))
    v = envelope_columns(np.array([x], dtype=float), xs, ys, higher_is_better)[0]
    return None if math.isnan(v) else float(v)


# ----------------------------------------------------------------------------- item scores

def _vector(result: dict[str, Any], name: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in result["items"][name]], dtype=float)


def _bench_correct(result: dict[str, Any], name: str) -> tuple[tuple[int, ...], np.ndarray]:
    records = sorted(result["items"][name]["records"], key=lambda x: x["index"])
    return tuple(x["index"] for x in records), np.array([float(x["correct"]) for x in records])


def _stack(vectors: list[np.ndarray], name: str) -> np.ndarray:
    if len({v.shape for v in vectors}) != 1:
        raise CftuneError(f"{name}: the models were scored on different numbers of items; "
                          "re-evaluate them on one item set")
    return np.vstack(vectors)


def item_quantities(results: Sequence[dict[str, Any]], base: dict[str, Any]
                    ) -> dict[str, tuple[str, np.ndarray]]:
    """name → (item set, per-item values: models × items) for each yardstick measured in every
    result (`cftune.experiment` eval results' `items`): the models' mean per item is the
    yardstick. TASK_NLL has the base as its last row; the instruction NLL rise and each
    benchmark's Δ accuracy are paired differences to the base, item by item. The two
    instruction yardsticks share one item set when they cover the same instructions."""
    every = [*results, base]

    def measured(key: str, among: Sequence[dict[str, Any]] = every) -> bool:
        return all(key in r.get("items", {}) for r in among)

    if not measured(TASK_NLL):
        raise CftuneError("the evaluations hold no per-problem task NLL (`items.task_nll`); "
                          "re-evaluate them with the current cftune")
    out = {TASK_NLL: ("task", _stack([_vector(r, TASK_NLL) for r in every], TASK_NLL))}
    for name, item_set in ((KL, "kl"), (INSTR_KL, "instr")):
        if measured(name, results):  # against the base already: its own is 0
            out[name] = (item_set, _stack([_vector(r, name) for r in results], name))
    if measured(INSTR_NLL):
        nll = _stack([_vector(r, INSTR_NLL) for r in every], INSTR_NLL)
        same = INSTR_KL in out and out[INSTR_KL][1].shape[1] == nll.shape[1]
        out[INSTR_NLL_PAIRED] = ("instr" if same else "instr_ref", nll[:-1] - nll[-1])
    for name in sorted(k for k in base["items"] if k.startswith("bench/") and measured(k)):
        scored = [_bench_correct(r, name) for r in every]
        if len({indices for indices, _ in scored}) != 1:
            raise CftuneError(f"{name}: the models were scored on different items")
        correct = np.vstack([c for _, c in scored])
        out[name] = (name, correct[:-1] - correct[-1])
    return out


def bootstrap_counts(size: int, replicates: int, seed: int, item_set: str) -> np.ndarray:
    """(replicates + 1, size): how often each item is drawn. Row 0 is the data itself (each
    item once), rows 1… draws with replacement, seeded by (seed, item set) so that a set's draws
    do not depend on which other sets were measured."""
    rng = np.random.default_rng([seed, zlib.crc32(item_set.encode())])
    draws = rng.integers(0, size, size=(replicates, size)) + size * np.arange(replicates)[:, None]
    counts = np.bincount(draws.ravel(), minlength=replicates * size).reshape(replicates, size)
    return np.vstack([np.ones((1, size)), counts])


def replicate_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(models, replicates + 1): each model's mean over the drawn items, an item counted as often
    as drawn; items without a value (NaN: an instruction with no response) are skipped."""
    known = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(known, values, 0.0) @ counts.T) / (known.astype(float) @ counts.T)


def bootstrap_values(quantities: Mapping[str, tuple[str, np.ndarray]], replicates: int,
                     seed: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(yardstick → (models, replicates + 1) values, item set → its size). One draw per item
    set serves every model and every quantity on that set: the replicates are paired."""
    sizes = {item_set: m.shape[1] for item_set, m in quantities.values()}
    counts = {s: bootstrap_counts(n, replicates, seed, s) for s, n in sizes.items()}
    means = {name: replicate_means(m, counts[s]) for name, (s, m) in quantities.items()}
    bench = [v for name, v in means.items() if name.startswith("bench/")]
    if bench:  # the report's bench_paired_avg: the mean over benchmarks of the paired Δ
        means[BENCH_PAIRED] = np.mean(bench, axis=0)
    return {k: v for k, v in means.items() if not k.startswith("bench/")}, sizes


def stored_value(row: dict[str, Any], name: str, base: dict[str, Any]) -> float | None:
    """A row's reported value of `name`; the instruction NLL rise from the rows' NLLs where the
    row has no paired value."""
    m = (row.get("metrics") or {}).get(name) or {}
    if m.get("value") is not None:
        return float(m["value"])
    if name == INSTR_NLL_PAIRED:
        a, b = (stored_value(r, INSTR_NLL, base) for r in (row, base))
        return None if a is None or b is None else a - b
    return None


def stored_values(models: Sequence[dict[str, Any]], base: dict[str, Any]) -> dict[str, np.ndarray]:
    """The reported values as (models, 1) arrays (no replicates); TASK_NLL with the base last."""
    def column(rows: Sequence[dict[str, Any]], name: str) -> np.ndarray:
        return np.array([[np.nan if (v := stored_value(r, name, base)) is None else v]
                         for r in rows], dtype=float)

    return {TASK_NLL: column([*models, base], TASK_NLL),
            **{y: column(models, y) for y in YARDSTICKS}}


def check_reproduced(values: Mapping[str, np.ndarray], models: Sequence[dict[str, Any]],
                     base: dict[str, Any], tolerance: float = 1e-9) -> None:
    """The per-item means (column 0) must equal the reported values: otherwise the evaluation
    read is not the one the report shows (a stale folder), and its intervals would be wrong."""
    for name, v in values.items():
        for row, mine in zip([*models, base] if name == TASK_NLL else models, v[:, 0]):
            reported = stored_value(row, name, base)
            if reported is not None and not abs(mine - reported) <= tolerance * max(
                    1.0, abs(reported)):
                raise CftuneError(f"{row['run']}: {name} from the per-item scores is {mine:.6g} "
                                  f"but the report says {reported:.6g}; the evaluation found is "
                                  "not the one reported")


def load_evals(folder: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> dict[str, dict]:
    """Each row's evaluation result from an `evals/` stage folder (`RUN-HASH/result.json`);
    where a run was evaluated under several settings, the one whose metrics are the row's."""
    folder = Path(folder)
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*/result.json")):
        m = _EVAL_FOLDER.match(path.parent.name)
        if m:
            found.setdefault(m["run"], []).append(path)
    out = {}
    keys = (TASK_NLL, KL, INSTR_KL, INSTR_NLL)
    for row in rows:
        mine = {k: ((row.get("metrics") or {}).get(k) or {}).get("value") for k in keys}
        for path in found.get(row["run"], []):
            result = read_json(path)
            if all(v is None or (result["metrics"].get(k) or {}).get("value") == v
                   for k, v in mine.items()):
                out[row["run"]] = result
                break
        else:
            raise CftuneError(f"{folder}: no evaluation of {row['run']} with the metrics of the "
                              "report (RUN-HASH/result.json); give the stages' evals/ folder")
    return out


# ----------------------------------------------------------------------------- the comparison

def summarize(samples: np.ndarray) -> dict[str, Any]:
    """{value, ci95, defined}: column 0 is the estimate, the others replicates; `ci95` is the
    2.5–97.5 percentile range of the replicates where defined, `defined` their share (None
    without replicates). NaN = not defined (outside a curve's range)."""
    reps = samples[1:]
    finite = reps[np.isfinite(reps)]
    value = None if math.isnan(samples[0]) else float(samples[0])
    ci = None if value is None or not finite.size else [
        float(c) for c in np.percentile(finite, [2.5, 97.5])]
    return {"value": value, "ci95": ci, "defined": finite.size / reps.size if reps.size else None}


def verdict(delta: dict[str, Any], yardstick: str) -> str:
    """"A better" / "B better" for Δ = B − A when its interval excludes 0 and Δ is defined in
    enough replicates, else "not resolved". Lower forgetting is better except for the
    benchmark Δ, where higher is."""
    ci = delta.get("ci95")
    if ci is None or (delta.get("defined") or 0.0) < MIN_DEFINED or ci[0] <= 0.0 <= ci[1]:
        return NOT_RESOLVED
    b_higher = ci[0] > 0.0
    return B_BETTER if b_higher == (yardstick in HIGHER_IS_BETTER) else A_BETTER


def _dominance(order: list[str], refs: list[str], yardsticks: list[str],
               matched: dict[tuple[str, str, str], np.ndarray]) -> list[dict[str, Any]]:
    """Each pair's Δ = B − A averaged over the reference gains both cover at the estimate; a
    replicate where one of them falls outside a curve leaves the Δ undefined (NaN)."""
    out = []
    for a, b in combinations(order, 2):
        for y in yardsticks:
            shared = [r for r in refs if not math.isnan(matched[r, a, y][0])
                      and not math.isnan(matched[r, b, y][0])]
            if not shared:
                continue
            delta = summarize(np.mean([matched[r, b, y] - matched[r, a, y] for r in shared], 0))
            v = verdict(delta, y)
            out.append({"a": a, "b": b, "yardstick": y, "references": shared, **delta,
                        "verdict": v, "winner": {A_BETTER: a, B_BETTER: b}.get(v)})
    return out


def _family(name: str, rows_f: list[int], members: list[dict[str, Any]],
            values: Mapping[str, np.ndarray], yardsticks: list[str]) -> dict[str, Any]:
    """A family's points, by decreasing task NLL (increasing gain), each with the yardsticks on
    which it is off the envelope (`dominated`), the range of its points and, per yardstick, the
    task gain its envelope covers (where matched values exist). In a Wise-FT family the parent
    is the α = 1 point."""
    task, base_task = values[TASK_NLL][:-1], values[TASK_NLL][-1]
    x = task[rows_f, 0]
    off = {y: dominated_columns(x[:, None], values[y][rows_f, :1], y in HIGHER_IS_BETTER)[:, 0]
           for y in yardsticks}
    wise = any(is_wiseft(m) for m in members)
    points = [{"run": m["run"],
               "alpha": m.get("alpha") if is_wiseft(m) else 1.0 if wise else None,
               "task_nll": summarize(task[i]), "task_gain": summarize(base_task - task[i]),
               **{y: summarize(values[y][i]) for y in yardsticks},
               "dominated": [y for y in yardsticks if off[y][k]]}
              for k, (i, m) in enumerate(zip(rows_f, members))]
    points.sort(key=lambda p: -p["task_nll"]["value"])
    nll = [p["task_nll"]["value"] for p in points]
    gain = float(base_task[0]) - x
    parent = next((family_name(m) for m in members if wise and not is_wiseft(m)), None)
    return {"name": name, "wise_ft": wise, "of": parent, "points": points,
            "task_nll_range": [min(nll), max(nll)],
            "task_gain_range": [float(base_task[0]) - max(nll), float(base_task[0]) - min(nll)],
            "covered_gain": {y: [float(gain[~off[y]].min()), float(gain.max())]
                             for y in yardsticks}}


def _measure(models: list[dict[str, Any]], base: dict[str, Any],
             evals: Mapping[str, dict[str, Any]] | str | os.PathLike | None, replicates: int,
             seed: int) -> tuple[dict[str, np.ndarray], dict[str, int] | None]:
    """(quantity → (models, replicates + 1) values, item set sizes): bootstrapped from the
    per-item scores, or the reported values alone (no replicates, no sizes) without `evals`."""
    if evals is None:
        return stored_values(models, base), None
    if not isinstance(evals, Mapping):
        evals = load_evals(evals, [*models, base])
    missing = [r["run"] for r in [*models, base] if r["run"] not in evals]
    if missing:
        raise CftuneError(f"no evaluation result for {', '.join(missing)}")
    quantities = item_quantities([evals[r["run"]] for r in models], evals[base["run"]])
    values, sizes = bootstrap_values(quantities, replicates, seed)
    check_reproduced(values, models, base)
    return values, sizes


def frontier(rows: Sequence[dict[str, Any]],
             evals: Mapping[str, dict[str, Any]] | str | os.PathLike | None = None,
             reference: str = "full", replicates: int = 1000, seed: int = 0
             ) -> dict[str, Any] | None:
    """The curves, the matched-gain table and the dominance table (frontier.json's content), or
    None when no family has more than one point. `evals`: run → eval result (with per-item
    `items`), or the stages' evals/ folder; without it the reported values are used and there
    are no intervals. `reference`: the family whose points are the matched gains (the family
    with the most points when there is none of that name)."""
    fams = families(rows)
    base = next((r for r in rows if r.get("method") == BASE), None)
    if not any(len(points) > 1 for points in fams.values()):
        return None
    if base is None or _task_nll(base) is None:
        raise CftuneError("the report has no base row with a task NLL: task gain is measured "
                          "against the base")
    ref = reference if reference in fams else max(fams, key=lambda f: len(fams[f]))
    order = [ref, *(f for f in fams if f != ref)]
    models = list({r["run"]: r for f in order for r in fams[f]}.values())
    values, sizes = _measure(models, base, evals, replicates, seed)
    yardsticks = [y for y in YARDSTICKS if y in values and not np.isnan(values[y][:, 0]).any()]
    task, base_task = values[TASK_NLL][:-1], values[TASK_NLL][-1]
    index = {r["run"]: i for i, r in enumerate(models)}
    refs = [r["run"] for r in sorted(fams[ref], key=lambda r: -task[index[r["run"]], 0])]
    matched = {}
    for f in order:
        rows_f = [index[r["run"]] for r in fams[f]]
        for r in refs:
            for y in yardsticks:
                matched[r, f, y] = envelope_columns(task[index[r]], task[rows_f],
                                                    values[y][rows_f], y in HIGHER_IS_BETTER)

    return {
        "reference": ref, "seed": next((r.get("seed") for r in point_rows(rows)), None),
        "yardsticks": yardsticks, "base": {"run": base["run"], "task_nll": float(base_task[0])},
        "bootstrap": None if sizes is None else {
            "replicates": replicates, "seed": seed, "interval": "95% percentile",
            "item_sets": sizes, "min_defined": MIN_DEFINED},
        "families": [_family(f, [index[r["run"]] for r in fams[f]], fams[f], values, yardsticks)
                     for f in order],
        "matched": [{"reference": r, "task_nll": float(task[index[r], 0]),
                     "task_gain": float(base_task[0] - task[index[r], 0]),
                     "values": {f: {y: summarize(matched[r, f, y]) for y in yardsticks}
                                for f in order}} for r in refs],
        "dominance": _dominance(order, refs, yardsticks, matched),
    }
