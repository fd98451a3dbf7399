"""Paired statistics: did model B change on the items model A was scored on?

Two models scored on the same benchmark items make correlated errors: most items are right (or
wrong) for both. Comparing their accuracies as if independent (the variance of the difference =
the sum of the variances) wastes that: the paired interval is often half as wide (issue 10). And
per-item flips say more than a difference of means: a fine-tuned model can lose 30 items and gain
25, a net −0.01 that hides real forgetting (arXiv 2510.17776 counts these flips).

Everything here is a pure function of per-item outcomes (no torch), so the report can recompute
it from stored per-item records (`run_benchmark(...)["items"]`):

- `paired_proportions`: Δacc, flips, exact McNemar p, Newcombe's paired score interval;
- `margin_change`: the mean change of the gold choice's margin over the best wrong choice, a
  smooth score that moves before accuracy does;
- `compare_benchmark`: both, for two `run_benchmark` results;
- `clustered_mean`: a mean whose observations come in clusters (responses per prompt);
- `t_quantile`, `seed_interval`: intervals across a few seeds with n − 1 degrees of freedom;
- `paired_over_seeds`: paired statistics of per-item outcomes averaged over seeds first.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence
from math import comb, lgamma

from cftune.errors import CftuneError

Z95 = statistics.NormalDist().inv_cdf(0.975)  # 1.959964…


# ---------------------------------------------------------------- single and paired proportions


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (Wilson 1927): unlike the normal interval it
    stays inside [0, 1] and keeps its coverage at 0/n and n/n, where flips and errors are few."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: under "no change" each of the b + c discordant items
    (flips) is equally likely to go either way, so min(b, c) is Binomial(b + c, 1/2); p = twice
    its lower tail, capped at 1 (p = 1 when nothing flipped). Exact because flips are few."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers, one correctly rounded division


def _phi(both: int, only_b: int, only_a: int, neither: int) -> float:
    """Newcombe's continuity-corrected phi (correlation of the two outcomes): the numerator
    ad − bc is reduced by n/2 when positive (and set to 0 if that makes it negative), left as is
    when negative; 0 when a margin is empty."""
    n = both + only_b + only_a + neither
    margins = (both + only_b) * (only_a + neither) * (both + only_a) * (only_b + neither)
    if margins == 0:
        return 0.0
    num = both * neither - only_b * only_a
    if num > n / 2:
        num -= n / 2
    elif num > 0:
        num = 0
    return num / math.sqrt(margins)


def newcombe_paired_interval(both: int, only_b: int, only_a: int, neither: int,
                             z: float = Z95) -> tuple[float, float]:
    """Interval for p_B − p_A from paired 0/1 outcomes: Newcombe's method 10 (Newcombe 1998,
    "Improved confidence intervals for the difference between binomial proportions based on
    paired data", Stat Med 17:2635), the hybrid score interval: Wilson intervals (l, u) of the two
    marginal proportions combined with the continuity-corrected phi,

        L = Δ − sqrt((p_B − l_B)² − 2φ(p_B − l_B)(u_A − p_A) + (u_A − p_A)²)
        U = Δ + sqrt((p_A − l_A)² − 2φ(p_A − l_A)(u_B − p_B) + (u_B − p_B)²).

    Chosen because it keeps its coverage when flips are few (a handful of discordant items out of
    hundreds), where the normal (Wald) interval is too narrow; it never leaves [−1, 1].
    Cells: `both` right, `only_b` right for B only (wrong→right), `only_a` right for A only
    (right→wrong), `neither`."""
    n = both + only_b + only_a + neither
    if n <= 0:
        raise ValueError("newcombe_paired_interval needs at least one item")
    p_b, p_a = (both + only_b) / n, (both + only_a) / n
    l_b, u_b = wilson_interval(both + only_b, n, z)
    l_a, u_a = wilson_interval(both + only_a, n, z)
    phi = _phi(both, only_b, only_a, neither)
    lower = math.sqrt(max(0.0, (p_b - l_b) ** 2 - 2 * phi * (p_b - l_b) * (u_a - p_a) + (u_a - p_a) ** 2))
    upper = math.sqrt(max(0.0, (p_a - l_a) ** 2 - 2 * phi * (p_a - l_a) * (u_b - p_b) + (u_b - p_b) ** 2))
    delta = p_b - p_a
    return max(-1.0, delta - lower), min(1.0, delta + upper)


def paired_proportions(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Compare two models' 0/1 outcomes on the same items (aligned lists).

    Returns `acc_a`, `acc_b`, `delta` (= acc_b − acc_a), `right_to_wrong` (b: right for A, wrong
    for B), `wrong_to_right` (c), `mcnemar_p` (exact), `ci95` (Newcombe's paired interval),
    `significant` (the interval excludes 0), `stderr` (the paired normal SE, sd of the per-item
    differences / √n, for comparison only) and `unpaired_stderr` (the binomial SEs added in
    quadrature, what an unpaired comparison would use), `n`.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired outcomes need equal lengths ({len(correct_a)} vs {len(correct_b)})")
    n = len(correct_a)
    if n == 0:
        raise ValueError("paired_proportions needs at least one item")
    both = sum(1 for a, b in zip(correct_a, correct_b) if a and b)
    only_a = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    only_b = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    neither = n - both - only_a - only_b
    acc_a, acc_b = (both + only_a) / n, (both + only_b) / n
    lo, hi = newcombe_paired_interval(both, only_b, only_a, neither)
    delta = acc_b - acc_a
    diff_var = ((only_a + only_b) / n - delta**2) * n / (n - 1) if n > 1 else float("nan")
    unpaired = [p * (1 - p) / (n - 1) if n > 1 else float("nan") for p in (acc_a, acc_b)]
    return {"n": n, "acc_a": acc_a, "acc_b": acc_b, "delta": delta, "ci95": [lo, hi],
            "significant": lo > 0 or hi < 0, "right_to_wrong": only_a, "wrong_to_right": only_b,
            "mcnemar_p": mcnemar_p(only_a, only_b),
            "stderr": math.sqrt(max(0.0, diff_var) / n), "unpaired_stderr": math.sqrt(sum(unpaired))}


# ---------------------------------------------------------------- means with paired / clustered SEs


def _t_interval(mean: float, se: float, df: float, level: float = 0.95) -> list[float] | None:
    if df < 1 or math.isnan(se):
        return None
    q = t_quantile(0.5 + level / 2, df)
    return [mean - q * se, mean + q * se]


def paired_mean_difference(values_a: Sequence[float], values_b: Sequence[float]) -> dict:
    """Mean of the per-item differences b − a, its paired SE (sd of the differences / √n) and a
    t interval (n − 1 degrees of freedom): each item is its own control, so what both models find
    hard cancels out of the differences."""
    if len(values_a) != len(values_b):
        raise ValueError(f"paired values need equal lengths ({len(values_a)} vs {len(values_b)})")
    n = len(values_a)
    if n == 0:
        raise ValueError("paired_mean_difference needs at least one item")
    diffs = [b - a for a, b in zip(values_a, values_b)]
    delta = sum(diffs) / n
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
    ci = _t_interval(delta, se, n - 1)
    return {"n": n, "mean_a": sum(values_a) / n, "mean_b": sum(values_b) / n, "delta": delta,
            "stderr": se, "ci95": ci, "significant": bool(ci and (ci[0] > 0 or ci[1] < 0))}


def clustered_mean(values: Sequence[float], clusters: Sequence[Hashable]) -> dict:
    """Mean over all observations with a cluster-robust SE: the sd of the per-cluster means /
    √(number of clusters), and a t interval on clusters − 1 degrees of freedom.

    Several responses drawn for one prompt share that prompt's difficulty, so they are not
    independent: the SE over responses would be too small. Clusters (e.g. prompts) are the
    independent units. With equal cluster sizes the mean over observations equals the mean of
    the cluster means."""
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    if not values:
        raise ValueError("clustered_mean needs at least one value")
    groups: dict[Hashable, list[float]] = {}
    for v, c in zip(values, clusters):
        groups.setdefault(c, []).append(v)
    means = [sum(g) / len(g) for g in groups.values()]
    k = len(means)
    value = sum(values) / len(values)
    se = statistics.stdev(means) / math.sqrt(k) if k > 1 else float("nan")
    return {"value": value, "stderr": se, "ci95": _t_interval(value, se, k - 1), "n": len(values),
            "n_clusters": k}


# ---------------------------------------------------------------- the gold-margin score


def gold_margin(record: dict, primary: str) -> float:
    """Score of the gold choice minus the best wrong choice's, scored as the primary metric
    ranks choices (acc: summed log-likelihood; acc_norm: log-likelihood / UTF-8 byte length, as
    lm-eval normalises). Positive = answered right. Moves smoothly while accuracy moves in steps
    of 1/n. With one choice (last word) it is the answer's log-likelihood itself."""
    lls = record["logliks"]
    if primary == "acc_norm":
        scores = [ll / length for ll, length in zip(lls, record["lengths"])]
    elif primary == "acc":
        scores = list(lls)
    else:
        raise ValueError(f"unknown primary metric {primary!r} (acc or acc_norm)")
    gold = record["gold"]
    wrong = [s for i, s in enumerate(scores) if i != gold]
    return scores[gold] - max(wrong) if wrong else scores[gold]


