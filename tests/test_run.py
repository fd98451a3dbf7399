"""`cftune run`: the experiment runner on a tiny model: outputs, caching, bad configs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cftune.cli import main as cli_main
from cftune.errors import CftuneError
from cftune.experiment.config import Experiment
from cftune.experiment.execute import RunConfig, _eta, perform, run
from cftune.experiment.plan import Stage
from cftune.io import read_manifest
from cftune.models import load_tokenizer
from cftune.train import data


def write_config(tmp_path: Path, model: Path, **changes) -> Path:
    config = {
        "model": str(model),
        "task": {"train": "builtin:arithmetic", "test": "builtin:arithmetic",
                 "train_rows": 16, "test_rows": 4},
        "cf": {"max_new_tokens": 8, "heldout": 24, "batch_size": 8, "device": "cpu"},
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
    # each model is evaluated as soon as it exists: a run cut short keeps those results
    assert first.index("eval full") < first.index("train cfs") < first.index("eval cfs")
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

    # An option that does not change the model (memory, checkpoints kept) redoes nothing.
    memory = write_config(tmp_path, tiny_model, train={
        **yaml.safe_load(path.read_text())["train"], "mmap_threshold": 1 << 20,
        "keep_checkpoints": True})
    run(RunConfig(experiment=str(memory), out=str(out)))
    assert stages_run(capsys.readouterr().out) == []

    # Naming a run's frontier family redoes nothing and reaches its report row.
    family = write_config(tmp_path, tiny_model, runs=[
        {"name": "full", "method": "full"},
        {"name": "cfs", "method": "cfs", "cfs_ratio": 1.0, "learning_rate": 5e-4},
        {"name": "wise", "method": "wise-ft", "of": "full", "alphas": [0.5], "family": "full"}])
    run(RunConfig(experiment=str(family), out=str(out)))
    assert stages_run(capsys.readouterr().out) == []
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["wise-a0.5"]["family"] == "full" and "family" not in rows["cfs"]


def test_sweep_expands_into_runs_and_dry_run_lists_stages(tiny_model, tmp_path, capsys):
    path = write_config(tmp_path, tiny_model, runs=[
        {"name": "cfs", "method": "cfs", "sweep": {"cfs_ratio": [0.5, 2.0]}}])
    assert run(RunConfig(experiment=str(path), out=str(tmp_path / "e"), dry_run=True)) is None
    out = capsys.readouterr().out
    assert "train cfs-cfs_ratio=0.5" in out and "train cfs-cfs_ratio=2.0" in out
    assert not (tmp_path / "e" / "runs").exists()


def test_dry_run_names_each_sampling_engine(tiny_model, tmp_path, capsys):
    """`cf: {engine: vllm}` applies to the pools; the held-out KL set follows it too, and the
    dry run says which engine draws each (nothing is imported or drawn)."""
    cf = {"max_new_tokens": 8, "heldout": 24, "batch_size": 8, "device": "cpu",
          "engine": "vllm", "rescore": True}
    path = write_config(tmp_path, tiny_model, cf=cf)
    assert run(RunConfig(experiment=str(path), out=str(tmp_path / "e"), dry_run=True)) is None
    lines = [x for x in capsys.readouterr().out.splitlines() if "] generate " in x]
    assert lines and all("samples, vllm rescored)" in x for x in lines)


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
    ({"eval": {"task_acc": False}}, "eval.task_acc is false, so there is no task accuracy to plot"),
    ({"eval": {"offset": -1}}, "eval.offset must be >= 0"),
    ({"seeds": [0, 1], "runs": [{"name": "a", "method": "full", "seeds": [2]}]},
     "runs[0]: seeds [2] are not among the experiment's `seeds` [0, 1]"),
    ({"task": {"train": "missing/train.jsonl", "test": "builtin:arithmetic"}},
     "missing/train.jsonl"),
    ({"runs": [{"name": "a", "method": "full", "learning_rate": -1}]}, "learning_rate"),
    ({"runs": [{"name": "a", "method": "full"}, {"name": "b", "method": "cfs", "batch_size": 4}]},
     "runs see different task examples per step (batch_size x grad_accum: 2 for a; 4 for b)"),
    ({"runs": [{"name": "a", "method": "full", "cf": {"temperature": 0.5}}]},
     "only cfs and kd runs train on the CF pool ('full' does not)"),
    ({"runs": [{"name": "a", "method": "cfs", "cf": {"seed": 3}}]}, "cf.seed is set by the runner"),
    ({"runs": [{"name": "a", "method": "cfs", "sweep": {"cf.temperature": [0.5, -1]}}]},
     "temperature must be > 0"),
    ({"ablation": "cf.temprature"}, "ablation: unknown setting cf.temprature"),
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


def test_only_draws_the_same_cf_pool_as_the_whole_config(tiny_model, tmp_path, capsys):
    """`--only cfs` in a config that also has `kd` plans the pool `kd` needs (with top-K), so
    the whole config later finds cfs's pool and does not train cfs again."""
    runs = [{"name": "cfs", "method": "cfs"}, {"name": "kd", "method": "kd"}]
    path = write_config(tmp_path, tiny_model, runs=runs)

    def pool(only: list[str]) -> str:
        run(RunConfig(experiment=str(path), out=str(tmp_path / "e"), only=only, dry_run=True))
        return next(line.split()[-1] for line in capsys.readouterr().out.splitlines()
                    if "generate cf-pool" in line)
    assert pool(["cfs"]) == pool([]) == pool(["kd"])
    with pytest.raises(CftuneError, match="unknown run"):
        run(RunConfig(experiment=str(path), out=str(tmp_path / "e"), only=["nope"]))


