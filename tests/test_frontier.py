"""Trade-off curves at matched task gain (cftune.results.frontier, issue 29): interpolation by
hand, no extrapolation, the paired bootstrap's coverage and seeding, the verdicts, the families
formed from run names, `cftune report` writing frontier.* (and finding the evaluations again),
and the committed comparison end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cftune.cli import main as cli_main
from cftune.errors import CftuneError
from cftune.results.frontier import (
    A_BETTER,
    B_BETTER,
    HIGHER_IS_BETTER,
    NOT_RESOLVED,
    families,
    frontier,
    interpolate,
    verdict,
)
from cftune.results.report import (
    FRONTIER_JSON,
    FRONTIER_MD,
    FRONTIER_PNG,
    RESULTS_MD,
    ReportConfig,
    report,
    write_frontier,
)
from cftune.results.tables import frontier_markdown

COMPARISON = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "comparison"

# Two simulated families on one straight line each: KL = 10 + 50 (1 − task NLL) for `full`,
# 4 nats less at every task NLL for `cfs`, so at matched gain cfs − full = −4 exactly.
FULL = {"full-learning_rate=0.0001": 1.0, "full": 0.8, "full-learning_rate=0.001": 0.6}
CFS = {"cfs-learning_rate=0.0001": 1.1, "cfs": 0.9, "cfs-learning_rate=0.0005": 0.7,
       "cfs-learning_rate=0.001": 0.5}
TRUE_DELTA = -4.0


def _kl(family: str, task_nll: float) -> float:
    return 10 + 50 * (1 - task_nll) + (TRUE_DELTA if family == "cfs" else 0.0)


def _result(task: np.ndarray, kl: np.ndarray, bench: np.ndarray) -> dict:
    """An eval result in the runner's format: metrics and the per-item `items` behind them."""
    records = [{"index": i, "correct": bool(c)} for i, c in enumerate(bench)]
    return {"metrics": {"task_nll": {"value": float(np.mean(task))},
                        "kl": {"value": float(np.mean(kl))},
                        "bench/toy": {"value": float(np.mean(bench))}},
            "items": {"task_nll": task.tolist(), "kl": kl.tolist(),
                      "bench/toy": {"primary": "acc", "records": records}}}


def simulate(seed: int, full: dict = FULL, cfs: dict = CFS, items: int = 60
             ) -> tuple[list[dict], dict[str, dict]]:
    """(report rows, eval results) of a base and the two families, scored on shared items: an
    item's difficulty moves every model's score on it alike (what pairing cancels)."""
    rng = np.random.default_rng(seed)
    difficulty, spread = rng.normal(0, 0.3, items), rng.normal(0, 0.3, items)
    easy = rng.normal(0, 1, items)
    results = {"base": _result(1.3 + difficulty + rng.normal(0, 0.1, items), np.zeros(items),
                               (easy > 0).astype(float))}
    rows = [{"run": "base", "method": "base", "group": "base", "seed": None}]
    for family, runs in (("full", full), ("cfs", cfs)):
        for run, nll in runs.items():
            kl = _kl(family, nll) * (1 + spread) + rng.normal(0, 2, items)
            task = nll + difficulty + rng.normal(0, 0.1, items)
            right = (easy + rng.normal(0, 0.5, items) > 0.1 * (family == "full")).astype(float)
            results[run] = _result(task, kl, right)
            rows.append({"run": run, "method": family, "group": run, "seed": 0})
    base_acc = results["base"]["metrics"]["bench/toy"]["value"]
    for r in rows:
        r["metrics"] = dict(results[r["run"]]["metrics"])
        if r["run"] != "base":  # what the runner's paired_metrics adds
            r["metrics"]["bench_paired_avg"] = {
                "value": r["metrics"]["bench/toy"]["value"] - base_acc}
    return rows, results


def _dominance(result: dict, a: str, b: str, yardstick: str) -> dict:
    return next(d for d in result["dominance"]
                if (d["a"], d["b"], d["yardstick"]) == (a, b, yardstick))


