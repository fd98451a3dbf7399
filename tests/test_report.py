"""Result tables and the trade-off plot: files written, table contents, deltas, missing metrics."""

from __future__ import annotations

import csv
import io

import pytest

from cftune.results import metrics, plots, report, tables


def metric(value, stderr=None, ci95=None, n=100):
    return {"value": value, "stderr": stderr, "ci95": ci95, "n": n}


def run(name, method, metrics, parent=None, alpha=None, steps=100):
    return {"run": name, "method": method, "parent": parent, "alpha": alpha, "metrics": metrics,
            "steps": steps, "tokens": 12800, "wall_time_s": 42.0}


@pytest.fixture
def rows():
    """Runner order on purpose not base-first; one run lacks the benchmark average."""
    return [
        run("full", "full", {"task_acc": metric(0.62, 0.03, [0.56, 0.68]), "kl": metric(18.0, 1.5),
                             "bench_avg": metric(0.39, 0.01)}),
        run("base", "base", {"task_acc": metric(0.07, 0.02), "bench_avg": metric(0.45, 0.01)},
            steps=None),
        run("cfs-r1", "cfs", {"task_acc": metric(0.58, 0.03), "kl": metric(4.2, 0.4)}),
        run("full-wise-0.5", "wise-ft", {"task_acc": metric(0.26), "kl": metric(4.5),
                                         "bench_avg": metric(0.42)}, parent="full", alpha=0.5),
        run("full-wise-0.25", "wise-ft", {"task_acc": metric(0.14), "kl": metric(1.1),
                                          "bench_avg": metric(0.44)}, parent="full", alpha=0.25),
    ]


def markdown_cells(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


def test_write_report_files(rows, tmp_path):
    from PIL import Image

    paths = report.write_report(rows, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"results.csv", "results.md", "tradeoff.png"}
    assert paths["png"].stat().st_size > 10_000
    with Image.open(paths["png"]) as img:  # two panels: KL and benchmark average
        assert img.size == (2 * round(plots.FIGSIZE_PER_PANEL * plots.DPI),
                            round(plots.FIG_HEIGHT * plots.DPI))
    assert tables.to_markdown(rows) in paths["md"].read_text()


def test_one_panel_without_benchmarks(rows, tmp_path):
    from PIL import Image

    for r in rows:
        r["metrics"].pop("bench_avg", None)
    path = plots.plot_tradeoff(rows, tmp_path / "t.png")
    with Image.open(path) as img:
        assert img.size == (round(plots.FIGSIZE_PER_PANEL * plots.DPI),
                            round(plots.FIG_HEIGHT * plots.DPI))


def test_a_panel_per_forgetting_yardstick(rows, tmp_path):
    """Instruction KL and the paired rise of the reference NLL, once measured, get a panel each
    beside CF KL and the benchmark average."""
    from PIL import Image

    for i, r in enumerate(rows):
        r["metrics"]["instr_kl"] = metric(3.0 * i, 0.5)
        r["metrics"]["paired/instr_ref_nll"] = metric(0.05 * i, 0.02)
    path = plots.plot_tradeoff(rows, tmp_path / "t.png")
    with Image.open(path) as img:
        assert img.size[0] == 4 * round(plots.FIGSIZE_PER_PANEL * plots.DPI)


def test_plot_task_nll_axis(rows, tmp_path):
    """The y axis can be the reference solutions' NLL (for tasks where accuracy stays near 0)."""
    for r, nll in zip(rows, (0.8, 1.5, 0.9, 1.2, 1.4)):
        r["metrics"]["task_nll"] = metric(nll, 0.02)
    assert plots._point(rows[0], metrics.KL, metrics.TASK_NLL) == (18.0, 0.8)
    assert plots._point(rows[1], metrics.KL, metrics.TASK_NLL) == (0.0, 1.5)  # the base at KL 0
    assert plots.plot_tradeoff(rows, tmp_path / "t.png", y_name="task_nll").stat().st_size > 10_000
    with pytest.raises(ValueError, match="y_name"):
        plots.plot_tradeoff(rows, tmp_path / "u.png", y_name="accuracy")


def test_markdown_rows_columns_and_deltas(rows):
    header, *body = markdown_cells(tables.to_markdown(rows))
    body = body[1:]  # the alignment line
    assert header == ["run", "method", "task_acc", "Δ task_acc", "kl", "bench_avg", "Δ bench_avg",
                      "steps", "tokens", "time (s)"]
    assert [line[0] for line in body] == ["base", "full", "cfs-r1", "full-wise-0.5",
                                          "full-wise-0.25"]
    assert all(len(line) == len(header) for line in body)
    by_run = {line[0]: dict(zip(header, line)) for line in body}
    assert by_run["full"]["task_acc"] == "0.620 ± 0.030"
    assert by_run["full"]["Δ task_acc"] == "+0.550"
    assert by_run["full"]["Δ bench_avg"] == "-0.060"
    assert by_run["full"]["kl"] == "18.0 ± 1.5"
    assert by_run["full-wise-0.5"]["task_acc"] == "0.260"  # no stderr: the value alone
    assert by_run["base"]["Δ task_acc"] == metrics.MISSING
    assert by_run["base"]["steps"] == metrics.MISSING
    assert by_run["full"]["tokens"] == "12,800"


def test_missing_metrics_render_as_dash(rows, tmp_path):
    rows.append(run("broken", "kd", {}))
    rows.append(run("half", "lora", {"task_acc": {"value": None, "stderr": None, "ci95": None,
                                                  "n": 0}}))
    by_run = {line[0]: line for line in markdown_cells(tables.to_markdown(rows))}
    header = markdown_cells(tables.to_markdown(rows))[0]
    cfs = dict(zip(header, by_run["cfs-r1"]))
    assert cfs["bench_avg"] == cfs["Δ bench_avg"] == metrics.MISSING
    assert set(by_run["broken"][2:-3]) == {metrics.MISSING}
    assert set(by_run["half"][2:-3]) == {metrics.MISSING}
    report.write_report(rows, tmp_path)  # and the plot skips them without crashing
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_no_task_metric_anywhere_still_plots(tmp_path):
    rows = [run("base", "base", {}), run("full", "full", {"kl": metric(3.0)})]
    report.write_report(rows, tmp_path)
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_without_a_base_there_are_no_delta_columns(rows):
    rows = [r for r in rows if r["method"] != "base"]
    header = markdown_cells(tables.to_markdown(rows))[0]
    assert not any(h.startswith("Δ") for h in header)


def test_csv_values_intervals_and_deltas(rows):
    lines = list(csv.DictReader(io.StringIO(tables.to_csv(rows))))
    assert lines[0]["run"] == "base"
    full = next(line for line in lines if line["run"] == "full")
    assert float(full["task_acc"]) == 0.62
    assert (float(full["task_acc_ci95_lo"]), float(full["task_acc_ci95_hi"])) == (0.56, 0.68)
    assert float(full["task_acc_delta"]) == pytest.approx(0.55)
    assert float(full["bench_avg_delta"]) == pytest.approx(-0.06)
    cfs = next(line for line in lines if line["run"] == "cfs-r1")
    assert cfs["bench_avg"] == cfs["bench_avg_delta"] == ""
    wise = next(line for line in lines if line["run"] == "full-wise-0.5")
    assert (wise["parent"], float(wise["alpha"])) == ("full", 0.5)


def test_print_table(rows, capsys):
    tables.print_table(rows)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "method", "task_acc"]
    assert [line.split()[0] for line in out[2:]] == ["base", "full", "cfs-r1", "full-wise-0.5",
                                                     "full-wise-0.25"]


