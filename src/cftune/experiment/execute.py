"""`cftune run CONFIG`: one YAML file → the whole comparison, a results table and a trade-off plot.

An experiment is a DAG of stages: task data → CF samples (a training pool and a held-out T=1 set)
→ one training run per method → Wise-FT merges → evaluations → report. Every stage writes into a
folder named by the hash of everything it depends on, and a stage whose folder already holds its
finished output is skipped: a second `cftune run` does no work, a changed setting redoes only the
stages downstream of it, and a killed run resumes (generation and training resume internally too).

The config format is `cftune.experiment.config`'s; the stages are planned by
`cftune.experiment.plan` and performed here (`perform`: the library's generate, train, merge and
`evaluate_model` on the yardsticks `cftune.experiment.evaluation` describes); rows and
comparisons come from `cftune.experiment.results`.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cftune.config import field, from_dict
from cftune.evaluate.model import evaluate_model
from cftune.evaluate.responses import draw_responses
from cftune.experiment.config import Experiment
from cftune.experiment.data import write_replay, write_task_data
from cftune.experiment.evaluation import measure
from cftune.experiment.plan import Runner, Stage, has_weights
from cftune.experiment.results import collect, write_cards
from cftune.generate.stage import generate
from cftune.io import atomic_write_json
from cftune.locking import output_lock
from cftune.merge import MergeConfig, merge
from cftune.train.config import TRACKERS, TrainConfig, check_tracker
from cftune.train.stage import train


@dataclass
class RunConfig:
    """Settings of `cftune run` itself (the experiment is described by the YAML file)."""

    experiment: str = field("configs/quickstart.yaml", "experiment YAML file")
    out: str | None = field(None, "experiment folder (default: experiments/<file name>)")
    stages: str | None = field(None, "folder of the stages (data, CF pools, trained models, "
                               "evaluations), shared by configs run into it: a stage another "
                               "config already ran is reused (default: the experiment folder)")
    only: list[str] = field([], "run only these runs (and what they need); the report still "
                            "holds every run of the config evaluated so far")
    dry_run: bool = field(False, "print the stages and whether each is cached, then stop")
    report_to: str | None = field(None, f"experiment tracker of every training run "
                                  f"({', '.join(TRACKERS)} or none), each logged under its run's "
                                  "name; over the config's `train: {report_to: ...}`; in no "
                                  "stage key")

    POSITIONAL = "experiment"  # `cftune run CONFIG`


def _kind(stage: Stage) -> str:
    return stage.name.split()[0]  # generate / train / merge / eval / data / replay


def _eta(remaining: list[Stage], spent: dict[str, list[tuple[float, float]]]) -> str:
    """A rough time left: a remaining stage takes its cost times the seconds per unit of cost
    that finished stages of its kind took; a kind not seen yet, the mean finished stage."""
    if not spent:
        return ""
    every = [seconds for done in spent.values() for seconds, _ in done]
    guess = 0.0
    for s in remaining:
        done = spent.get(_kind(s))
        guess += (sum(t for t, _ in done) / sum(c for _, c in done) * s.cost if done
                  else sum(every) / len(every))
    return f" (~{guess / 60:.0f} min left)"


def perform(stage: Stage, runner: Runner) -> None:
    """Do what a planned stage describes: the one place the runner calls the library's stages."""
    exp, a = runner.exp, stage.args
    if stage.action == "data":
        write_task_data(exp, runner.train_file, runner.test_file)
    elif stage.action == "replay":
        write_replay(exp.replay, runner.replay_file)
    elif stage.action == "generate":
        generate(a["config"])
    elif stage.action == "instructions":
        e = exp.eval
        draw_responses(exp.model, e.instructions, e.instruction_samples,
                       e.instruction_max_new_tokens, out=stage.folder, limit=e.instruction_limit,
                       offset=e.instruction_offset, batch_size=exp.cf.batch_size,
                       dtype=e.score_dtype, doc_start=exp.task.doc_start,
                       base_fingerprint=runner.base_fp)
    elif stage.action == "train":
        # resume: a killed `cftune run` continues its training from the last checkpoint (not a
        # setting: the folder's key and the trained model are the same either way)
        _clear_record(stage.folder)
        train(from_dict(TrainConfig, {**a["settings"], "out": str(stage.folder), "resume": True}))
    elif stage.action == "merge":
        _clear_record(stage.folder)
        merge(MergeConfig(finetuned=str(a["parent"]), out=str(stage.folder), base=exp.model,
                          alpha=a["alpha"]))
    elif stage.action == "eval":
        m = measure(exp, runner.heldout, runner.test_file, runner.instructions)
        result = evaluate_model(a["model"], m, runner.base_fp)
        stage.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stage.folder / "result.json", {
            "model": result["model"], "name": a["name"], "metrics": result["metrics"],
            "items": result["items"], "seconds": result["seconds"],
            "versions": result["versions"]})
    else:
        raise AssertionError(f"stage {stage.name}: unknown action {stage.action}")