def test_cf_sweep_draws_a_pool_per_setting_and_plots_the_ablation(tiny_model, tmp_path, capsys):
    """`sweep: {cf.temperature: [...]}` trains each run on a pool drawn at its temperature (the
    config's own value is the config's pool), `ablation` puts the setting on a plot's x axis,
    and a second config run with the same `--stages` reuses the first one's stages."""
    stages = tmp_path / "stages"
    runs = [{"name": "full", "method": "full"},
            {"name": "cfs", "method": "cfs", "cfs_mode": "weighted",
             "sweep": {"cf.temperature": [0.5, 1.0]}}]
    path = write_config(tmp_path, tiny_model, runs=runs, ablation="cf.temperature")
    run(RunConfig(experiment=str(path), out=str(tmp_path / "t"), stages=str(stages)))
    capsys.readouterr()
    pools = sorted(p.name.rsplit("-", 1)[0] for p in (stages / "cf").glob("cf-pool*"))
    assert pools == ["cf-pool", "cf-pool-temperature=0.5"]
    hot = next((stages / "cf").glob("cf-pool-temperature=0.5-*"))
    assert read_manifest(hot)["sampling"]["temperature"] == 0.5
    rows = {r["run"]: r for r in json.loads((tmp_path / "t" / "results.json").read_text())}
    assert rows["cfs-temperature=0.5"]["x"] == 0.5 and rows["cfs-temperature=1.0"]["x"] == 1.0
    assert rows["cfs-temperature=0.5"]["curve"] == "cfs (weighted)" and "x" not in rows["full"]
    assert (tmp_path / "t" / "ablation.png").stat().st_size > 0
    assert not (tmp_path / "t" / "runs").exists()  # the stages live in --stages

    other = tmp_path / "other.yaml"
    other.write_text(path.read_text().replace("ablation: cf.temperature\n", ""))
    config = yaml.safe_load(other.read_text())
    config["runs"] = [{"name": "full", "method": "full"}]
    other.write_text(yaml.safe_dump(config))
    run(RunConfig(experiment=str(other), out=str(tmp_path / "o"), stages=str(stages)))
    assert stages_run(capsys.readouterr().out) == []
    assert [r["run"] for r in json.loads((tmp_path / "o" / "results.json").read_text())] == \
        ["base", "full"]
    assert not (tmp_path / "o" / "ablation.png").exists()