def test_interpolation_matches_a_hand_computation():
    points = [(0.8, 20.0), (1.0, 10.0), (0.5, 50.0)]  # unsorted: joined in order of task NLL
    assert interpolate(0.9, points) == pytest.approx(15.0)
    assert interpolate(0.6, points) == pytest.approx(20.0 + (0.8 - 0.6) / (0.8 - 0.5) * 30.0)
    assert interpolate(0.8, points) == 20.0  # at a point: the point itself, exactly
    assert interpolate(0.5, points) == 50.0 and interpolate(1.0, points) == 10.0


def test_a_gain_outside_a_family_is_never_extrapolated():
    points = [(0.8, 20.0), (1.0, 10.0), (0.5, 50.0)]
    assert interpolate(1.01, points) is None and interpolate(0.49, points) is None
    # cfs covers only full's middle point (task NLL 0.8): full's ends give None / "–".
    rows, results = simulate(0, cfs={"cfs-learning_rate=0.0001": 0.9, "cfs": 0.7})
    result = frontier(rows, results, replicates=50)
    at = {m["reference"]: m["values"]["cfs"]["kl"]["value"] for m in result["matched"]}
    assert at["full"] is not None
    assert at["full-learning_rate=0.0001"] is None and at["full-learning_rate=0.001"] is None
    table = frontier_markdown(result).split("**kl**")[1].split("\n\n")[1]
    cfs_line = next(line for line in table.splitlines() if line.startswith("| cfs |"))
    assert cfs_line.count("| – ") == 2
    assert _dominance(result, "full", "cfs", "kl")["references"] == ["full"]
    lo, hi = next(f for f in result["families"] if f["name"] == "cfs")["task_nll_range"]
    assert lo == pytest.approx(0.7, abs=0.1) and hi == pytest.approx(0.9, abs=0.1) and lo < hi


def test_a_dominated_point_is_off_the_curve():
    # A learning rate past the best: (0.762, 22.9) learns less than (0.746, 7.86) and forgets
    # more. The envelope is (0.70, 30) – (0.746, 7.86); the joined points would give 10.7 at 0.75.
    points = [(0.70, 30.0), (0.762, 22.9), (0.746, 7.86)]
    assert interpolate(0.72, points) == pytest.approx(30.0 + (0.02 / 0.046) * (7.86 - 30.0))
    assert interpolate(0.746, points) == 7.86
    assert interpolate(0.75, points) is None and interpolate(0.762, points) is None
    # Where higher is better (a benchmark Δ), being beaten means less accuracy at less gain.
    bench = [(0.7, 0.01), (0.8, 0.03), (0.9, 0.0)]
    assert interpolate(0.75, bench, higher_is_better=True) == pytest.approx(0.02)
    assert interpolate(0.85, bench, higher_is_better=True) is None
    assert interpolate(0.85, bench) == pytest.approx(0.0025)  # as a cost, (0.8, 0.03) is off


def test_the_matched_value_follows_the_envelope_not_a_dominated_point():
    past = "cfs-learning_rate=0.002"  # learns less than cfs (0.9) and forgets 40 nats more
    rows, results = simulate(5, cfs={**CFS, past: 1.05})
    kl = np.array(results[past]["items"]["kl"]) + 40.0
    results[past]["items"]["kl"] = kl.tolist()
    for r in rows:
        if r["run"] == past:
            r["metrics"]["kl"] = results[past]["metrics"]["kl"] = {"value": float(kl.mean())}
    result = frontier(rows, results, replicates=200)
    cfs = next(f for f in result["families"] if f["name"] == "cfs")
    assert [p["run"] for p in cfs["points"] if "kl" in p["dominated"]] == [past]
    at = next(m for m in result["matched"] if m["reference"] == "full-learning_rate=0.0001")
    # true cfs KL at task NLL 1.0 is 10 − 4 = 6; through the dominated point it would be ~30
    assert at["values"]["cfs"]["kl"]["value"] == pytest.approx(_kl("cfs", 1.0), abs=3.0)
    assert past in frontier_markdown(result).split("**kl**")[0]


def test_bootstrap_interval_covers_the_true_difference():
    covered, widths = 0, []
    for rep in range(200):
        rows, results = simulate(1000 + rep)
        d = _dominance(frontier(rows, results, replicates=200, seed=rep), "full", "cfs", "kl")
        assert d["defined"] >= 0.95
        covered += d["ci95"][0] <= TRUE_DELTA <= d["ci95"][1]
        widths.append(d["ci95"][1] - d["ci95"][0])
    assert covered >= 0.9 * 200, f"covered the true Δ in {covered} of 200"
    # Paired: the items' shared spread cancels. Drawn independently per model, the intervals
    # here are ~6.5 nats wide; paired, ~2.
    assert np.mean(widths) < 4.0


