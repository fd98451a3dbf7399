"""Paired statistics equal hand computations on small fixed tables: Newcombe's paired interval,
exact McNemar, flip counts, the gold margin, clustered SEs, t quantiles and seed averaging."""

from __future__ import annotations

import math

import pytest

from cftune.errors import CftuneError
from cftune.stats import (
    clustered_mean,
    compare_benchmark,
    gold_margin,
    margin_change,
    mcnemar_p,
    newcombe_paired_interval,
    paired_mean_difference,
    paired_over_seeds,
    paired_proportions,
    seed_interval,
    t_quantile,
    wilson_interval,
)

Z = 1.959963984540054


def outcomes(both: int, only_b: int, only_a: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Aligned per-item correctness of A and B with the given cell counts (shuffled order)."""
    a = [True] * both + [False] * only_b + [True] * only_a + [False] * neither
    b = [True] * both + [True] * only_b + [False] * only_a + [False] * neither
    order = sorted(range(len(a)), key=lambda i: (i * 7919) % len(a))
    return [a[i] for i in order], [b[i] for i in order]


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """Wilson's interval in its textbook form (2k + z² ± z√(z² + 4k(n−k)/n)) / (2(n + z²))."""
    root = Z * math.sqrt(Z * Z + 4 * k * (n - k) / n)
    return (2 * k + Z * Z - root) / (2 * (n + Z * Z)), (2 * k + Z * Z + root) / (2 * (n + Z * Z))


def test_wilson_interval_by_hand():
    for k, n in [(0, 10), (3, 10), (15, 20), (10, 20), (20, 20)]:
        assert wilson_interval(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)


def test_five_flips_one_way_none_the_other_on_20_items():
    # 10 right for both, 5 wrong→right, 0 right→wrong, 5 wrong for both: A 10/20, B 15/20.
    a, b = outcomes(10, 5, 0, 5)
    out = paired_proportions(a, b)
    assert (out["right_to_wrong"], out["wrong_to_right"], out["n"]) == (0, 5, 20)
    assert out["acc_a"] == 0.5 and out["acc_b"] == 0.75 and out["delta"] == 0.25
    assert out["mcnemar_p"] == pytest.approx(2 * 0.5**5) == 0.0625
    # Newcombe method 10 by hand: phi = (ad − bc − n/2)/√(product of margins) = (50 − 10)/√7500
    l_b, u_b = wilson_by_hand(15, 20)
    l_a, u_a = wilson_by_hand(10, 20)
    phi = (10 * 5 - 0 * 5 - 20 / 2) / math.sqrt(15 * 5 * 10 * 10)
    lo = 0.25 - math.sqrt((0.75 - l_b) ** 2 - 2 * phi * (0.75 - l_b) * (u_a - 0.5) + (u_a - 0.5) ** 2)
    hi = 0.25 + math.sqrt((0.5 - l_a) ** 2 - 2 * phi * (0.5 - l_a) * (u_b - 0.75) + (u_b - 0.75) ** 2)
    assert out["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    assert out["ci95"] == pytest.approx([0.0319081, 0.4337187], abs=1e-6)
    # The score interval excludes 0 here although the exact conditional McNemar p is 0.0625:
    # the two answer different questions; cftune marks significance by the interval (issue 10).
    assert out["significant"]


def test_five_flips_among_500_items_is_not_significant():
    a, b = outcomes(450, 5, 0, 45)
    out = paired_proportions(a, b)
    assert out["delta"] == pytest.approx(0.01) and out["mcnemar_p"] == 0.0625
    lo, hi = out["ci95"]
    assert lo < 0 < hi and not out["significant"]
    assert (lo, hi) == pytest.approx((-0.00071987, 0.02194754), abs=1e-7)
    # B right on every flip, so the interval leans right of 0: Δ sits near its lower end
    assert hi - out["delta"] > out["delta"] - lo


def test_flips_either_way_and_mcnemar_by_hand():
    a, b = outcomes(30, 9, 1, 10)
    out = paired_proportions(a, b)
    assert (out["right_to_wrong"], out["wrong_to_right"]) == (1, 9)
    assert out["delta"] == pytest.approx((39 - 31) / 50)
    assert out["mcnemar_p"] == pytest.approx(2 * (1 + 10) / 2**10)
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0 and mcnemar_p(9, 1) == mcnemar_p(1, 9)
    # paired SE = sd of the per-item differences / √n; unpaired adds the binomial variances
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    mean = sum(diffs) / 50
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 49)
    assert out["stderr"] == pytest.approx(sd / math.sqrt(50))
    assert out["unpaired_stderr"] == pytest.approx(
        math.sqrt(0.62 * 0.38 / 49 + 0.78 * 0.22 / 49))


def test_newcombe_phi_branches():
    # ad − bc = 2 ≤ n/2: the corrected phi is 0, the interval is Wilson's square-and-add
    lo, hi = newcombe_paired_interval(2, 1, 1, 1)
    l_b, u_b = wilson_by_hand(3, 5)
    l_a, u_a = wilson_by_hand(3, 5)
    assert (lo, hi) == pytest.approx((-math.hypot(0.6 - l_b, u_a - 0.6), math.hypot(0.6 - l_a, u_b - 0.6)))
    # ad − bc < 0: phi is used uncorrected
    lo, hi = newcombe_paired_interval(1, 3, 4, 2)
    p_b, p_a = 0.4, 0.5
    l_b, u_b = wilson_by_hand(4, 10)
    l_a, u_a = wilson_by_hand(5, 10)
    phi = (1 * 2 - 3 * 4) / math.sqrt(4 * 6 * 5 * 5)
    assert lo == pytest.approx(-0.1 - math.sqrt((p_b - l_b) ** 2 - 2 * phi * (p_b - l_b) * (u_a - p_a)
                                                + (u_a - p_a) ** 2))
    assert hi == pytest.approx(-0.1 + math.sqrt((p_a - l_a) ** 2 - 2 * phi * (p_a - l_a) * (u_b - p_b)
                                                + (u_b - p_b) ** 2))
    # no flips: Δ = 0 and the interval contains it
    lo, hi = newcombe_paired_interval(20, 0, 0, 0)
    assert lo < 0 < hi


def test_gold_margin_under_each_metric():
    rec = {"logliks": [-2.0, -1.0, -3.0], "lengths": [1, 4, 1], "gold": 0}
    assert gold_margin(rec, "acc") == -1.0  # −2 − max(−1, −3)
    assert gold_margin(rec, "acc_norm") == -2.0 - (-0.25)  # normalised: −2, −0.25, −3
    assert gold_margin({"logliks": [-4.5], "gold": 0}, "acc") == -4.5  # last word: the answer's ll


def test_margin_change_is_paired_mean_with_t_interval():
    items_a = [{"index": i, "logliks": [ll, -1.0], "gold": 0} for i, ll in enumerate([-2, -1, -0.5, -3])]
    items_b = [{"index": i, "logliks": [ll, -1.0], "gold": 0} for i, ll in enumerate([-1, -1, 0.5, -2])]
    out = margin_change(items_a, list(reversed(items_b)), "acc")  # paired by index, not order
    diffs = [1.0, 0.0, 1.0, 1.0]
    sd = math.sqrt(sum((d - 0.75) ** 2 for d in diffs) / 3)
    assert out["delta"] == pytest.approx(0.75) and out["stderr"] == pytest.approx(sd / 2)
    assert out["ci95"] == pytest.approx([0.75 - 3.182446 * sd / 2, 0.75 + 3.182446 * sd / 2], abs=1e-5)
    assert out["mean_a"] == pytest.approx(-0.625)


def test_compare_benchmark_and_mismatched_items():
    def result(correct, primary="acc"):
        return {"benchmark": "boolq", "primary": primary,
                "items": [{"index": i, "logliks": [0.0 if c else -1.0, -0.5], "gold": 0, "pred": 0 if c else 1,
                           "correct": c} for i, c in enumerate(correct)]}
    a, b = outcomes(10, 5, 0, 5)
    out = compare_benchmark(result(a), result(b))
    assert out["wrong_to_right"] == 5 and out["primary"] == "acc" and out["benchmark"] == "boolq"
    assert out["margin"]["delta"] == pytest.approx(5 / 20 * 1.0)  # margins −0.5 → +0.5 on 5 items
    short = result(b[:10])
    with pytest.raises(CftuneError, match="different items"):
        compare_benchmark(result(a), short)
    with pytest.raises(CftuneError, match="scored by acc"):
        compare_benchmark(result(a), result(b, "acc_norm"))
    with pytest.raises(CftuneError, match="no per-item records"):
        compare_benchmark({"benchmark": "boolq", "acc": 0.5}, result(b))


def test_clustered_se_equals_formula():
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 9.0]
    clusters = ["p1", "p1", "p2", "p2", "p3", "p3"]
    out = clustered_mean(values, clusters)
    means = [1.5, 3.5, 7.0]
    grand = sum(means) / 3
    sd = math.sqrt(sum((m - grand) ** 2 for m in means) / 2)
    assert out["value"] == pytest.approx(24 / 6)
    assert out["stderr"] == pytest.approx(sd / math.sqrt(3))
    assert out["n"] == 6 and out["n_clusters"] == 3
    assert out["ci95"] == pytest.approx([4 - 4.302653 * sd / math.sqrt(3), 4 + 4.302653 * sd / math.sqrt(3)],
                                        abs=1e-5)
    # clustered SE is larger than the naive SE over responses when clusters differ
    naive = math.sqrt(sum((v - 4) ** 2 for v in values) / 5 / 6)
    assert out["stderr"] > naive


