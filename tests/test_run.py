"""`cftune run`: the experiment runner on a tiny model: outputs, caching, bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cftune.cli import main as cli_main
from cftune.errors import CftuneError
from cftune.run import RunConfig, Stage, _eta, run


def write_config(tmp_path: Path, model: Path, **changes) -> Path:
    config = {
        "model": str(model),
        "task": {"train": "builtin:arithmetic", "test": "builtin:arithmetic",
                 "train_rows": 16, "test_rows": 4},
        "cf": {"max_new_tokens": 8, "heldout": 6, "batch_size": 4, "device": "cpu"},
        "train": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-2, "dtype": "fp32",
                  "device": "cpu", "save_steps": 50},
        "eval": {"task_limit": 3, "max_new_tokens": 8, "batch_size": 4},
        "runs": [{"name": "full", "method": "full"},
                 {"name": "cfs", "method": "cfs", "cfs_ratio": 1.0},
                 {"name": "wise", "method": "wise-ft", "of": "full", "alphas": [0.5]}],
    }
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stages_run(output: str) -> list[str]:
    return [line.split("] ", 1)[1].split(" -> ")[0] for line in output.splitlines()
            if line.startswith("== [")]


def test_runner_writes_results_and_caches_every_stage(tiny_model, tmp_path, capsys):
    path = write_config(tmp_path, tiny_model)
    out = tmp_path / "exp"
    run(RunConfig(experiment=str(path), out=str(out)))
    first = stages_run(capsys.readouterr().out)
    assert first[0] == "data" and "train full" in first and "merge wise-a0.5" in first
    assert {"eval base", "eval full", "eval cfs", "eval wise-a0.5"} <= set(first)
    rows = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows] == ["base", "full", "cfs", "wise-a0.5"]
    for r in rows:
        assert {"task_acc", "task_nll", "kl"} <= set(r["metrics"])
    base = rows[0]["metrics"]["kl"]["value"]
    assert abs(base) < 1e-3  # the base's KL to itself
    assert rows[1]["metrics"]["kl"]["value"] > 0.01  # lr 1e-2 moves a tiny model
    for name in ("results.csv", "results.md", "tradeoff.png"):
        assert (out / name).stat().st_size > 0

    # Second run: nothing to do.
    run(RunConfig(experiment=str(path), out=str(out)))
    second = capsys.readouterr().out
    assert stages_run(second) == [] and "nothing to do" in second

    # A changed setting of one run redoes only that run and its evaluation.
    changed = write_config(tmp_path, tiny_model, runs=[
        {"name": "full", "method": "full"},
        {"name": "cfs", "method": "cfs", "cfs_ratio": 1.0, "learning_rate": 5e-4},
        {"name": "wise", "method": "wise-ft", "of": "full", "alphas": [0.5]}])
    run(RunConfig(experiment=str(changed), out=str(out)))
    assert stages_run(capsys.readouterr().out) == ["train cfs", "eval cfs"]


def test_sweep_expands_into_runs_and_dry_run_lists_stages(tiny_model, tmp_path, capsys):
    path = write_config(tmp_path, tiny_model, runs=[
        {"name": "cfs", "method": "cfs", "sweep": {"cfs_ratio": [0.5, 2.0]}}])
    assert run(RunConfig(experiment=str(path), out=str(tmp_path / "e"), dry_run=True)) is None
    out = capsys.readouterr().out
    assert "train cfs-cfs_ratio=0.5" in out and "train cfs-cfs_ratio=2.0" in out
    assert not (tmp_path / "e" / "runs").exists()


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key(s) bogus"),
    ({"runs": [{"name": "w", "method": "wise-ft", "of": "nope", "alphas": [0.5]}]},
     "merges unknown run 'nope'"),
    ({"runs": [{"name": "a", "method": "full"}, {"name": "a", "method": "cfs"}]},
     "duplicated run name(s) a"),
    ({"runs": [{"name": "a", "method": "cfs", "sweep": {"no_such_knob": [1, 2]}}]},
     "unknown setting(s) no_such_knob"),
    ({"eval": {"bench": ["no_such_benchmark"]}}, "no_such_benchmark"),
    ({"eval": {"plot_y": "accuracy"}}, "eval.plot_y 'accuracy' is not one of task_acc, task_nll"),
    ({"task": {"train": "missing/train.jsonl", "test": "builtin:arithmetic"}},
     "missing/train.jsonl"),
    ({"runs": [{"name": "a", "method": "full", "learning_rate": -1}]}, "learning_rate"),
])
def test_bad_experiment_config_is_one_line_error(tiny_model, tmp_path, capsys, change, message):
    path = write_config(tmp_path, tiny_model, **change)
    assert cli_main(["run", str(path), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_only_runs_what_the_named_run_needs(tiny_model, tmp_path, capsys):
    path = write_config(tmp_path, tiny_model)
    run(RunConfig(experiment=str(path), out=str(tmp_path / "e"), only=["wise-a0.5"],
                  dry_run=True))
    out = capsys.readouterr().out
    assert "train full" in out and "merge wise-a0.5" in out and "train cfs" not in out
    with pytest.raises(CftuneError, match="unknown run"):
        run(RunConfig(experiment=str(path), out=str(tmp_path / "e"), only=["nope"]))


def test_eta_scales_each_kind_by_its_cost():
    """A train stage twice the size of a finished one takes twice as long; a kind not seen yet
    takes the mean finished stage."""
    def stage(name, cost):
        return Stage(name, Path("."), lambda: None, lambda: False, cost)

    spent = {"train": [(60.0, 100.0)], "generate": [(180.0, 5000.0)]}
    assert _eta([stage("train big", 200.0), stage("eval base", 1.0)], spent) == " (~4 min left)"
    assert _eta([stage("train small", 50.0)], spent) == " (~0 min left)"
    assert _eta([stage("train x", 1.0)], {}) == ""