def pair_items(items_a: Sequence[dict], items_b: Sequence[dict]) -> list[tuple[dict, dict]]:
    """Per-item records of two runs matched by item `index`. Different item sets (another
    --limit or seed, another file) cannot be paired: a one-line error says so."""
    by_index = {r["index"]: r for r in items_b}
    indices_a = [r["index"] for r in items_a]
    if set(indices_a) != set(by_index) or len(indices_a) != len(items_b):
        raise CftuneError(f"cannot pair results scored on different items ({len(items_a)} vs "
                          f"{len(items_b)} items, {len(set(indices_a) ^ set(by_index))} ids differ);"
                          " evaluate both with the same benchmark file, --limit and --seed")
    pairs = [(r, by_index[r["index"]]) for r in items_a]
    if any(a["gold"] != b["gold"] for a, b in pairs):
        raise CftuneError("cannot pair results whose gold answers differ (different benchmark files)")
    return sorted(pairs, key=lambda p: p[0]["index"])


def margin_change(items_a: Sequence[dict], items_b: Sequence[dict], primary: str) -> dict:
    """Mean paired change of the gold margin (B − A) with its paired SE and t interval."""
    pairs = pair_items(items_a, items_b)
    return paired_mean_difference([gold_margin(a, primary) for a, _ in pairs],
                                  [gold_margin(b, primary) for _, b in pairs])