def test_extends_takes_the_parents_settings_section_by_section(tiny_model, tmp_path):
    parent = write_config(tmp_path, tiny_model, eval={"task_limit": 3, "max_new_tokens": 8,
                                                        "batch_size": 4, "limit": 7})
    child = tmp_path / "child.yaml"
    child.write_text("extends: exp.yaml\nname: child\neval: {limit: 5}\n"
                     "runs: [{name: full, method: full}]\n")
    exp = Experiment(child)
    assert exp.name == "child" and [r.name for r in exp.runs] == ["full"]
    assert (exp.eval.limit, exp.eval.task_limit, exp.eval.batch_size) == (5, 3, 4)
    assert exp.train_config(exp.runs[0]).learning_rate == 1e-2  # the parent's `train`
    parent.write_text(parent.read_text() + "extends: child.yaml\n")
    with pytest.raises(CftuneError, match="makes a cycle of configs"):
        Experiment(child)


def test_a_run_names_the_frontier_family_it_joins(tiny_model, tmp_path):
    """`family:` puts a run on another run's curve (`cftune.results.frontier`), on every copy of
    a sweep and of a Wise-FT run; it is a name, and not a setting: the stage keys stay."""
    plain = Experiment(write_config(tmp_path, tiny_model))
    path = write_config(tmp_path, tiny_model, runs=[
        {"name": "full", "method": "full"},
        {"name": "big", "method": "full", "family": "full", "sweep": {"learning_rate": [0.1]}},
        {"name": "cfs", "method": "cfs", "cfs_ratio": 1.0},
        {"name": "wise", "method": "wise-ft", "of": "full", "alphas": [0.5], "family": "merged"}])
    exp = Experiment(path)
    assert {r.name: r.family for r in exp.runs} == {
        "full": None, "big-learning_rate=0.1": "full", "cfs": None, "wise-a0.5": "merged"}
    full = next(r for r in exp.runs if r.name == "full")
    assert exp.train_config(full) == plain.train_config(plain.runs[0])
    path = write_config(tmp_path, tiny_model, runs=[{"name": "x", "method": "full", "family": 3}])
    with pytest.raises(CftuneError, match=r"runs\[0\]: `family` = 3 must be a name"):
        Experiment(path)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path, monkeypatch):
    """Each experiment in configs/ parses and validates (runs, sweeps, `extends`, benchmarks)
    from the repository root, as its header says to run it."""
    if "../shared" in path.read_text() and not (path.parents[2] / "shared" / "data").is_dir():
        pytest.skip("reads ../shared/data, which an end user's checkout does not have")
    monkeypatch.chdir(path.parents[1])
    exp = Experiment(path)
    assert exp.runs and all(exp.train_config(r) for r in exp.runs if r.method != "wise-ft")


def test_eta_scales_each_kind_by_its_cost():
    """A train stage twice the size of a finished one takes twice as long; a kind not seen yet
    takes the mean finished stage."""
    def stage(name, cost):
        return Stage(name, Path("."), name.split()[0], lambda: False, cost)

    spent = {"train": [(60.0, 100.0)], "generate": [(180.0, 5000.0)]}
    assert _eta([stage("train big", 200.0), stage("eval base", 1.0)], spent) == " (~4 min left)"
    assert _eta([stage("train small", 50.0)], spent) == " (~0 min left)"
    assert _eta([stage("train x", 1.0)], {}) == ""


def test_changed_heldout_count_rescores_every_model_on_one_set(tiny_model, tmp_path, capsys):
    """The held-out folder is extended in place; a new count must re-evaluate every model on
    the new set, and a table never mixes sets (issue 9, item 7)."""
    runs = [{"name": "full", "method": "full"}]
    out = tmp_path / "exp"
    run(RunConfig(experiment=str(write_config(tmp_path, tiny_model, runs=runs)), out=str(out)))
    capsys.readouterr()
    cf = {"max_new_tokens": 8, "heldout": 30, "batch_size": 8, "device": "cpu"}
    run(RunConfig(experiment=str(write_config(tmp_path, tiny_model, runs=runs, cf=cf)),
                  out=str(out)))
    stages = stages_run(capsys.readouterr().out)
    assert stages == ["generate cf-heldout (30 samples, torch)", "eval base", "eval full"]
    rows = json.loads((out / "results.json").read_text())
    assert [r["metrics"]["kl"]["n"] for r in rows] == [30, 30]
    assert len({r["metrics"]["kl"]["samples_digest"] for r in rows}) == 1