def _clear_record(folder: Path) -> None:
    """Empty a model folder kept without its weights (a committed record) before the model is
    made again: its manifest would otherwise pass for a finished run."""
    if (folder / "manifest.json").is_file() and not has_weights(folder):
        shutil.rmtree(folder)


def execute(runner: Runner, dry_run: bool = False
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """Run the stages not cached, one at a time with an ETA, and collect the results (rows,
    comparisons); `dry_run`: list every wanted stage and whether it is cached, run nothing."""
    todo = runner.todo()
    if dry_run:  # the stages of the wanted runs, in plan order
        listed = runner.upstream(lambda stage: True)
        listed = [s for s in runner.stages if any(s is x for x in listed)]
        for i, s in enumerate(listed, 1):
            state = "to do" if s in todo else "cached" if s.done() else "unneeded"
            print(f"[{i}/{len(listed)}] {s.name:32s} {state:7s} {s.folder}")
        return None
    for s in todo:  # a missing tracker package fails now, not after hours of other stages
        if s.action == "train":
            check_tracker(s.args["settings"].get("report_to", "none"))
    spent: dict[str, list[tuple[float, float]]] = {}  # (seconds, cost) of finished stages
    for i, s in enumerate(todo, 1):
        print(f"== [{i}/{len(todo)}] {s.name} -> {s.folder}{_eta(todo[i - 1:], spent)}",
              flush=True)
        t = time.time()
        perform(s, runner)
        spent.setdefault(_kind(s), []).append((time.time() - t, s.cost))
    if not todo:
        print(f"{runner.out}: every stage is cached; nothing to do")
    return collect(runner)


def run(config: RunConfig) -> Path | None:
    """Run (or resume) an experiment; write results.{csv,json,md} and tradeoff.png."""
    from cftune.results.report import write_report
    from cftune.results.tables import print_table

    path = Path(config.experiment)
    exp = Experiment(path, Path(config.out) if config.out else None, report_to=config.report_to)
    runner = Runner(exp, config.only, Path(config.stages) if config.stages else None)
    with contextlib.ExitStack() as locks:
        if not config.dry_run:
            for folder in dict.fromkeys((runner.out, exp.out)):
                locks.enter_context(output_lock(folder))
        done = execute(runner, dry_run=config.dry_run)
        if done is None:
            return None
        rows, comparisons = done
        exp.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(exp.out / "results.json", rows)
        atomic_write_json(exp.out / "comparisons.json", comparisons)
        # after results.json: a frontier that cannot read its evaluations leaves the rows kept
        write_report(rows, exp.out, y_name=exp.eval.plot_y, comparisons=comparisons,
                     evals=runner.out / "evals")
        write_cards(runner, rows, comparisons)  # each model folder's README.md, with its numbers
    print_table(rows)
    print(f"wrote {exp.out}/results.csv, results.md, results.json, comparisons.json, "
          f"tradeoff.png (`cftune report {exp.out}` re-renders them)")
    return exp.out