def compare_benchmark(result_a: dict, result_b: dict) -> dict:
    """The paired comparison of two `run_benchmark` results on the same items (A = the reference,
    e.g. the base): `paired_proportions` of their per-item correctness under the primary metric,
    plus `margin` (`margin_change`). Both must carry per-item records and the same primary."""
    for r in (result_a, result_b):
        if "items" not in r:
            raise CftuneError(f"result of '{r.get('benchmark', '?')}' has no per-item records; "
                              "re-run the evaluation (results cached before per-item records)")
    primary = result_a.get("primary", "acc")
    if result_b.get("primary", "acc") != primary:
        raise CftuneError(f"cannot compare '{result_a.get('benchmark')}' scored by {primary} with "
                          f"one scored by {result_b.get('primary')}")
    pairs = pair_items(result_a["items"], result_b["items"])
    out = paired_proportions([a["correct"] for a, _ in pairs], [b["correct"] for _, b in pairs])
    out.update(benchmark=result_b.get("benchmark"), primary=primary,
               margin=margin_change(result_a["items"], result_b["items"], primary))
    return out


# ---------------------------------------------------------------- seeds: t quantiles, averaging


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes
    §6.4)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(lgamma(a + b) - lgamma(a) - lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom: 1 − I_{df/(df+t²)}(df/2, 1/2)/2."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (e.g. t_quantile(0.975, 2) = 4.302653), by bisection on `t_cdf`; no
    scipy needed. With 3 seeds the 95% interval is mean ± 4.30·SE, not ± 1.96·SE: a normal
    quantile would claim twice the confidence the data carry."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 (got {p})")
    if df <= 0:
        raise ValueError(f"t_quantile needs df > 0 (got {df})")
    if df > 1e7:  # indistinguishable from the normal quantile, and the fraction converges slowly
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 2.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