BF16_POOLS = {"max_new_tokens": 8, "heldout": 24, "batch_size": 8, "device": "cpu", "dtype": "bf16"}


def test_heldout_set_is_drawn_in_the_scoring_precision(tiny_model, tmp_path):
    """One precision rule (issue 9, item 8): log-likelihoods in fp32 by default. The held-out KL
    samples are drawn in `eval.score_dtype` whatever the pools use, so they are draws of the base
    the KL scores: its own KL is 0 with no re-scoring pass, in fp32 and when bf16 is forced."""
    runs = [{"name": "full", "method": "full"}]
    fp32 = run(RunConfig(experiment=str(write_config(tmp_path, tiny_model, runs=runs,
                                                     cf=BF16_POOLS)),
                         out=str(tmp_path / "a")))
    rows = json.loads((fp32 / "results.json").read_text())
    assert abs(rows[0]["metrics"]["kl"]["value"]) < 1e-4
    held = {read_manifest(f)["logp_dtype"] for f in (fp32 / "cf").glob("cf-heldout-*")}
    assert held == {"fp32"}
    ev = {"task_limit": 3, "max_new_tokens": 8, "batch_size": 4, "score_dtype": "bf16",
          "decode_dtype": "bf16"}
    bf16 = run(RunConfig(experiment=str(write_config(tmp_path, tiny_model, runs=runs, eval=ev,
                                                     cf=BF16_POOLS)),
                         out=str(tmp_path / "a")))
    rows16 = json.loads((bf16 / "results.json").read_text())
    assert abs(rows16[0]["metrics"]["kl"]["value"]) < 1e-6
    held = {read_manifest(f)["logp_dtype"] for f in (bf16 / "cf").glob("cf-heldout-*")}
    assert held == {"fp32", "bf16"}  # a second held-out folder, drawn in bf16
    # full's KL in bf16 against the bf16 base stays close to the fp32 estimate
    assert rows16[1]["metrics"]["kl"]["value"] == pytest.approx(
        rows[1]["metrics"]["kl"]["value"], rel=0.15, abs=0.05)