@pytest.mark.parametrize("df,q", [(1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445),
                                  (10, 2.228139), (30, 2.042272), (120, 1.979930), (1e9, 1.959964)])
def test_t_quantiles(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-q, abs=1e-6)


def test_t_quantile_other_levels():
    assert t_quantile(0.995, 5) == pytest.approx(4.032143, abs=1e-6)
    assert t_quantile(0.95, 2) == pytest.approx(2.919986, abs=1e-6)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)


def test_seed_interval_uses_t_with_n_minus_1_df():
    out = seed_interval([0.50, 0.52, 0.57])
    sd = math.sqrt(((0.50 - 0.53) ** 2 + (0.52 - 0.53) ** 2 + (0.57 - 0.53) ** 2) / 2)
    assert out["value"] == pytest.approx(0.53) and out["sd"] == pytest.approx(sd)
    assert out["df"] == 2 and out["t"] == pytest.approx(4.302653, abs=1e-6)
    half = 4.302653 * sd / math.sqrt(3)
    assert out["ci95"] == pytest.approx([0.53 - half, 0.53 + half], abs=1e-6)
    assert seed_interval([0.5])["ci95"] is None


def test_paired_over_seeds_averages_items_first():
    base = [[1, 1, 0, 0, 1, 0]]  # one run
    runs = [[1, 0, 0, 1, 1, 1], [1, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]]
    out = paired_over_seeds(base, runs)
    means_b = [2 / 3, 0, 1 / 3, 1, 1, 1 / 3]
    diffs = [m - a for m, a in zip(means_b, base[0])]
    assert out["delta"] == pytest.approx(sum(diffs) / 6)
    assert out["acc_b"] == pytest.approx(sum(sum(r) for r in runs) / 18)  # = seed-averaged acc
    assert out["stderr"] == pytest.approx(paired_mean_difference(base[0], means_b)["stderr"])
    assert out["flips"] == {"right_to_wrong": 1, "wrong_to_right": 1, "undecided": 0}
    assert (out["n_seeds_a"], out["n_seeds_b"]) == (1, 3)
    # two seeds that disagree on an item: a tied vote, counted as undecided, not as a flip
    tied = paired_over_seeds(base, [[0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 0]])
    assert tied["flips"] == {"right_to_wrong": 0, "wrong_to_right": 0, "undecided": 1}
    with pytest.raises(ValueError, match="different items"):
        paired_over_seeds(base, [[1, 0]])