def test_bootstrap_is_seeded():
    rows, results = simulate(7)
    first, again = (frontier(rows, results, replicates=300, seed=3) for _ in range(2))
    other = frontier(rows, results, replicates=300, seed=4)
    assert json.dumps(first) == json.dumps(again)
    d = [_dominance(r, "full", "cfs", "kl")["ci95"] for r in (first, other)]
    assert d[0] != d[1]


def test_the_verdict_follows_the_interval():
    def delta(lo: float, hi: float, defined: float = 1.0) -> dict:
        return {"value": (lo + hi) / 2, "ci95": [lo, hi], "defined": defined}

    assert verdict(delta(-2, -1), "kl") == B_BETTER  # B − A < 0: B forgets less
    assert verdict(delta(1, 2), "kl") == A_BETTER
    assert verdict(delta(-2, 1), "kl") == NOT_RESOLVED
    assert verdict(delta(0.01, 0.02), "bench_paired_avg") == B_BETTER  # B keeps more accuracy
    assert verdict(delta(-0.02, -0.01), "bench_paired_avg") == A_BETTER
    assert verdict(delta(-2, -1, defined=0.5), "kl") == NOT_RESOLVED
    rows, results = simulate(11)
    for d in frontier(rows, results, replicates=300)["dominance"]:
        lo, hi = d["ci95"]
        expected = (NOT_RESOLVED if lo <= 0 <= hi or d["defined"] < 0.95 else
                    {(True, False): B_BETTER, (False, False): A_BETTER,
                     (True, True): A_BETTER, (False, True): B_BETTER}[
                        (hi < 0, d["yardstick"] == "bench_paired_avg")])
        assert d["verdict"] == expected
        assert d["winner"] == {A_BETTER: d["a"], B_BETTER: d["b"]}.get(d["verdict"])
    assert _dominance(frontier(rows, results, replicates=300), "full", "cfs", "kl")[
        "verdict"] == B_BETTER


def test_families_from_run_names():
    def row(run: str, group: str, seed: int | None = 0, **extra) -> dict:
        return {"run": run, "group": group, "seed": seed, "method": "x",
                "metrics": {"task_nll": {"value": 1.0}}, **extra}

    rows = [row("base", "base", None, method="base"),
            row("full-s0", "full"),
            row("full-learning_rate=0.0002-s0", "full-learning_rate=0.0002"),
            row("full-s1", "full", 1), row("full (2 seeds)", "full", None, seeds=[0, 1]),
            row("lora-learning_rate=1e-05-s0", "lora-learning_rate=1e-05"),
            row("lora-r64-learning_rate=0.003-s0", "lora-r64-learning_rate=0.003"),
            row("l2-l2_lambda=0.01-s0", "l2-l2_lambda=0.01"),
            row("kd-s0", "kd"),
            row("wise-kd-a0.25-s0", "wise-kd-a0.25", parent="kd-s0", alpha=0.25),
            row("wise-kd-a0.5-s0", "wise-kd-a0.5", parent="kd-s0", alpha=0.5),
            row("mine-s0", "mine", family="full"),
            # no task NLL (a report of task accuracy alone): no place on a curve
            row("full-learning_rate=0.0005-s0", "full-learning_rate=0.0005", metrics={})]
    got = {name: [r["run"] for r in members] for name, members in families(rows).items()}
    assert got == {"full": ["full-s0", "full-learning_rate=0.0002-s0", "mine-s0"],
                   "lora": ["lora-learning_rate=1e-05-s0"],
                   "lora-r64": ["lora-r64-learning_rate=0.003-s0"],
                   "l2": ["l2-l2_lambda=0.01-s0"], "kd": ["kd-s0"],
                   "wise-kd": ["wise-kd-a0.25-s0", "wise-kd-a0.5-s0", "kd-s0"]}