def test_cli_eval_and_runner_share_one_evaluation(tiny_model, tmp_path, capsys):
    """One evaluation path (issue 30): for the same model and settings, `cftune eval` reports
    exactly the metrics the runner's evaluation stage stores, under the same names and with the
    same values; with bf16 decoding asked of both, every log-likelihood metric is still fp32."""
    bench = tmp_path / "mc.jsonl"
    bench.write_text("".join(json.dumps({"context": f"Q{i}: pick\nA:", "choices": ["x", "yy", "z"],
                                         "gold": i % 3}) + "\n" for i in range(6)))
    runs = [{"name": "full", "method": "full"}]
    ev = {"task_limit": 5, "limit": 5, "bench": [str(bench)], "max_new_tokens": 8,
          "batch_size": 4, "decode_dtype": "bf16"}
    out = run(RunConfig(experiment=str(write_config(tmp_path, tiny_model, runs=runs, eval=ev)),
                        out=str(tmp_path / "e")))
    heldout = next((out / "cf").glob("cf-heldout-*"))
    model = next((out / "runs").glob("full-*"))
    test_file = next((out / "data").glob("*/test.jsonl"))
    stage = json.loads(next((out / "evals").glob("full-*")).joinpath("result.json").read_text())
    assert cli_main(["eval", "--base", str(tiny_model), "--model", str(model), "--kl-samples",
                     str(heldout), "--task", str(test_file), "--bench", str(bench), "--limit", "5",
                     "--task-prompt", "chat", "--max-new-tokens", "8", "--batch-size", "4",
                     "--decode-dtype", "bf16", "--no-cache", "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    cli = {e["metric"]: e for e in report["results"] if e["model"] == str(model)}
    assert sorted(cli) == sorted(stage["metrics"])  # the same names
    assert set(cli) >= {"task_acc", "task_nll", "kl", "kl_per_token", "bench/mc", "bench_avg"}
    for name, metric in stage["metrics"].items():
        assert (cli[name]["value"], cli[name]["n"]) == (metric["value"], metric["n"]), name
    assert stage["metrics"]["task_nll"]["n"] == 4 and stage["metrics"]["bench/mc"]["n"] == 5


def test_contextual_answers_are_posed_as_training_and_as_long_as_eval(tiny_model, tmp_path):
    """The contextual baseline answers the training prompt as training poses it, up to the
    evaluation's answer length by default (issue 9, item 3)."""
    from cftune.experiment.config import Experiment
    from cftune.experiment.plan import Runner
    from cftune.generate.samples import iter_samples
    from cftune.io import read_manifest

    ev = {"task_limit": 3, "max_new_tokens": 11, "batch_size": 4}
    path = write_config(tmp_path, tiny_model, eval=ev,
                        runs=[{"name": "ctx", "method": "contextual"}])
    runner = Runner(Experiment(path, tmp_path / "e"), [])
    for stage in runner.stages:
        if stage.name == "data" or stage.name.startswith("generate contextual"):
            perform(stage, runner)
    manifest = read_manifest(runner.contextual[0])
    assert manifest["sampling"]["max_new_tokens"] == 11
    assert manifest["task_prompt_format"] == "chat"
    cfg = runner.exp.train_config(runner.runs[0])
    tok = load_tokenizer(tiny_model)
    row = json.loads(runner.train_file.read_text().splitlines()[0])
    ids, labels = data.task_example(row, tok, cfg.task_format(), "row")
    first = next(i for i, t in enumerate(labels) if t != -100)
    record = next(r for r in iter_samples(runner.contextual[0]) if r["id"] == 0)
    assert record["prompt_ids"] == ids[:first]


def test_seeds_replicate_runs_and_the_report_pairs_them(tiny_model, tmp_path, capsys):
    """`seeds: [0, 1]` trains every run once per seed (other data order, other CF draw) on one
    evaluation set; group rows average the seeds with a t interval; `eval.compare` pairs two
    groups item by item; `cftune report` re-renders the same files from results.json."""
    from cftune.io import read_manifest
    from cftune.stats import t_quantile

    ev = {"task_limit": 3, "max_new_tokens": 8, "batch_size": 4, "compare": [["full", "cfs"]]}
    path = write_config(tmp_path, tiny_model, seeds=[0, 1], eval=ev, runs=[
        {"name": "full", "method": "full"}, {"name": "cfs", "method": "cfs"},
        {"name": "wise", "method": "wise-ft", "of": "full", "alphas": [0.5], "seeds": [1]}])
    out = run(RunConfig(experiment=str(path), out=str(tmp_path / "e"), only=["full-s0"]))
    assert "comparison cfs vs full skipped: cfs is not evaluated yet" in capsys.readouterr().out
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"base", "full-s0"}
    run(RunConfig(experiment=str(path), out=str(tmp_path / "e")))  # the rest; full-s0 is kept
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    assert {"full-s0", "full-s1", "cfs-s0", "cfs-s1", "full (2 seeds)", "cfs (2 seeds)"} <= set(rows)
    wise = [r for r in rows if r.startswith("wise")]  # a run's own seeds: one copy, no group row
    assert wise == ["wise-a0.5-s1"] and rows["wise-a0.5-s1"]["parent"] == "full-s1"
    pools = sorted((out / "cf").glob("cf-pool-s*"))
    assert len(pools) == 2 and read_manifest(pools[0])["sampling"]["seed"] != \
        read_manifest(pools[1])["sampling"]["seed"]
    kls = [rows[f"full-s{s}"]["metrics"]["kl"]["value"] for s in (0, 1)]
    assert kls[0] != kls[1]  # another data order trains another model
    group = rows["full (2 seeds)"]["metrics"]["kl"]
    mean, sd = sum(kls) / 2, abs(kls[0] - kls[1]) / 2 ** 0.5
    assert group["value"] == pytest.approx(mean)
    assert group["ci95"][1] - mean == pytest.approx(t_quantile(0.975, 1) * sd / 2 ** 0.5)
    assert "paired/task_acc" in rows["full-s0"]["metrics"]
    assert "paired/task_nll" in rows["full (2 seeds)"]["metrics"]
    comparisons = json.loads((out / "comparisons.json").read_text())
    assert comparisons[0]["ref"] == "full" and "paired/kl" in comparisons[0]["metrics"]
    ratio = comparisons[0]["metrics"]["ratio/kl"]  # cfs's KL as a fraction of full's, per seed
    per_seed = [rows[f"cfs-s{s}"]["metrics"]["kl"]["value"] / kls[s] for s in (0, 1)]
    assert ratio["value"] == pytest.approx(sum(per_seed) / 2) and ratio["n"] == 2
    gains = [[rows[f"{m}-s{s}"]["metrics"]["paired/task_nll"]["value"] for s in (0, 1)]
             for m in ("full", "cfs")]
    assert comparisons[0]["metrics"]["ratio/task_gain"]["value"] == pytest.approx(
        sum(c / f for f, c in zip(*gains)) / 2)
    md = (out / "results.md").read_text()
    assert "## Paired against the base" in md and "cfs vs full" in md
    assert "As fractions of full's, seed by seed (2 seeds" in md
    (out / "results.md").unlink()
    assert cli_main(["report", str(out)]) == 0
    assert (out / "results.md").read_text() == md
    capsys.readouterr()
    # `--only` runs nothing more here, and its report still holds every run evaluated.
    run(RunConfig(experiment=str(path), out=str(tmp_path / "e"), only=["full-s0"]))
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "results.md").read_text() == md