def test_wiseft_curve_runs_from_base_through_alphas_to_parent(rows):
    ordered = metrics.order_rows(rows)
    curve = plots._wiseft_curves(ordered, {r["run"]: r for r in ordered})["full"]
    assert [r["run"] for r in curve] == ["base", "full-wise-0.25", "full-wise-0.5", "full"]


def test_wiseft_of_a_seed_replicate_ends_at_it_in_its_methods_colour(rows):
    """Only the group row of replicates is drawn; Wise-FT of one seed still ends its curve at
    that seed's model, coloured as its method (it was drawn grey, ending at its last alpha)."""
    rows[0].update(run="full-s0", group="full", seed=0)
    rows.append({**run("full (2 seeds)", "full", {"task_acc": metric(0.55), "kl": metric(5.2)}),
                 "group": "full", "seeds": [0, 1]})
    for r in rows:
        if r.get("parent") == "full":
            r["parent"] = "full-s0"
    by_name = {r["run"]: r for r in rows}
    shown = plots.plotted_rows(metrics.order_rows(rows))
    assert "full-s0" not in {r["run"] for r in shown}
    curve = plots._wiseft_curves(shown, by_name)["full-s0"]
    assert curve[-1]["run"] == "full-s0"
    colors = {"full": "red", "cfs": "blue"}
    assert plots._color(curve[1], by_name, colors) == "red"


def test_error_bars_use_ci95_else_stderr(rows):
    full = rows[0]
    assert plots.ci_error(full, "task_acc") == pytest.approx((0.06, 0.06))
    assert plots.ci_error(full, "kl") == pytest.approx((1.96 * 1.5, 1.96 * 1.5))
    assert plots.ci_error(rows[3], "kl") == (0.0, 0.0)


def test_ablation_plot_numbers_on_a_scale_switches_as_categories(tmp_path):
    from cftune.results.ablation import _positions, plot_ablation

    assert _positions([0.5, 1.2, 0.8]) == ({0.5: 0.5, 0.8: 0.8, 1.2: 1.2}, True)
    assert _positions([True, False, True]) == ({False: 0.0, True: 1.0}, False)

    def row(run, method, x=None, kl=1.0):
        r = {"run": run, "method": method, "group": run,
             "metrics": {"kl": {"value": kl, "stderr": 0.1, "ci95": [kl - 0.2, kl + 0.2], "n": 8}}}
        return {**r, "x": x, "curve": method, "ablation": "cf.chat"} if x is not None else r
    rows = [row("base", "base", kl=0.0), row("full", "full", kl=3.0),
            row("cfs", "cfs", False, 2.0), row("cfs-chat", "cfs", True, 1.5),
            row("kd", "kd", False, 1.0), row("kd-chat", "kd", True, 0.8)]
    path = plot_ablation(rows, tmp_path / "a.png", "cf.chat")
    assert path.stat().st_size > 0
    assert plot_ablation([row("base", "base"), row("full", "full")], tmp_path / "b.png",
                         "cf.chat") is None and not (tmp_path / "b.png").exists()