def test_per_item_scores_must_reproduce_the_report():
    rows, results = simulate(3)
    next(r for r in rows if r["run"] == "cfs")["metrics"]["kl"]["value"] += 1e-6
    with pytest.raises(CftuneError, match="cfs: kl from the per-item scores"):
        frontier(rows, results, replicates=10)


def test_without_per_item_scores_the_reported_values_and_no_intervals():
    rows, results = simulate(5)
    with_items, without = frontier(rows, results, replicates=20), frontier(rows)
    assert without["bootstrap"] is None
    for a, b in zip(with_items["matched"], without["matched"]):
        for f, by_y in b["values"].items():
            for y, s in by_y.items():
                assert s["ci95"] is None
                assert s["value"] == pytest.approx(a["values"][f][y]["value"], abs=1e-12)
    assert all(d["verdict"] == NOT_RESOLVED for d in without["dominance"])


def test_nothing_written_without_a_curve(tmp_path):
    rows, results = simulate(2, full={"full": 0.8}, cfs={"cfs": 0.7})
    assert write_frontier(rows, tmp_path, results) is None
    assert not list(tmp_path.iterdir())


FRONTIER_FILES = {FRONTIER_JSON, FRONTIER_PNG, FRONTIER_MD}


def write_experiment(folder: Path, rows: list[dict], results: dict[str, dict],
                     stages: Path | None = None) -> None:
    """An experiment folder as `cftune run` leaves it: results.json, and each model's evaluation
    in the stages folder's evals/RUN-HASH/result.json (the experiment folder by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(rows))
    for run, result in results.items():
        path = (stages or folder) / "evals" / f"{run}-0123456789" / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))


def test_report_writes_the_frontier_where_a_family_has_a_curve(tmp_path):
    rows, results = simulate(4)
    write_experiment(tmp_path, rows, results)
    assert cli_main(["report", str(tmp_path)]) == 0
    assert FRONTIER_FILES <= {p.name for p in tmp_path.iterdir()}
    written = json.loads((tmp_path / FRONTIER_JSON).read_text())
    assert written["evals"] == "evals" and written["bootstrap"]["replicates"] == 1000
    assert written["families"][1]["name"] == "cfs" and len(written["families"][1]["points"]) == 4
    md = (tmp_path / FRONTIER_MD).read_text()
    assert md.startswith("## Trade-off curves at matched task gain")
    assert "| cfs | 4 |" in md and f"]({FRONTIER_PNG})" in md
    assert (tmp_path / FRONTIER_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Trade-off curves" not in (tmp_path / RESULTS_MD).read_text()  # results.md as before


def test_report_without_a_curve_writes_no_frontier_and_removes_nothing(tmp_path):
    rows, results = simulate(2, full={"full": 0.8}, cfs={"cfs": 0.7})
    write_experiment(tmp_path, rows, results)
    (tmp_path / "notes.md").write_text("mine")
    report(ReportConfig(folder=str(tmp_path)))
    names = {p.name for p in tmp_path.iterdir()}
    assert RESULTS_MD in names and "notes.md" in names
    assert not names & FRONTIER_FILES


def test_rerendering_finds_the_stages_evals_again(tmp_path):
    """`cftune run --stages DIR` keeps the evaluations outside the experiment folder: `cftune
    report` is told once (`--stages`), records the path relative to the folder in frontier.json,
    and finds it from there on, also in a copy of the tree at another path (a fresh clone)."""
    rows, results = simulate(6)
    exp, stages = tmp_path / "tree" / "exp", tmp_path / "tree" / "stages"
    write_experiment(exp, rows, results, stages=stages)
    assert cli_main(["report", str(exp), "--stages", str(stages)]) == 0
    first = json.loads((exp / FRONTIER_JSON).read_text())
    assert first["evals"] == "../stages/evals" and first["bootstrap"] is not None

    clone = tmp_path / "clone"
    shutil.copytree(tmp_path / "tree", clone)
    shutil.rmtree(tmp_path / "tree")
    (clone / "exp" / FRONTIER_PNG).unlink()
    assert cli_main(["report", str(clone / "exp")]) == 0
    assert json.loads((clone / "exp" / FRONTIER_JSON).read_text()) == first  # intervals kept
    assert (clone / "exp" / FRONTIER_PNG).is_file()


def test_missing_evals_are_named(tmp_path):
    rows, results = simulate(8)
    write_experiment(tmp_path / "exp", rows, results, stages=tmp_path / "stages")
    with pytest.raises(CftuneError, match="no evals/ folder"):
        report(ReportConfig(folder=str(tmp_path / "exp"), stages=str(tmp_path / "nowhere")))
    report(ReportConfig(folder=str(tmp_path / "exp"), stages=str(tmp_path / "stages")))
    shutil.rmtree(tmp_path / "stages")
    with pytest.raises(CftuneError, match="its evaluations, .*stages/evals, are missing"):
        report(ReportConfig(folder=str(tmp_path / "exp")))
    # without a stages folder and none recorded: the reported values, without intervals
    (tmp_path / "exp" / FRONTIER_JSON).unlink()
    report(ReportConfig(folder=str(tmp_path / "exp")))
    assert json.loads((tmp_path / "exp" / FRONTIER_JSON).read_text())["bootstrap"] is None


def test_the_reference_family_is_a_setting(tmp_path):
    rows, results = simulate(9)
    write_experiment(tmp_path, rows, results)
    report(ReportConfig(folder=str(tmp_path), frontier_reference="cfs"))
    written = json.loads((tmp_path / FRONTIER_JSON).read_text())
    assert written["reference"] == "cfs" and len(written["matched"]) == len(CFS)


def test_comparison_end_to_end(tmp_path):
    if not (COMPARISON / "results.json").is_file() or not (COMPARISON / "evals").is_dir():
        pytest.skip(f"{COMPARISON}: the committed comparison (results.json, evals/) is missing")
    rows = json.loads((COMPARISON / "results.json").read_text())
    result = write_frontier(rows, tmp_path, COMPARISON / "evals", replicates=1000, seed=0)
    assert (tmp_path / FRONTIER_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / FRONTIER_JSON).read_text()) == result
    assert result["bootstrap"]["item_sets"] == {"task": 100, "kl": 128, "instr": 88,
                                                "bench/arc_challenge": 500,
                                                "bench/arc_easy": 500, "bench/piqa": 500}
    wise = next(f for f in result["families"] if f["name"] == "wise-full")
    assert {(p["run"], p["alpha"]) for p in wise["points"]} == {
        ("wise-full-a0.25-s0", 0.25), ("wise-full-a0.5-s0", 0.5),
        ("wise-full-a0.75-s0", 0.75), ("full-s0", 1.0)}
    [at_full] = result["matched"]  # full has one point at seed 0
    full_row = next(r for r in rows if r["run"] == "full-s0")
    by_run = {p["run"]: p for p in wise["points"]}
    # 5e-4 overshoots: the merges at α 0.75 and 0.5 learn more than full-s0 and forget less, so
    # full-s0 is off wise-full's curve on every yardstick, and wise-full at full-s0's gain lies
    # on the merges' segment, far below full-s0 itself.
    assert by_run["full-s0"]["dominated"] == result["yardsticks"]
    x = at_full["task_nll"]
    a5, a25 = by_run["wise-full-a0.5-s0"], by_run["wise-full-a0.25-s0"]
    for y in result["yardsticks"]:
        assert at_full["values"]["full"][y]["value"] == pytest.approx(
            full_row["metrics"][y]["value"], abs=1e-9)
        lo, hi = at_full["values"]["full"][y]["ci95"]
        assert lo < at_full["values"]["full"][y]["value"] < hi
        curve = [(p["task_nll"]["value"], p[y]["value"]) for p in wise["points"]]
        assert at_full["values"]["wise-full"][y]["value"] == interpolate(
            x, curve, higher_is_better=y in HIGHER_IS_BETTER)
    t = (x - a5["task_nll"]["value"]) / (a25["task_nll"]["value"] - a5["task_nll"]["value"])
    assert at_full["values"]["wise-full"]["kl"]["value"] == pytest.approx(
        (1 - t) * a5["kl"]["value"] + t * a25["kl"]["value"])
    assert at_full["values"]["wise-full"]["kl"]["value"] < full_row["metrics"]["kl"]["value"] / 2
    assert _dominance(result, "full", "wise-full", "kl")["verdict"] == B_BETTER
    assert "| wise-full | 4 |" in frontier_markdown(result)