def test_instruction_yardsticks_in_the_runner(tiny_model, tmp_path):
    """Held-out instructions give instr_kl (0 for the base, by construction) and the reference
    responses' NLL, paired per prompt against the base. A search split (`offset`,
    `instruction_offset`) scores only the items from there on; `task_acc: false` skips decoding."""
    instructions = tmp_path / "instr.jsonl"
    instructions.write_text("".join(json.dumps({"prompt": f"Say {w}.", "reference": f"{w}!"}) + "\n"
                                    for w in ("skipped", "hi", "yes", "blue", "cat", "tea")))
    bench = tmp_path / "mine.jsonl"
    bench.write_text("".join(json.dumps({"context": f"{i} +", "choices": ["1", "2"], "gold": i % 2})
                             + "\n" for i in range(6)))
    ev = {"task_limit": 3, "max_new_tokens": 8, "batch_size": 4, "bench": [f"mine={bench}"],
          "limit": 2, "offset": 3, "task_acc": False, "plot_y": "task_nll",
          "instructions": str(instructions), "instruction_max_new_tokens": 6,
          "instruction_offset": 1}
    path = write_config(tmp_path, tiny_model, eval=ev, runs=[{"name": "full", "method": "full"}])
    out = run(RunConfig(experiment=str(path), out=str(tmp_path / "e")))
    base, full = json.loads((out / "results.json").read_text())
    assert abs(base["metrics"]["instr_kl"]["value"]) < 1e-4
    assert base["metrics"]["instr_kl"]["n"] == 10  # 5 prompts x 2 responses
    assert full["metrics"]["instr_kl"]["value"] != 0
    assert "task_acc" not in full["metrics"] and "task_nll" in full["metrics"]
    result = json.loads(next((out / "evals").glob("full-*/result.json")).read_text())
    assert result["name"] == "full" and result["seconds"] > 0  # what was scored, how long it took
    assert {"python", "cftune", "torch", "transformers"} <= set(result["versions"])
    assert [r["index"] for r in result["items"]["bench/mine"]["records"]] == [3, 4]
    assert full["metrics"]["paired/mine"]["n"] == 2
    paired = full["metrics"]["paired/instr_ref_nll"]
    assert paired["n"] == 5 and paired["value"] == pytest.approx(
        full["metrics"]["instr_ref_nll"]["value"] - base["metrics"]["instr_ref_nll"]["value"])


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (REPO / ".gitignore").is_file() or shutil.which("git") is None,
                    reason="needs git and the repository's .gitignore (a source checkout)")