def seed_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean over seeds, sample sd, SE = sd/√n and the t interval on n − 1 degrees of freedom
    (`ci95` is None with a single seed: one run says nothing about seed-to-seed spread)."""
    n = len(values)
    if n == 0:
        raise ValueError("seed_interval needs at least one value")
    mean = sum(values) / n
    sd = statistics.stdev(values) if n > 1 else float("nan")
    se = sd / math.sqrt(n)
    return {"value": mean, "sd": sd, "stderr": se, "df": n - 1, "n": n,
            "t": t_quantile(0.5 + level / 2, n - 1) if n > 1 else float("nan"),
            "ci95": _t_interval(mean, se, n - 1, level)}


def seed_outcomes(results: Sequence[dict]) -> list[list[float]]:
    """Per-seed per-item correctness (seeds × items, ordered by item index) from the
    `run_benchmark` results of one model replicated over seeds; all must share the item set."""
    if not results:
        raise ValueError("seed_outcomes needs at least one result")
    first = sorted(results[0]["items"], key=lambda r: r["index"])
    rows = []
    for r in results:
        pairs = pair_items(first, r["items"])
        rows.append([float(b["correct"]) for _, b in pairs])
    return rows


def paired_over_seeds(correct_a: Sequence[Sequence[float]], correct_b: Sequence[Sequence[float]]) -> dict:
    """Paired comparison of two models each replicated over seeds (seeds × items outcomes, items
    aligned; a model with one run, e.g. the base, is a single row).

    Per-seed comparisons share the items and the base, so they are not independent: averaging
    their p-values or SEs overstates the evidence. Instead each item's outcome is averaged over
    seeds first, then compared per item: `delta` (= mean over items of mean_B − mean_A, which is
    the difference of the seed-averaged accuracies), its paired SE and t interval on items − 1
    degrees of freedom, and `significant`. McNemar and Newcombe need 0/1 outcomes, so they do not
    apply to these fractions; `flips` counts items on the majority vote over seeds (right =
    right in more than half of the seeds), and an item whose vote is tied for either model is
    counted as `undecided`, not as a flip.
    """
    for name, rows in (("A", correct_a), ("B", correct_b)):
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError(f"model {name}: need at least one seed, each with the same items")
    if len(correct_a[0]) != len(correct_b[0]):
        raise ValueError(f"models cover different items ({len(correct_a[0])} vs {len(correct_b[0])})")
    mean_a = [sum(col) / len(col) for col in zip(*correct_a)]
    mean_b = [sum(col) / len(col) for col in zip(*correct_b)]
    out = paired_mean_difference(mean_a, mean_b)
    vote_a = [None if m == 0.5 else m > 0.5 for m in mean_a]
    vote_b = [None if m == 0.5 else m > 0.5 for m in mean_b]
    decided = [(a, b) for a, b in zip(vote_a, vote_b) if a is not None and b is not None]
    out.update(acc_a=out.pop("mean_a"), acc_b=out.pop("mean_b"),
               n_seeds_a=len(correct_a), n_seeds_b=len(correct_b),
               flips={"right_to_wrong": sum(1 for a, b in decided if a and not b),
                      "wrong_to_right": sum(1 for a, b in decided if b and not a),
                      "undecided": len(mean_a) - len(decided)})
    return out
