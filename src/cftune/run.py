"""`cftune run CONFIG`: one YAML file → the whole comparison, a results table and a trade-off plot.

An experiment is a DAG of stages: task data → CF samples (a training pool and a held-out T=1 set)
→ one training run per method → Wise-FT merges → evaluations → report. Every stage writes into a
folder named by the hash of everything it depends on, and a stage whose folder already holds its
finished output is skipped: a second `cftune run` does no work, a changed setting redoes only the
stages downstream of it, and a killed run resumes (generation and training resume internally too).

The config format is `cftune.experiment`'s; the evaluation stage is `cftune.run_eval`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cftune.config import field, from_dict
from cftune.errors import CftuneError
from cftune.experiment import CF_METHODS, STREAM_METHODS, WISE_FT, Experiment
from cftune.experiment import stage_key as _key
from cftune.generate import GenerateConfig, engine_settings, without_later_defaults
from cftune.locking import output_lock
from cftune.models import fingerprint
from cftune.run_eval import evaluate_one
from cftune.samples import atomic_write_json, read_json
from cftune.train import NOT_A_SETTING, TrainConfig

EVAL_VERSION = 4  # part of every eval stage's key: bump when the metrics computed change


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

    POSITIONAL = "experiment"  # `cftune run CONFIG`


@dataclass
class Stage:
    """One unit of work: its name, output folder, and the function that fills the folder.
    `cost` is its size in its kind's units (training examples, sampled tokens), for the ETA;
    `needs`: the stages it reads, so a stage runs only while a missing evaluation needs it."""

    name: str
    folder: Path
    work: Callable[[], None]
    done: Callable[[], bool]
    cost: float = 1.0
    needs: tuple[Path, ...] = ()  # folders of the stages whose output this one reads


def _pool_id(run: dict[str, Any]) -> str:
    """Which CF pool a run trains on: its own `cf` settings, as canonical JSON ("{}": the
    config's pool)."""
    return json.dumps(run.get("cf") or {}, sort_keys=True)


class Runner:
    """Turns an `Experiment` into stages and runs those not cached."""

    def __init__(self, exp: Experiment, only: list[str], stages: Path | None = None):
        self.exp = exp
        self.out = stages or exp.out  # where the stages live; the report goes to exp.out
        unknown = sorted(set(only) - {r["name"] for r in exp.runs})
        if unknown:
            raise CftuneError(f"--only: unknown run(s) {', '.join(unknown)}")
        # The whole config is planned (so the report can hold every evaluation already done);
        # `only` narrows what is run to these runs' evaluations and what they need.
        self.wanted = {"base", *(only or (r["name"] for r in exp.runs))}
        self.runs = exp.runs
        self.base_fp = fingerprint(exp.model)
        self.stages: list[Stage] = []
        self.models: dict[str, Path | str] = {"base": exp.model}
        self._plan()

    # ------------------------------------------------------------------ planning

    def _plan(self) -> None:
        exp = self.exp
        data_key = self._key(dataclasses.asdict(exp.task))
        data_dir = self.out / "data" / data_key
        self.train_file, self.test_file = data_dir / "train.jsonl", data_dir / "test.jsonl"
        self._add("data", data_dir, self._write_data, lambda: self.test_file.is_file())

        trained = [r for r in self.runs if r["method"] != WISE_FT]
        # Over every run of the config: the pool is the same folder whichever runs `--only`
        # asks for (a pool drawn without top-K for `--only cfs` would be another folder).
        kd = any(r["method"] == "kd" for r in exp.runs)
        cf_settings = {**dataclasses.asdict(exp.cf), "topk_logprobs":
                       max(exp.cf.topk_logprobs, 20 if kd else 0)}
        contextual_settings = {
            **cf_settings, "task_prompts": str(self.train_file), "topk_logprobs": 0,
            "prompt_field": exp.task.prompt_field, "prompt_format": exp.task.prompt,
            "doc_start": exp.task.doc_start,
            "max_new_tokens": exp.contextual.max_new_tokens or exp.eval.max_new_tokens}
        # Fresh samples per seed: the CF draw is part of what a seed replicates. Seed `seed`
        # draws from the pool seed `cf.seed` (so a one-seed config keeps its folders).
        # A run's own `cf` settings (an ablation of the CF temperature or start) give it a pool
        # of its own; the runs without share the config's.
        self.pool: dict[tuple[int, str], Path] = {}
        self.contextual: dict[int, Path] = {}
        for s in dict.fromkeys(r["seed"] for r in trained):
            mine = [r for r in trained if r["seed"] == s]
            cf_seed, tag = exp.cf.seed + s - exp.seed, f"-s{s}" if len(exp.seeds) > 1 else ""
            for over in dict.fromkeys(_pool_id(r) for r in mine if r["method"] in CF_METHODS):
                need = max(exp.cf_consumed(r) for r in mine
                           if r["method"] in CF_METHODS and _pool_id(r) == over)
                own = json.loads(over)
                name = "cf-pool" + "".join(f"-{k}={v}" for k, v in own.items()) + tag
                self.pool[s, over] = self._generate_stage(name, {**cf_settings, **own}, need,
                                                          cf_seed)
            need = max([exp.cf_consumed(r) for r in mine if r["method"] == "contextual"] or [0])
            if need:  # the base's own answers to the training prompts, posed as in training
                self.contextual[s] = self._generate_stage(f"contextual{tag}", contextual_settings,
                                                          need, cf_seed, needs=(data_dir,))
        self.replay_file = None
        if any(r["method"] == "replay" for r in trained):
            if not exp.replay.file:
                raise CftuneError(f"{exp.path}: a replay run needs `replay: {{file: ...}}`")
            folder = self.out / "data" / f"replay-{self._key(dataclasses.asdict(exp.replay))}"
            self.replay_file = folder / "replay.jsonl"
            self._add("replay corpus", folder, self._write_replay,
                      lambda: self.replay_file.is_file())
        held_seed = exp.cf.seed + 1_000_003  # disjoint random streams from the pool's
        self.heldout = self._generate_stage(
            # Unfiltered T=1 draws: the KL estimate is unbiased only for samples x ~ p_base, the
            # base as the KL scores it: drawn in `eval.score_dtype`, whatever the pools use.
            "cf-heldout", {**cf_settings, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                           "min_p": 0.0, "topk_logprobs": 0, "dedup": False, "min_tokens": 0,
                           "dtype": exp.eval.score_dtype},
            exp.cf_heldout, held_seed)

        for r in self.runs:
            if r["method"] == WISE_FT:
                parent = self.models[r["of"]]
                folder = self.out / "runs" / f"{r['name']}-{self._key(parent, r['alpha'])}"
                self._add(f"merge {r['name']}", folder, self._merge_work(parent, folder, r["alpha"]),
                          lambda f=folder: _has_weights(f), needs=(Path(parent),))
            else:
                stream = {"replay": self.replay_file,
                          "contextual": self.contextual.get(r["seed"])}.get(
                    r["method"], self.pool.get((r["seed"], _pool_id(r))))
                settings = exp.train_settings(r, self.train_file, stream)
                # memory and resume options do not change the model: they keep the folder
                kept = {k: v for k, v in settings.items() if k not in NOT_A_SETTING}
                folder = self.out / "runs" / f"{r['name']}-{self._key(kept, self.base_fp)}"
                examples = (settings.get("max_steps") or 1) * (settings.get("batch_size") or 1)
                self._add(f"train {r['name']}", folder, self._train_work(settings, folder),
                          lambda f=folder: _has_weights(f), cost=examples,
                          needs=(data_dir,) + ((_stage_of(stream),)
                                               if r["method"] in STREAM_METHODS else ()))
            self.models[r["name"]] = folder
        measured = {k: v for k, v in dataclasses.asdict(exp.eval).items()
                    if k not in ("plot_y", "compare")  # report settings, not measurements
                    and not (k == "decode_engine" and v == "auto")  # added later: old keys
                    and not (k.startswith("instruction") and exp.eval.instructions is None)}
        # The held-out folder is extended in place when `cf.heldout` grows: the count is part of
        # the key (sample i is fixed), so a changed count re-scores every model on the new set.
        eval_key = self._key(measured, self.heldout, exp.cf_heldout, self.test_file,
                             exp.task.prompt_spec, EVAL_VERSION)
        self.instructions = None
        if exp.eval.instructions:
            self.instructions = self._instruction_stage()
        for name, model in self.models.items():
            folder = self.out / "evals" / f"{name}-{self._key(model, eval_key)}"
            inputs = (data_dir, self.heldout, *([self.instructions] if self.instructions else []),
                      *([] if isinstance(model, str) else [model]))
            self._add(f"eval {name}", folder, self._eval_work(name, model, folder),
                      lambda f=folder: (f / "result.json").is_file(), needs=inputs)

    def _instruction_stage(self) -> Path:
        """The base's T=1 responses to the held-out instructions (drawn once, for instr_kl)."""
        from cftune.evaluate.instructions import PROMPTS_FILE, RESPONSES, draw_responses

        e = self.exp.eval
        settings = {"file": e.instructions, "limit": e.instruction_limit,
                    "offset": e.instruction_offset,
                    "samples": e.instruction_samples, "max_new_tokens": e.instruction_max_new_tokens,
                    "doc_start": self.exp.task.doc_start, "dtype": e.score_dtype}
        folder = self.out / "cf" / f"instructions-{self._key(settings, self.base_fp)}"

        def work() -> None:
            draw_responses(self.exp.model, e.instructions, e.instruction_samples,
                           e.instruction_max_new_tokens, out=folder, limit=e.instruction_limit,
                           offset=e.instruction_offset,
                           batch_size=self.exp.cf.batch_size, dtype=e.score_dtype,
                           doc_start=self.exp.task.doc_start, base_fingerprint=self.base_fp)
        n = e.instruction_samples * (e.instruction_limit or 175)  # a cost estimate only
        self._add(f"generate instructions ({n} responses)", folder, work,
                  # the instructions file is re-read from the config's where a committed
                  # folder was kept without it (a copy of data the repository must not hold)
                  lambda: (folder / RESPONSES / "manifest.json").is_file()
                  and (folder / PROMPTS_FILE).is_file(),
                  cost=n * e.instruction_max_new_tokens)
        return folder

    def _key(self, *parts: Any) -> str:
        """A stage key in which the paths of other stages count relative to the stages folder,
        so a folder moved, cloned elsewhere or named by another path keeps every key."""
        root = str(self.out).rstrip("/") + "/"

        def portable(value: Any) -> Any:
            if isinstance(value, Path):
                value = str(value)
            if isinstance(value, str) and value.startswith(root):
                return value[len(root):]
            if isinstance(value, dict):
                return {k: portable(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [portable(v) for v in value]
            return value
        return _key(*(portable(p) for p in parts))

    def _add(self, name: str, folder: Path, work: Callable[[], None],
             done: Callable[[], bool], cost: float = 1.0, needs: tuple[Path, ...] = ()) -> None:
        self.stages.append(Stage(name, folder, work, done, cost, needs))

    def _generate_stage(self, name: str, settings: dict[str, Any], n: int, seed: int,
                        needs: tuple[Path, ...] = ()) -> Path:
        from cftune.generate import generate

        # Keyed by the engine that will draw.
        settings = engine_settings({**settings, "seed": seed, "num_samples": n})
        # The folder is keyed without the count: asking for more samples extends it (sample i
        # is the same either way), so a longer training run reuses what was drawn.
        key = self._key(without_later_defaults({**settings, "out": None, "num_samples": None}),
                   self.base_fp)
        folder = self.out / "cf" / f"{name}-{key}"
        config = GenerateConfig(**{**settings, "out": str(folder)})

        def done() -> bool:
            m = folder / "manifest.json"
            return m.is_file() and read_json(m)["counts"]["samples"] >= n

        engine = f", {config.engine}" + (" rescored" if config.rescore else "")
        self._add(f"generate {name} ({n} samples{engine})", folder, lambda: generate(config), done,
                  cost=n * (settings.get("max_new_tokens") or 1), needs=needs)
        return folder

    # ------------------------------------------------------------------ stage work

    def _write_data(self) -> None:
        from cftune.tasks import is_builtin, resolve_task, write_jsonl

        t = self.exp.task
        for spec, split, n, path in ((t.train, "train", t.train_rows, self.train_file),
                                     (t.test, "test", t.test_rows, self.test_file)):
            if is_builtin(spec):
                write_jsonl(resolve_task(spec, split, n, t.seed), path)
            else:
                src = Path(spec)
                if not src.is_file():
                    raise CftuneError(f"{self.exp.path}: task.{split} file {src} not found")
                from cftune.samples import iter_jsonl

                rows = list(iter_jsonl(src)) if src.suffix == ".jsonl" else None
                if rows is None:
                    raise CftuneError(f"{self.exp.path}: task.{split}: the runner reads JSONL "
                                      f"task files (got {src.suffix})")
                write_jsonl(rows[: n or None], path)

    def _write_replay(self) -> None:
        from cftune.samples import iter_jsonl
        from cftune.tasks import write_jsonl

        spec = self.exp.replay
        rows = []
        for n, row in enumerate(iter_jsonl(Path(spec.file)), 1):
            missing = [f for f in spec.fields if f not in row]
            if missing:
                raise CftuneError(f"{spec.file} line {n}: no field(s) {', '.join(missing)} "
                                  "(set replay.fields)")
            rows.append({"text": spec.join.join(str(row[f]) for f in spec.fields)})
            if spec.rows and len(rows) >= spec.rows:
                break
        write_jsonl(rows, self.replay_file)

    def _train_work(self, settings: dict[str, Any], folder: Path) -> Callable[[], None]:
        from cftune.train import train

        # resume: a killed `cftune run` continues its training from the last checkpoint (not a
        # setting: the folder's key and the trained model are the same either way)
        def work() -> None:
            _clear_record(folder)
            train(from_dict(TrainConfig, {**settings, "out": str(folder), "resume": True}))
        return work

    def _merge_work(self, parent: Path, folder: Path, alpha: float) -> Callable[[], None]:
        from cftune.merge import MergeConfig, merge

        def work() -> None:
            _clear_record(folder)
            merge(MergeConfig(finetuned=str(parent), out=str(folder), base=self.exp.model,
                              alpha=alpha))
        return work

    def _eval_work(self, name: str, model_path: Path | str, folder: Path) -> Callable[[], None]:
        def work() -> None:
            atomic_write_json_mkdir(folder / "result.json",
                                    evaluate_one(self.exp, name, model_path, self.heldout,
                                                 self.test_file, self.base_fp,
                                                 self.instructions))
        return work

    # ------------------------------------------------------------------ running

    def todo(self) -> list[Stage]:
        """The stages to run: each evaluation not yet done, right after what it needs that is
        not done, so results land one model at a time (a run cut short keeps every evaluation
        it finished). A stage no missing evaluation needs is not run even when its folder is
        incomplete: an experiment folder kept without its model weights (committed results, a
        clone on another machine) reports without training again, and trains again only a model
        whose evaluation, or whose Wise-FT merge's evaluation, is missing."""
        return self._upstream(lambda stage: not stage.done())

    def _upstream(self, follow: Callable[[Stage], bool]) -> list[Stage]:
        """The wanted runs' evaluations and, depth first, the stages they need, entering only
        the stages `follow` accepts; each needed stage before the stage that reads it."""
        by_folder = {s.folder: s for s in self.stages}
        order: list[Stage] = []

        def want(stage: Stage) -> None:
            if any(stage is s for s in order) or not follow(stage):
                return
            for folder in stage.needs:
                want(by_folder[folder])
            order.append(stage)
        for name in self.models:
            if name in self.wanted:
                want(self._eval_stage(name))
        return order

    def _eval_stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == f"eval {name}")

    def run(self, dry_run: bool = False
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        todo = self.todo()
        if dry_run:  # the stages of the wanted runs, in plan order
            listed = self._upstream(lambda stage: True)
            listed = [s for s in self.stages if any(s is x for x in listed)]
            for i, s in enumerate(listed, 1):
                state = "to do" if s in todo else "cached" if s.done() else "unneeded"
                print(f"[{i}/{len(listed)}] {s.name:32s} {state:7s} {s.folder}")
            return None
        spent: dict[str, list[tuple[float, float]]] = {}  # (seconds, cost) of finished stages
        for i, s in enumerate(todo, 1):
            print(f"== [{i}/{len(todo)}] {s.name} -> {s.folder}{_eta(todo[i - 1:], spent)}",
                  flush=True)
            t = time.time()
            s.work()
            spent.setdefault(_kind(s), []).append((time.time() - t, s.cost))
        if not todo:
            print(f"{self.out}: every stage is cached; nothing to do")
        return self.results()

    def results(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(rows, comparisons): a row per evaluated model with its metrics and its paired
        metrics against the base; with several seeds, a row per run group (`NAME (n seeds)`)
        averaging the seeds evaluated; and the paired comparisons `eval.compare` asks for.
        Every run of the config evaluated so far is in, whichever runs `--only` ran."""
        from cftune.compare import paired_metrics, seed_metrics, seed_ratios

        results, rows = {}, []
        pending = [name for name in self.models if not self._eval_stage(name).done()]
        if pending:
            print(f"cftune run: {len(pending)} run(s) not evaluated yet, not in the report: "
                  f"{', '.join(pending)}")
        for name, model in self.models.items():
            if name in pending:
                continue
            results[name] = read_json(self._eval_stage(name).folder / "result.json")
            run = next((r for r in self.runs if r["name"] == name), None)
            row = {"run": name, "method": "base" if run is None else
                   (run["method"] if run["method"] == WISE_FT else
                    run["settings"].get("method", run["method"])),
                   "group": run["group"] if run else "base", "seed": run["seed"] if run else None,
                   "parent": run.get("of") if run else None,
                   "alpha": run.get("alpha") if run else None,
                   "metrics": dict(results[name]["metrics"]), "steps": None, "tokens": None,
                   "wall_time_s": None, "stream_capped": None}
            if run is not None and run["method"] != WISE_FT:
                row.update(_training_facts(Path(model)))
                if row["stream_capped"] is not None and row["method"] == "contextual":
                    row["metrics"]["stream_capped"] = {
                        "value": row["stream_capped"], "stderr": None, "ci95": None, "n": None}
            if run is not None:
                row["metrics"].update(paired_metrics([results["base"]], [results[name]]))
            if self.exp.ablation and run is not None and run["method"] in CF_METHODS:
                cfg = self.exp.train_config(run)
                row.update(ablation=self.exp.ablation,
                           x=self.exp.setting_value(run, self.exp.ablation),
                           curve=cfg.method + (f" ({cfg.cfs_mode})" if cfg.method == "cfs" else ""))
            rows.append(row)
        _same_samples(rows, self.out)
        groups = _groups(rows)
        if len(self.exp.seeds) > 1:
            for group, members in groups.items():
                if group == "base" or len(members) < 2:  # a one-seed run is its own row
                    continue
                first = members[0]
                rows.append({**{k: first.get(k) for k in ("method", "alpha", "ablation", "x",
                                                          "curve") if k in first},
                             "run": f"{group} ({len(members)} seeds)", "group": group,
                             "seeds": [m["seed"] for m in members],
                             "parent": first["parent"] and first["parent"].rsplit("-s", 1)[0],
                             "metrics": {**seed_metrics([m["metrics"] for m in members]),
                                         **paired_metrics([results["base"]],
                                                          [results[m["run"]] for m in members])},
                             "steps": first.get("steps"), "tokens": None, "wall_time_s": None})
        comparisons = []
        for a, b in self.exp.eval.compare:
            if a not in groups or b not in groups:
                print(f"cftune run: comparison {b} vs {a} skipped: "
                      f"{a if a not in groups else b} is not evaluated yet")
                continue
            ref, model = ([results[m["run"]] for m in groups[g]] for g in (a, b))
            metrics = paired_metrics(ref, model, with_kl=True)
            seeds = [[m["seed"] for m in groups[g]] for g in (a, b)]
            if seeds[0] == seeds[1]:  # the same seeds on both sides: ratios seed by seed
                metrics.update(seed_ratios(results["base"], ref, model))
            comparisons.append({"ref": a, "model": b, "metrics": metrics})
        return rows, comparisons


def _same_samples(rows: list[dict[str, Any]], out: Path) -> None:
    """Every model's KLs must be scored on one sample set. The held-out CF set is kept with the
    evaluations; the base's instruction responses are drawn again where a folder was kept
    without them, and another machine may draw them otherwise (seeded, not bitwise portable)."""
    for metric, what in (("kl", "held-out CF samples"), ("instr_kl", "base's instruction "
                                                                    "responses")):
        sets: dict[str, list[str]] = {}
        for r in rows:
            digest = (r["metrics"].get(metric) or {}).get("samples_digest")
            if digest is not None:  # None: scored before the digest was recorded
                sets.setdefault(digest, []).append(r["run"])
        if len(sets) > 1:
            groups = "; ".join(", ".join(runs) for runs in sets.values())
            raise CftuneError(f"{out}: {metric} was scored on {len(sets)} different sets of the "
                              f"{what} ({groups}); delete the evals/ folders of one group to "
                              "re-score them on the current set")


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by run group (a run's copies over seeds; a run name is its own group too)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["group"], []).append(r)
        if r["run"] != r["group"]:
            out.setdefault(r["run"], []).append(r)
    return out


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


def _stage_of(stream: Path) -> Path:
    """The stage folder of a run's second stream: a CF or contextual pool is a folder, the
    replay corpus a file in its stage's folder."""
    return stream.parent if stream.suffix == ".jsonl" else stream


def _has_weights(folder: Path) -> bool:
    """A finished model folder: its manifest (written last) and its weights (a folder kept
    without `*.safetensors`, as committed results are, holds a report's facts but no model)."""
    return (folder / "manifest.json").is_file() and any(folder.glob("*.safetensors"))


def _clear_record(folder: Path) -> None:
    """Empty a model folder kept without its weights (a committed record) before the model is
    made again: its manifest would otherwise pass for a finished run."""
    import shutil

    if (folder / "manifest.json").is_file() and not _has_weights(folder):
        shutil.rmtree(folder)


def _training_facts(folder: Path) -> dict[str, Any]:
    """Steps, tokens processed and training wall time of a finished run (from its log; all
    None where the run's folder is gone)."""
    from cftune.samples import iter_jsonl

    if not (folder / "manifest.json").is_file():
        return {"steps": None, "tokens": None, "wall_time_s": None, "stream_capped": None}
    m = read_json(folder / "manifest.json")
    log = folder / "training_log.jsonl"
    lines = [r for r in iter_jsonl(log) if "tokens_per_s" in r] if log.is_file() else []
    tokens = round(sum(r["tokens_per_s"] * r["seconds"] for r in lines)) if lines else None
    pool = m.get("cf_pool") or {}
    return {"steps": m.get("steps"), "tokens": tokens, "wall_time_s": m.get("seconds"),
            "stream_capped": pool.get("capped")}


def atomic_write_json_mkdir(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def run(config: RunConfig) -> Path | None:
    """Run (or resume) an experiment; write results.{csv,json,md} and tradeoff.png."""
    from cftune.report import print_table, write_report

    path = Path(config.experiment)
    exp = Experiment(path, Path(config.out) if config.out else None)
    runner = Runner(exp, config.only, Path(config.stages) if config.stages else None)
    with contextlib.ExitStack() as locks:
        if not config.dry_run:
            for folder in dict.fromkeys((runner.out, exp.out)):
                locks.enter_context(output_lock(folder))
        done = runner.run(dry_run=config.dry_run)
        if done is None:
            return None
        rows, comparisons = done
        write_report(rows, exp.out, y_name=exp.eval.plot_y, comparisons=comparisons)
        atomic_write_json(exp.out / "results.json", rows)
        atomic_write_json(exp.out / "comparisons.json", comparisons)
    print_table(rows)
    print(f"wrote {exp.out}/results.csv, results.md, results.json, comparisons.json, "
          f"tradeoff.png (`cftune report {exp.out}` re-renders them)")
    return exp.out