def test_a_committed_experiment_reports_without_its_weights(tiny_model, tmp_path, capsys):
    """An experiment under docs/experiments/NAME, committed as the repository's .gitignore
    keeps it (no weights, data or CF pools) and checked out at another path, reports without
    training again, and a missing evaluation re-creates exactly what it needs. (A .gitignore that
    hid the evaluations, as `experiments/` once hid docs/experiments/, fails this.)"""
    instructions = tmp_path / "instr.jsonl"
    instructions.write_text("".join(json.dumps({"prompt": f"Say {w}.", "reference": f"{w}!"}) +
                                    "\n" for w in ("hi", "yes", "blue")))
    ev = {"task_limit": 3, "max_new_tokens": 8, "batch_size": 4, "instructions": str(instructions),
          "instruction_max_new_tokens": 6}
    path = write_config(tmp_path, tiny_model, eval=ev)
    repo = tmp_path / "repo"
    (repo / "docs" / "experiments").mkdir(parents=True)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    run(RunConfig(experiment=str(path), out=str(repo / "docs" / "experiments" / "exp")))
    capsys.readouterr()
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    kept = subprocess.run([*git, "ls-files", "--others", "--exclude-standard", "-z"],
                          check=True, capture_output=True, text=True).stdout.split("\0")
    kept = [k for k in kept if k]
    assert not [k for k in kept if k.endswith((".safetensors", "train.jsonl", "instr.jsonl"))]
    assert any(k.endswith("result.json") for k in kept)
    clone = tmp_path / "clone"
    for name in kept:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / name, clone / name)
    out = clone / "docs" / "experiments" / "exp"

    run(RunConfig(experiment=str(path), out=str(out)))
    again = capsys.readouterr().out
    assert stages_run(again) == [] and "nothing to do" in again
    before = json.loads((repo / "docs/experiments/exp/results.json").read_text())
    assert json.loads((out / "results.json").read_text()) == before

    shutil.rmtree(next((out / "evals").glob("wise-a0.5-*")))  # Wise-FT needs full's weights
    run(RunConfig(experiment=str(path), out=str(out)))
    assert [s.split(" (")[0] for s in stages_run(capsys.readouterr().out)] == [
        "data", "generate instructions", "train full", "merge wise-a0.5", "eval wise-a0.5"]
    def values(rows: list[dict]) -> dict[str, dict[str, float]]:
        return {r["run"]: {k: m["value"] for k, m in r["metrics"].items()} for r in rows}
    after = values(json.loads((out / "results.json").read_text()))
    assert after.keys() == values(before).keys()
    for name, metrics in values(before).items():  # full trained again: the same model
        assert after[name] == pytest.approx(metrics, rel=1e-4, abs=1e-6), name


def test_report_refuses_kls_on_other_cf_samples_and_notes_other_response_draws(tmp_path,
                                                                               capsys):
    """A KL on other held-out CF samples pairs with nothing: the report refuses, naming the runs
    of each set. The instruction KL pairs prompt by prompt whatever draw of the base's responses
    it was scored on (responses drawn again on another CPU differ): noted, not refused."""
    from cftune.experiment.results import _same_samples

    def row(run: str, kl: str | None, instr: str | None) -> dict:
        return {"run": run, "metrics": {"kl": {"samples_digest": kl},
                                        "instr_kl": {"samples_digest": instr}}}
    _same_samples([row("base", "a", "x"), row("full", "a", "x")], tmp_path)
    assert capsys.readouterr().err == ""
    _same_samples([row("base", "a", "x"), row("full", "a", "y")], tmp_path)
    assert "instr_kl was scored on different draws" in capsys.readouterr().err
    _same_samples([row("base", "a", "x"), row("full", "a", None)], tmp_path)
    assert "unrecorded: full" in capsys.readouterr().err
    _same_samples([row("base", None, None), row("full", "a", "x")], tmp_path)
    assert capsys.readouterr().err == ""  # the base's KL is 0 on any set
    with pytest.raises(CftuneError, match=r"kl .* 2 different sets .*\(base; full\)"):
        _same_samples([row("base", "a", "x"), row("full", "b", "x")], tmp_path)
