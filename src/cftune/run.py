"""`cftune run CONFIG`: one YAML file → the whole comparison, a results table and a trade-off plot.

An experiment is a DAG of stages: task data → CF samples (a training pool and a held-out T=1 set)
→ one training run per method → Wise-FT merges → evaluations → report. Every stage writes into a
folder named by the hash of everything it depends on, and a stage whose folder already holds its
finished output is skipped: a second `cftune run` does no work, a changed setting redoes only the
stages downstream of it, and a killed run resumes (generation and training resume internally too).

Config (YAML; unknown keys are errors):

    model: smollm2-135m-instruct
    task: {train: builtin:arithmetic, test: builtin:arithmetic, train_rows: 400, test_rows: 100,
           prompt_field: question, response_field: answer}
    cf: {max_new_tokens: 64, heldout: 128, batch_size: 32, dtype: fp32}   # GenerateConfig keys
    train: {max_steps: 60, batch_size: 8, learning_rate: 1e-4}            # TrainConfig defaults
    eval: {bench: [arc_easy], limit: 200, task_limit: 100, batch_size: 16}
    runs:
      - {name: full, method: full}
      - {name: cfs, method: cfs, sweep: {cfs_ratio: [0.5, 1]}}             # → cfs-cfs_ratio=0.5 …
      - {name: wise, method: wise-ft, of: full, alphas: [0.25, 0.5, 0.75]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cftune.config import field, from_dict, load_yaml
from cftune.errors import CftuneError, did_you_mean
from cftune.generate import GenerateConfig
from cftune.locking import output_lock
from cftune.models import DEFAULT_MODEL, DTYPES, fingerprint
from cftune.prompts import PromptSpec
from cftune.report import TASK_AXES
from cftune.samples import atomic_write_json, read_json
from cftune.train import TrainConfig, cf_draws

WISE_FT = "wise-ft"
EVAL_VERSION = 4  # part of every eval stage's key: bump when the metrics computed change
CF_METHODS = ("cfs", "kd")  # methods that consume the CF training pool
STREAM_METHODS = CF_METHODS + ("contextual", "replay")  # methods with a second data stream
RUN_KEYS = ("name", "method", "of", "alphas", "sweep")
PROMPTS = ("chat", "qa")  # task prompt formats (cftune.prompts), the same in every stage


@dataclass
class TaskSpec:
    """Task data: files (JSONL/CSV/Parquet) or a built-in generator such as `builtin:arithmetic`."""

    train: str = field("builtin:arithmetic", "training data: file or builtin:NAME")
    test: str = field("builtin:arithmetic", "test data (GSM8K format): file or builtin:NAME")
    train_rows: int = field(400, "rows of a builtin train split (files: first N rows, 0 = all)")
    test_rows: int = field(100, "rows of a builtin test split (files: first N rows, 0 = all)")
    seed: int = field(0, "seed of builtin task generation")
    prompt_field: str = field("question", "prompt field of the task rows")
    response_field: str = field("answer", "response field of the task rows")
    prompt: str = field("chat", "prompt format for training, evaluation and contextual data "
                        "alike: chat (the model's chat template) | qa ('Question: …\\nAnswer:', "
                        "for base models)")
    doc_start: str | None = field(None, "token a qa prompt or replay document starts with "
                                  "(default: cftune.prompts.doc_start_ids)")

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise CftuneError(f"task.prompt '{self.prompt}' is not one of {', '.join(PROMPTS)}")

    @property
    def prompt_spec(self) -> PromptSpec:
        return PromptSpec(self.prompt, doc_start=self.doc_start)


@dataclass
class ReplaySpec:
    """The generic corpus of the `replay` baseline (the paper's "Pretrain-Aug")."""

    file: str | None = field(None, "JSONL corpus file")
    fields: list[str] = field(["text"], "fields joined into one text per row")
    join: str = field(" ", "separator between the joined fields")
    rows: int = field(0, "first N rows (0 = all)")


@dataclass
class EvalSpec:
    """What every model is measured on."""

    bench: list[Any] = field([], "zero-shot benchmarks: registry names, NAME=PATH, or "
                             "{name, path, template, metric} for a file of your own")
    limit: int = field(200, "items per benchmark (the first N)")
    task_limit: int = field(100, "task test rows scored by greedy exact match")
    max_new_tokens: int = field(96, "generated tokens per task answer")
    batch_size: int = field(16, "sequences per forward pass")
    score_dtype: str = field("fp32", "precision of every log-likelihood metric (KL, benchmarks, "
                             "answer NLL); not fp32: the base is re-scored in it for the KL")
    decode_dtype: str = field("fp32", "precision of greedy task decoding (bf16: faster on CPUs "
                              "with AVX512-BF16, flips near-ties)")
    data_dir: str | None = field(None, "folder holding benchmark files (default: auto)")
    instructions: str | None = field(None, "held-out instructions (JSONL with prompt/reference, "
                                     "or the self-instruct seed format) for instr_kl and "
                                     "instr_ref_nll")
    instruction_limit: int | None = field(None, "first N instructions (None: all)")
    instruction_samples: int = field(2, "base responses (T=1) drawn per instruction")
    instruction_max_new_tokens: int = field(128, "longest base response, in tokens")
    compare: list[list[str]] = field([], "pairs [A, B] of runs (or run groups over seeds) "
                                     "compared item by item: B − A with paired intervals")
    plot_y: str = field("task_acc", "task metric on the plot's y axis: task_acc | task_nll "
                        "(the reference solutions' NLL, for tasks where accuracy stays near 0)")

    def __post_init__(self) -> None:
        for key in ("score_dtype", "decode_dtype"):
            if getattr(self, key) not in DTYPES:
                raise CftuneError(f"eval.{key} '{getattr(self, key)}' is not one of "
                                  f"{', '.join(DTYPES)}")
        if self.plot_y not in TASK_AXES:
            raise CftuneError(f"eval.plot_y '{self.plot_y}' is not one of {', '.join(TASK_AXES)}")


@dataclass
class ContextualSpec:
    """The contextual baseline's data: the base's own answers to the training prompts."""

    max_new_tokens: int | None = field(None, "longest answer (default: eval.max_new_tokens, so "
                                       "answers are as long as the evaluation lets the model be)")


@dataclass
class RunConfig:
    """Settings of `cftune run` itself (the experiment is described by the YAML file)."""

    experiment: str = field("configs/quickstart.yaml", "experiment YAML file")
    out: str | None = field(None, "experiment folder (default: experiments/<file name>)")
    only: list[str] = field([], "run only these runs (and what they need)")
    dry_run: bool = field(False, "print the stages and whether each is cached, then stop")

    POSITIONAL = "experiment"  # `cftune run CONFIG`


@dataclass
class Stage:
    """One unit of work: its name, output folder, and the function that fills the folder.
    `cost` is its size in its kind's units (training examples, sampled tokens), for the ETA."""

    name: str
    folder: Path
    work: Callable[[], None]
    done: Callable[[], bool]
    cost: float = 1.0


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Experiment:
    """A parsed, validated experiment config and the stages it expands into."""

    def __init__(self, path: Path, out: Path | None = None):
        raw = load_yaml(path)
        allowed = {"name", "model", "task", "cf", "train", "eval", "runs", "seed", "seeds",
                   "replay", "contextual"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise CftuneError(f"{path}: unknown key(s) {', '.join(unknown)}"
                              f"{did_you_mean(unknown[0], allowed)} (allowed: "
                              f"{', '.join(sorted(allowed))})")
        self.path = path
        self.name = str(raw.get("name", path.stem))
        self.out = out or Path("experiments") / self.name
        self.model = str(raw.get("model", DEFAULT_MODEL))
        self.seed = int(raw.get("seed", 0))
        self.seeds = self._seeds(raw.get("seeds", [self.seed]))
        self.task = from_dict(TaskSpec, raw.get("task") or {}, f"{path}: task")
        for split in ("train", "test"):
            spec = getattr(self.task, split)
            if not spec.startswith("builtin:") and not Path(spec).is_file():
                raise CftuneError(f"{path}: task.{split}: file {spec} not found")
        self.eval = from_dict(EvalSpec, raw.get("eval") or {}, f"{path}: eval")
        self.replay = from_dict(ReplaySpec, raw.get("replay") or {}, f"{path}: replay")
        self.contextual = from_dict(ContextualSpec, raw.get("contextual") or {},
                                    f"{path}: contextual")
        if self.replay.file and not Path(self.replay.file).is_file():
            raise CftuneError(f"{path}: replay.file {self.replay.file} not found")
        cf = dict(raw.get("cf") or {})
        self.cf_heldout = int(cf.pop("heldout", 128))
        for banned in ("model", "out", "num_samples"):
            if banned in cf:
                raise CftuneError(f"{path}: cf.{banned} is set by the runner; remove it")
        self.cf = from_dict(GenerateConfig, {"model": self.model, **cf}, f"{path}: cf")
        self.train_defaults = dict(raw.get("train") or {})
        self._check_train_keys(self.train_defaults, f"{path}: train")
        self.runs = self._expand_runs(raw.get("runs") or [])
        self._check_equal_task_batches()
        self._check_benchmarks()

    # ------------------------------------------------------------------ validation

    def _seeds(self, value: Any) -> list[int]:
        """`seeds: [0, 1, 2]` replicates every run (task order, CF draw, LoRA init) on the same
        evaluation sets; the default is the single `seed`."""
        if not isinstance(value, list) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise CftuneError(f"{self.path}: `seeds` must be a non-empty list of integers "
                              f"(got {value!r})")
        if len(set(value)) != len(value):
            raise CftuneError(f"{self.path}: `seeds` repeats a seed ({value})")
        return list(value)

    def _check_train_keys(self, values: dict[str, Any], where: str) -> None:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CftuneError(f"{where}: unknown setting(s) {', '.join(unknown)}"
                              f"{did_you_mean(unknown[0], known)}")
        for runner_set in ("model", "task", "out", "cfs"):
            if runner_set in values:
                raise CftuneError(f"{where}: `{runner_set}` is set by the runner; remove it")

    def _expand_runs(self, runs: list[Any]) -> list[dict[str, Any]]:
        if not isinstance(runs, list) or not runs:
            raise CftuneError(f"{self.path}: `runs` must be a non-empty list of runs")
        out: list[dict[str, Any]] = []
        for i, run in enumerate(runs):
            where = f"{self.path}: runs[{i}]"
            if not isinstance(run, dict) or "name" not in run or "method" not in run:
                raise CftuneError(f"{where}: each run needs a `name` and a `method`")
            settings = {k: v for k, v in run.items() if k not in RUN_KEYS}
            if run["method"] == WISE_FT:
                if "of" not in run or "alphas" not in run:
                    raise CftuneError(f"{where}: a wise-ft run needs `of` (a run name) and `alphas`")
                if settings:
                    raise CftuneError(f"{where}: a wise-ft run takes no training settings "
                                      f"({', '.join(sorted(settings))})")
                for a in run["alphas"]:
                    out.append({"name": f"{run['name']}-a{a}", "method": WISE_FT,
                                "of": str(run["of"]), "alpha": float(a)})
                continue
            self._check_train_keys({**settings, "method": run["method"]}, where)
            sweep = run.get("sweep") or {}
            if len(sweep) > 1:
                raise CftuneError(f"{where}: sweep over one setting at a time (got {list(sweep)})")
            self._check_train_keys(sweep, f"{where}: sweep")
            for key, values in sweep.items() or [(None, [None])]:
                for v in values:
                    name = run["name"] if key is None else f"{run['name']}-{key}={v}"
                    extra = {} if key is None else {key: v}
                    out.append({"name": name, "method": run["method"],
                                "settings": {**self.train_defaults, **settings, **extra}})
        out = self._replicate(out)
        names = [r["name"] for r in out]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise CftuneError(f"{self.path}: duplicated run name(s) {', '.join(dupes)}")
        for r in out:
            if r["method"] == WISE_FT:
                parent = next((p for p in out if p["name"] == r["of"]), None)
                if parent is None or parent["method"] == WISE_FT:
                    raise CftuneError(f"{self.path}: run '{r['name']}' merges unknown run "
                                      f"'{r['of']}' (of: must name a training run)")
            else:  # fail now, not after an hour of training, on bad values
                self.train_config(r)
        return out

    def _replicate(self, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One copy of each run per seed: named `NAME-sSEED` when there are several seeds, with
        `group` = NAME (what the report averages over) and `seed`; a Wise-FT run merges the
        copy of its parent with the same seed."""
        out = []
        for s in self.seeds:
            tag = f"-s{s}" if len(self.seeds) > 1 else ""
            for r in runs:
                copy = {**r, "name": r["name"] + tag, "group": r["name"], "seed": s}
                if r["method"] == WISE_FT:
                    copy["of"] = r["of"] + tag
                out.append(copy)
        return out

    def _check_equal_task_batches(self) -> None:
        """Every training run must see the same task examples per optimizer step (issue 9, item
        4): a second stream adds examples on top, it never takes task examples' place."""
        per_step: dict[int, list[str]] = {}
        for r in self.runs:
            if r["method"] != WISE_FT:
                cfg = self.train_config(r)
                per_step.setdefault(cfg.batch_size * cfg.grad_accum, []).append(r["name"])
        if len(per_step) > 1:
            groups = "; ".join(f"{n} for {', '.join(names)}" for n, names in sorted(per_step.items()))
            raise CftuneError(f"{self.path}: runs see different task examples per step "
                              f"(batch_size x grad_accum: {groups}); give every run the same "
                              f"batch_size (task examples; a second stream adds cfs_ratio x "
                              f"batch_size on top)")

    def _check_benchmarks(self) -> None:
        from cftune.evaluate import benchmarks

        for name in self.eval.bench:
            benchmarks.resolve(name, self.eval.data_dir)
        groups = {r["name"] for r in self.runs} | {r["group"] for r in self.runs} | {"base"}
        for pair in self.eval.compare:
            unknown = [n for n in pair if n not in groups]
            if len(pair) != 2 or unknown:
                raise CftuneError(f"{self.path}: eval.compare entry {pair}: give two run names "
                                  f"(or run groups) of {', '.join(sorted(groups))}")

    # ------------------------------------------------------------------ stage settings

    def train_settings(self, run: dict[str, Any], task_file: Path, stream: Path | None
                       ) -> dict[str, Any]:
        """A run's TrainConfig values (the runner sets model, data and prompt format); `stream`
        is the run's second data stream: CF pool, contextual samples or replay corpus."""
        settings = {"model": self.model, "task": str(task_file), "out": "unused",
                    "prompt_field": self.task.prompt_field,
                    "response_field": self.task.response_field, "seed": run["seed"],
                    "prompt_format": self.task.prompt, "doc_start": self.task.doc_start,
                    "method": run["method"], **run["settings"]}
        if settings["method"] == "replay":
            settings["replay"] = str(stream)
        elif settings["method"] in STREAM_METHODS:
            settings["cfs"] = str(stream)
        return settings

    def train_config(self, run: dict[str, Any]) -> TrainConfig:
        """The run's TrainConfig with placeholder data paths: validates every other setting
        before anything runs (the data files are written by earlier stages)."""
        placeholder = "builtin:arithmetic"  # passes the existence checks, like a builtin task
        settings = self.train_settings(run, Path(placeholder), Path(placeholder))
        return from_dict(TrainConfig, settings, f"{self.path}: run '{run['name']}'")

    def cf_consumed(self, run: dict[str, Any]) -> int:
        """CF examples a run draws in training (the trainer's own count, so the pool is drawn
        exactly as large as training consumes)."""
        cfg = self.train_config(run)
        return cf_draws(cfg, self.task.train_rows) if cfg.method in STREAM_METHODS else 0


class Runner:
    """Turns an `Experiment` into stages and runs those not cached."""

    def __init__(self, exp: Experiment, only: list[str]):
        self.exp = exp
        self.out = exp.out
        unknown = sorted(set(only) - {r["name"] for r in exp.runs})
        if unknown:
            raise CftuneError(f"--only: unknown run(s) {', '.join(unknown)}")
        wanted = set(only) or {r["name"] for r in exp.runs}
        for r in exp.runs:  # a merge needs its parent
            if r["name"] in wanted and r["method"] == WISE_FT:
                wanted.add(r["of"])
        self.runs = [r for r in exp.runs if r["name"] in wanted]
        self.base_fp = fingerprint(exp.model)
        self.stages: list[Stage] = []
        self.models: dict[str, Path | str] = {"base": exp.model}
        self._plan()

    # ------------------------------------------------------------------ planning

    def _plan(self) -> None:
        exp = self.exp
        data_key = _key(dataclasses.asdict(exp.task))
        data_dir = self.out / "data" / data_key
        self.train_file, self.test_file = data_dir / "train.jsonl", data_dir / "test.jsonl"
        self._add("data", data_dir, self._write_data, lambda: self.test_file.is_file())

        trained = [r for r in self.runs if r["method"] != WISE_FT]
        kd = any(r["method"] == "kd" for r in trained)
        cf_settings = {**dataclasses.asdict(exp.cf), "topk_logprobs":
                       max(exp.cf.topk_logprobs, 20 if kd else 0)}
        contextual_settings = {
            **cf_settings, "task_prompts": str(self.train_file), "topk_logprobs": 0,
            "prompt_field": exp.task.prompt_field, "prompt_format": exp.task.prompt,
            "doc_start": exp.task.doc_start,
            "max_new_tokens": exp.contextual.max_new_tokens or exp.eval.max_new_tokens}
        # Fresh samples per seed: the CF draw is part of what a seed replicates. Seed `seed`
        # draws from the pool seed `cf.seed` (so a one-seed config keeps its folders).
        self.pool: dict[int, Path] = {}
        self.contextual: dict[int, Path] = {}
        for s in dict.fromkeys(r["seed"] for r in trained):
            mine = [r for r in trained if r["seed"] == s]
            cf_seed, tag = exp.cf.seed + s - exp.seed, f"-s{s}" if len(exp.seeds) > 1 else ""
            need = max([exp.cf_consumed(r) for r in mine if r["method"] in CF_METHODS] or [0])
            if need:
                self.pool[s] = self._generate_stage(f"cf-pool{tag}", cf_settings, need, cf_seed)
            need = max([exp.cf_consumed(r) for r in mine if r["method"] == "contextual"] or [0])
            if need:  # the base's own answers to the training prompts, posed as in training
                self.contextual[s] = self._generate_stage(f"contextual{tag}", contextual_settings,
                                                          need, cf_seed)
        self.replay_file = None
        if any(r["method"] == "replay" for r in trained):
            if not exp.replay.file:
                raise CftuneError(f"{exp.path}: a replay run needs `replay: {{file: ...}}`")
            folder = self.out / "data" / f"replay-{_key(dataclasses.asdict(exp.replay))}"
            self.replay_file = folder / "replay.jsonl"
            self._add("replay corpus", folder, self._write_replay,
                      lambda: self.replay_file.is_file())
        held_seed = exp.cf.seed + 1_000_003  # disjoint random streams from the pool's
        self.heldout = self._generate_stage(
            # Unfiltered T=1 draws: the KL estimate is unbiased only for samples x ~ p_base.
            "cf-heldout", {**cf_settings, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                           "min_p": 0.0, "topk_logprobs": 0, "dedup": False, "min_tokens": 0},
            exp.cf_heldout, held_seed)

        for r in self.runs:
            if r["method"] == WISE_FT:
                parent = self.models[r["of"]]
                folder = self.out / "runs" / f"{r['name']}-{_key(str(parent), r['alpha'])}"
                self._add(f"merge {r['name']}", folder, self._merge_work(parent, folder, r["alpha"]),
                          lambda f=folder: (f / "config.json").is_file())
            else:
                stream = {"replay": self.replay_file,
                          "contextual": self.contextual.get(r["seed"])}.get(
                    r["method"], self.pool.get(r["seed"]))
                settings = exp.train_settings(r, self.train_file, stream)
                folder = self.out / "runs" / f"{r['name']}-{_key(settings, self.base_fp)}"
                examples = (settings.get("max_steps") or 1) * (settings.get("batch_size") or 1)
                self._add(f"train {r['name']}", folder, self._train_work(settings, folder),
                          lambda f=folder: (f / "manifest.json").is_file(), cost=examples)
            self.models[r["name"]] = folder
        measured = {k: v for k, v in dataclasses.asdict(exp.eval).items()
                    if k not in ("plot_y", "compare")  # report settings, not measurements
                    and not (k.startswith("instruction") and exp.eval.instructions is None)}
        # The held-out folder is extended in place when `cf.heldout` grows: the count is part of
        # the key (sample i is fixed), so a changed count re-scores every model on the new set.
        eval_key = _key(measured, str(self.heldout), exp.cf_heldout, str(self.test_file),
                        exp.task.prompt_spec, EVAL_VERSION)
        self.instructions = None
        if exp.eval.instructions:
            self.instructions = self._instruction_stage()
        for name, model in self.models.items():
            folder = self.out / "evals" / f"{name}-{_key(str(model), eval_key)}"
            self._add(f"eval {name}", folder, self._eval_work(name, model, folder),
                      lambda f=folder: (f / "result.json").is_file())

    def _instruction_stage(self) -> Path:
        """The base's T=1 responses to the held-out instructions (drawn once, for instr_kl)."""
        from cftune.evaluate.instructions import RESPONSES, draw_responses

        e = self.exp.eval
        settings = {"file": e.instructions, "limit": e.instruction_limit,
                    "samples": e.instruction_samples, "max_new_tokens": e.instruction_max_new_tokens,
                    "doc_start": self.exp.task.doc_start, "dtype": e.score_dtype}
        folder = self.out / "cf" / f"instructions-{_key(settings, self.base_fp)}"

        def work() -> None:
            draw_responses(self.exp.model, e.instructions, e.instruction_samples,
                           e.instruction_max_new_tokens, out=folder, limit=e.instruction_limit,
                           batch_size=self.exp.cf.batch_size, dtype=e.score_dtype,
                           doc_start=self.exp.task.doc_start, base_fingerprint=self.base_fp)
        n = e.instruction_samples * (e.instruction_limit or 175)
        self._add(f"generate instructions ({n} responses)", folder, work,
                  lambda: (folder / RESPONSES / "manifest.json").is_file(),
                  cost=n * e.instruction_max_new_tokens)
        return folder

    def _add(self, name: str, folder: Path, work: Callable[[], None],
             done: Callable[[], bool], cost: float = 1.0) -> None:
        self.stages.append(Stage(name, folder, work, done, cost))

    def _generate_stage(self, name: str, settings: dict[str, Any], n: int, seed: int) -> Path:
        from cftune.generate import generate

        settings = {**settings, "seed": seed, "num_samples": n}
        # The folder is keyed without the count: asking for more samples extends it (sample i
        # is the same either way), so a longer training run reuses what was drawn.
        key = _key({**settings, "out": None, "num_samples": None}, self.base_fp)
        folder = self.out / "cf" / f"{name}-{key}"
        config = GenerateConfig(**{**settings, "out": str(folder)})

        def done() -> bool:
            m = folder / "manifest.json"
            return m.is_file() and read_json(m)["counts"]["samples"] >= n

        self._add(f"generate {name} ({n} samples)", folder, lambda: generate(config), done,
                  cost=n * (settings.get("max_new_tokens") or 1))
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
        return lambda: train(from_dict(TrainConfig, {**settings, "out": str(folder),
                                                     "resume": True}))

    def _merge_work(self, parent: Path, folder: Path, alpha: float) -> Callable[[], None]:
        from cftune.merge import MergeConfig, merge

        return lambda: merge(MergeConfig(finetuned=str(parent), out=str(folder),
                                         base=self.exp.model, alpha=alpha))

    def _eval_work(self, name: str, model_path: Path | str, folder: Path) -> Callable[[], None]:
        def work() -> None:
            atomic_write_json_mkdir(folder / "result.json",
                                    evaluate_one(self.exp, name, model_path, self.heldout,
                                                 self.test_file, self.base_fp,
                                                 self.reference(), self.instructions))
        return work

    # ------------------------------------------------------------------ running

    def run(self, dry_run: bool = False
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        todo = [s for s in self.stages if not s.done()]
        for i, s in enumerate(self.stages, 1):
            state = "cached" if s not in todo else "to do"
            if dry_run:
                print(f"[{i}/{len(self.stages)}] {s.name:32s} {state:7s} {s.folder}")
        if dry_run:
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

    def reference(self) -> list[float] | None:
        """The base's log-probs of the held-out samples in `eval.score_dtype`, when that is not
        the precision `logp_base` was stored in (computed once, kept beside the samples)."""
        from cftune.evaluate.kl import logp_dtype, score_samples
        from cftune.models import load_model
        from cftune.samples import read_manifest

        dtype = self.exp.eval.score_dtype
        if logp_dtype(read_manifest(self.heldout)) == dtype:
            return None
        path = self.heldout / f"reference-{dtype}-{self.exp.cf_heldout}.json"
        if not path.is_file():
            model = load_model(self.exp.model, "auto", dtype, inference=True)
            atomic_write_json(path, score_samples(model, self.heldout, self.exp.cf_heldout,
                                                  self.exp.eval.batch_size, dtype,
                                                  desc=f"base log-probs in {dtype}"))
        return read_json(path)

    def results(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(rows, comparisons): a row per evaluated model with its metrics and its paired
        metrics against the base; with several seeds, a row per run group (`NAME (n seeds)`)
        averaging the seeds; and the paired comparisons `eval.compare` asks for."""
        from cftune.compare import paired_metrics, seed_metrics

        results, rows = {}, []
        for name, model in self.models.items():
            folder = next(s.folder for s in self.stages if s.name == f"eval {name}")
            results[name] = read_json(folder / "result.json")
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
            rows.append(row)
        sets = {r["metrics"]["kl"].get("samples_digest") for r in rows}
        if len(sets) > 1:
            raise CftuneError(f"{self.out}: the evaluations scored the KL on different held-out "
                              f"sample sets ({len(sets)}); rerun `cftune run` to re-evaluate")
        groups = _groups(rows)
        if len(self.exp.seeds) > 1:
            for group, members in groups.items():
                if group == "base":
                    continue
                first = members[0]
                rows.append({**{k: first.get(k) for k in ("method", "alpha")},
                             "run": f"{group} ({len(members)} seeds)", "group": group,
                             "seeds": [m["seed"] for m in members],
                             "parent": first["parent"] and first["parent"].rsplit("-s", 1)[0],
                             "metrics": {**seed_metrics([m["metrics"] for m in members]),
                                         **paired_metrics([results["base"]],
                                                          [results[m["run"]] for m in members])},
                             "steps": first.get("steps"), "tokens": None, "wall_time_s": None})
        comparisons = []
        for a, b in self.exp.eval.compare:
            ref, model = ([results[m["run"]] for m in groups[g]] for g in (a, b))
            comparisons.append({"ref": a, "model": b,
                                "metrics": paired_metrics(ref, model, with_kl=True)})
        return rows, comparisons


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


def _training_facts(folder: Path) -> dict[str, Any]:
    """Steps, tokens processed and training wall time of a finished run (from its log)."""
    from cftune.samples import iter_jsonl

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


def evaluate_one(exp: Experiment, name: str, model_spec: Path | str, heldout: Path,
                 test_file: Path, base_fp: str, reference: list[float] | None = None,
                 instructions: Path | None = None) -> dict[str, Any]:
    """Every metric of one model, in the report's row-metric format.

    One precision rule (issue 9, item 8): every log-likelihood metric (answer NLL, KL, benchmark
    choices) in `eval.score_dtype` (fp32 by default), and only greedy decoding in
    `eval.decode_dtype`, after the scoring, so a bf16 near-tie never flips a scored item.
    """
    from cftune.evaluate import answer_nll, kl_to_base, run_benchmark, task_accuracy
    from cftune.models import load_model, load_tokenizer, weight_dtype

    e, spec = exp.eval, exp.task.prompt_spec
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, "auto", e.score_dtype, inference=True)
    metrics: dict[str, Any] = {}
    nll = answer_nll(model, tokenizer, test_file, limit=e.task_limit, prompt=spec,
                     batch_size=e.batch_size, dtype=e.score_dtype)
    metrics["task_nll"] = _metric(nll, "value")
    kl = kl_to_base(model, heldout, batch_size=e.batch_size, dtype=e.score_dtype,
                    limit=exp.cf_heldout, base_fingerprint=base_fp, tokenizer=tokenizer,
                    reference=reference)
    metrics["kl"] = {**_metric(kl, "value"), "samples_digest": kl["samples_digest"]}
    if "reference_residual" in kl:
        metrics["kl_reference_residual"] = _metric(kl["reference_residual"], "value")
    metrics["kl_per_token"] = _metric(kl, "per_token")
    primaries = []
    items: dict[str, Any] = {"kl": kl["per_sample"]}
    for bench in e.bench:
        res = run_benchmark(model, tokenizer, bench, limit=e.limit, batch_size=e.batch_size,
                            dtype=e.score_dtype, data_dir=e.data_dir)
        name = f"bench/{res['benchmark']}"
        metrics[name] = {**_metric(res, res["primary"]), "metric": res["primary"]}
        items[name] = {"primary": res["primary"], "records": res["items"]}
        primaries.append(metrics[name])
    if primaries:
        se = math.sqrt(sum((m["stderr"] or 0) ** 2 for m in primaries)) / len(primaries)
        mean = sum(m["value"] for m in primaries) / len(primaries)
        metrics["bench_avg"] = {"value": mean, "stderr": se,
                                "ci95": [mean - 1.96 * se, mean + 1.96 * se],
                                "n": sum(m["n"] for m in primaries)}
    if instructions is not None:
        _instruction_metrics(model, tokenizer, instructions, exp, base_fp, metrics, items)
    device = next(model.parameters()).device
    model.to(weight_dtype(e.decode_dtype, device, inference=True))
    acc = task_accuracy(model, tokenizer, test_file, limit=e.task_limit,
                        max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                        dtype=e.decode_dtype, prompt=spec)
    metrics = {"task_acc": _metric(acc, "acc"), **metrics}
    items.update(task_acc=acc["correct"], task_nll=nll["per_problem"])
    return {"model": str(model_spec), "name": name, "metrics": metrics, "items": items}


def _instruction_metrics(model, tokenizer, folder: Path, exp: Experiment, base_fp: str,
                         metrics: dict[str, Any], items: dict[str, Any]) -> None:
    """instr_kl (KL on the base's responses, SE clustered by prompt) and instr_ref_nll (the
    human reference responses' NLL per token), with their per-prompt values for pairing."""
    from cftune.evaluate.instructions import (
        PROMPTS_FILE,
        instruction_kl,
        instruction_spec,
        reference_nll,
    )

    e = exp.eval
    kl = instruction_kl(model, folder, e.batch_size, e.score_dtype, base_fingerprint=base_fp,
                        tokenizer=tokenizer)
    nll = reference_nll(model, tokenizer, folder / PROMPTS_FILE,
                        instruction_spec(tokenizer, exp.task.doc_start), e.batch_size,
                        e.score_dtype)
    metrics["instr_kl"] = {**_metric(kl, "value"), "seconds": kl.get("seconds")}
    metrics["instr_ref_nll"] = {**_metric(nll, "value"), "seconds": nll.get("seconds")}
    items.update(instr_kl=kl["per_prompt"], instr_ref_nll=nll["per_prompt"])


def _metric(result: dict[str, Any], key: str) -> dict[str, Any]:
    """Normalise an eval result's `key` (with `key_stderr` / `key_ci95` beside it, or the plain
    `stderr` / `ci95` for `value`, or a nested dict) to the report's {value, stderr, ci95, n}."""
    if isinstance(result.get(key), dict):
        result, key = result[key], "value"
    value = result.get(key)
    se = result.get(f"{key}_stderr", result.get("stderr"))
    ci = result.get(f"{key}_ci95", result.get("ci95"))
    if ci is None and se is not None and value is not None:
        ci = [value - 1.96 * se, value + 1.96 * se]
    return {"value": value, "stderr": se, "ci95": ci, "n": result.get("n")}


def run(config: RunConfig) -> Path | None:
    """Run (or resume) an experiment; write results.{csv,json,md} and tradeoff.png."""
    from cftune.report import print_table, write_report

    path = Path(config.experiment)
    exp = Experiment(path, Path(config.out) if config.out else None)
    runner = Runner(exp, config.only)
    with contextlib.nullcontext() if config.dry_run else output_lock(runner.out):
        done = runner.run(dry_run=config.dry_run)
        if done is None:
            return None
        rows, comparisons = done
        write_report(rows, runner.out, y_name=exp.eval.plot_y, comparisons=comparisons)
        atomic_write_json(runner.out / "results.json", rows)
        atomic_write_json(runner.out / "comparisons.json", comparisons)
    print_table(rows)
    print(f"wrote {runner.out}/results.csv, results.md, results.json, comparisons.json, "
          f"tradeoff.png (`cftune report {runner.out}` re-renders them)")
    return runner.out
