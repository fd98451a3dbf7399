"""An experiment config: one YAML file, parsed and validated before anything runs.

Config (YAML; unknown keys are errors, with the nearest allowed key suggested; `extends:
other.yaml` takes every setting of that config not given here, section by section):

    model: smollm2-135m-instruct
    task: {train: builtin:arithmetic, test: builtin:arithmetic, train_rows: 400, test_rows: 100,
           prompt_field: question, response_field: answer, prompt: chat}
    cf: {max_new_tokens: 64, heldout: 128, batch_size: 32, dtype: fp32}   # GenerateConfig keys
    train: {max_steps: 60, batch_size: 8, learning_rate: 1e-4}            # TrainConfig defaults
    eval: {bench: [arc_easy, {name: mine, path: my.jsonl}], limit: 200, task_limit: 100,
           instructions: instructions.jsonl, compare: [[full, cfs]]}
    seeds: [0, 1, 2]                                                       # replicate every run
    runs:
      - {name: full, method: full}
      - {name: cfs, method: cfs, sweep: {cfs_ratio: [0.5, 1]}}             # → cfs-cfs_ratio=0.5 …
      - {name: wise, method: wise-ft, of: full, alphas: [0.25, 0.5, 0.75], seeds: [0]}

A run's own `seeds` (a subset of the experiment's) replicates it over those only: the costly
comparison over three seeds, the rest on one. Every training run sees the same task examples per
step (`batch_size` × `grad_accum`; a second stream comes on top), which the config check enforces.
`train: {report_to: tensorboard}` (or `cftune run --report-to`, over it) logs every training run
to that tracker under the run's name; like the other options that do not change a model
(`NOT_A_SETTING`), it is in no stage key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cftune.config import field, from_dict, load_yaml
from cftune.errors import CftuneError, did_you_mean
from cftune.evaluate.measure import Scoring
from cftune.generate.config import GenerateConfig
from cftune.models import DEFAULT_MODEL
from cftune.prompts import PromptSpec
from cftune.results.metrics import TASK_AXES
from cftune.train.config import TrainConfig, cf_draws

WISE_FT = "wise-ft"
CF_METHODS = ("cfs", "kd")  # methods that consume the CF training pool
STREAM_METHODS = CF_METHODS + ("contextual", "replay")  # methods with a second data stream
RUN_KEYS = ("name", "method", "of", "alphas", "sweep", "seeds", "cf", "family")
CF_SWEEP = "cf."  # `sweep: {cf.temperature: [...]}` sweeps a setting of the run's CF pool
RUNNER_SET_CF = ("model", "out", "num_samples")  # cf settings the runner sets
PROMPTS = ("chat", "qa")  # task prompt formats (cftune.prompts), the same in every stage


def check_counts(section: str, spec: Any, minimums: dict[str, int]) -> None:
    """Refuse a count or limit below its minimum, every one in one line (issue 32, item 4): the
    stages slice with them (`rows[: n or None]`), so `-5` would quietly mean "all but the last
    5" rather than an error. None (where a field allows it) means "all" and passes."""
    problems = [f"{section}.{f.name} must be >= {minimums[f.name]} (got {value}): "
                f"{f.metadata['help']}"
                for f in dataclasses.fields(spec) if f.name in minimums
                and (value := getattr(spec, f.name)) is not None and value < minimums[f.name]]
    if problems:
        raise CftuneError("; ".join(problems))


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
        check_counts("task", self, {"train_rows": 0, "test_rows": 0})
        for split in ("train", "test"):  # 0 means "every row" of a file only: a builtin has no end
            if getattr(self, split).startswith("builtin:") and not getattr(self, f"{split}_rows"):
                raise CftuneError(f"task.{split}_rows must be >= 1 for {getattr(self, split)} "
                                  f"(got 0): the rows it generates")

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

    def __post_init__(self) -> None:
        check_counts("replay", self, {"rows": 0})


@dataclass
class EvalSpec(Scoring):
    """What every model is measured on."""

    bench: list[Any] = field([], "zero-shot benchmarks: registry names, NAME=PATH, or "
                             "{name, path, template, metric} for a file of your own")
    limit: int = field(200, "items per benchmark (the first N from `offset` on)")
    offset: int = field(0, "first benchmark item scored: items [offset, offset + limit), so a "
                        "schedule search can use items its report never shows")
    task_limit: int = field(100, "task test rows scored (answer NLL, greedy exact match)")
    task_acc: bool = field(True, "greedy exact-match accuracy (false: task gain from the answer "
                           "NLL alone; decoding is the slowest metric)")
    max_new_tokens: int = field(96, "generated tokens per task answer")
    data_dir: str | None = field(None, "folder holding benchmark files (default: auto)")
    instructions: str | None = field(None, "held-out instructions (JSONL with prompt/reference, "
                                     "or the self-instruct seed format) for instr_kl and "
                                     "instr_ref_nll")
    instruction_limit: int | None = field(None, "first N instructions from instruction_offset "
                                          "on (None: all)")
    instruction_offset: int = field(0, "first instruction used (a search split, as `offset`)")
    instruction_samples: int = field(2, "base responses (T=1) drawn per instruction")
    instruction_max_new_tokens: int = field(128, "longest base response, in tokens")
    compare: list[list[str]] = field([], "pairs [A, B] of runs (or run groups over seeds) "
                                     "compared item by item: B − A with paired intervals")
    plot_y: str = field("task_acc", "task metric on the plot's y axis: task_acc | task_nll "
                        "(the reference solutions' NLL, for tasks where accuracy stays near 0)")

    def __post_init__(self) -> None:
        problems = self.scoring_problems("eval.")
        if problems:
            raise CftuneError("; ".join(problems))
        check_counts("eval", self, {
            "limit": 1, "offset": 0, "task_limit": 1, "max_new_tokens": 1, "batch_size": 1,
            "instruction_limit": 1, "instruction_offset": 0, "instruction_samples": 1,
            "instruction_max_new_tokens": 1})
        if self.plot_y not in TASK_AXES:
            raise CftuneError(f"eval.plot_y '{self.plot_y}' is not one of {', '.join(TASK_AXES)}")
        if self.plot_y == "task_acc" and not self.task_acc:
            raise CftuneError("eval.task_acc is false, so there is no task accuracy to plot: set "
                              "eval.plot_y: task_nll")


@dataclass
class ContextualSpec:
    """The contextual baseline's data: the base's own answers to the training prompts."""

    max_new_tokens: int | None = field(None, "longest answer (default: eval.max_new_tokens, so "
                                       "answers are as long as the evaluation lets the model be)")

    def __post_init__(self) -> None:
        check_counts("contextual", self, {"max_new_tokens": 1})


@dataclass
class Run:
    """One run of the experiment at one seed: a training run (`settings` for `TrainConfig`, its
    CF pool's own `cf` settings) or a Wise-FT merge of run `of` with the base at `alpha`. `group`
    is the name without the seed tag: what the report averages over seeds."""

    name: str
    method: str
    group: str
    seed: int
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    cf: dict[str, Any] = dataclasses.field(default_factory=dict)
    of: str | None = None
    alpha: float | None = None
    family: str | None = None  # the frontier family it joins (default: from its name)

    @property
    def pool(self) -> tuple[tuple[str, Any], ...]:
        """Which CF pool the run trains on: its own `cf` settings (empty: the config's pool)."""
        return tuple(sorted(self.cf.items()))


def with_parent(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config's settings over those of the config it `extends` (a file next to it): sections
    (`cf`, `train`, `eval`, ...) are merged key by key, other keys replaced. An ablation states
    only what it varies and keeps every other setting, and so every cached stage, of the
    experiment it builds on."""
    raw = load_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = path.parent / str(parent)
    if parent_path.resolve() in seen or parent_path.resolve() == path.resolve():
        raise CftuneError(f"{path}: `extends: {parent}` makes a cycle of configs")
    if not parent_path.is_file():
        raise CftuneError(f"{path}: extends {parent}, which is not a file next to it "
                          f"({parent_path})")
    merged = with_parent(parent_path, (*seen, path.resolve()))
    for key, value in raw.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both else value
    return merged


def stage_key(*parts: Any) -> str:
    """A stage folder's name suffix: a hash of everything the stage depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _integer(path: Path, key: str, value: Any, help_: str, minimum: int | None = None
             ) -> int:
    """A plain integer setting outside the stage dataclasses (`seed`, `cf.heldout`), refused
    in one line when it is not an integer or is below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or (
            minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise CftuneError(f"{path}: {key} must be an integer{bound} (got {value!r}): "
                          f"{help_}")
    return value

def _seeds(path: Path, value: Any) -> list[int]:
    """`seeds: [0, 1, 2]` replicates every run (task order, CF draw, LoRA init) on the same
    evaluation sets; the default is the single `seed`."""
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CftuneError(f"{path}: `seeds` must be a non-empty list of integers "
                          f"(got {value!r})")
    if len(set(value)) != len(value):
        raise CftuneError(f"{path}: `seeds` repeats a seed ({value})")
    return list(value)

def _check_train_keys(values: dict[str, Any], where: str) -> None:
    """Training settings must be TrainConfig's, less those the runner sets itself."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CftuneError(f"{where}: unknown setting(s) {', '.join(unknown)}"
                          f"{did_you_mean(unknown[0], known)}")
    for runner_set in ("model", "task", "out", "cfs", "run_name"):
        if runner_set in values:
            raise CftuneError(f"{where}: `{runner_set}` is set by the runner; remove it")
    if "push_to_hub" in values:  # every run would upload to the one repo
        raise CftuneError(f"{where}: `push_to_hub` is not a runner setting; upload one run's "
                          f"folder with `cftune train --push-to-hub` instead")


class Experiment:
    """A parsed, validated experiment config and the stages it expands into."""

    def __init__(self, path: Path, out: Path | None = None, report_to: str | None = None):
        raw = with_parent(path)
        allowed = {"name", "model", "task", "cf", "train", "eval", "runs", "seed", "seeds",
                   "replay", "contextual", "ablation"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise CftuneError(f"{path}: unknown key(s) {', '.join(unknown)}"
                              f"{did_you_mean(unknown[0], allowed)} (allowed: "
                              f"{', '.join(sorted(allowed))})")
        self.path = path
        self.report_to = report_to  # `cftune run --report-to`: over every run's `report_to`
        self.name = str(raw.get("name", path.stem))
        self.out = out or Path("experiments") / self.name
        self.model = str(raw.get("model", DEFAULT_MODEL))
        self.seed = _integer(path, "seed", raw.get("seed", 0), "seed of every run (or give `seeds`)")
        self.seeds = _seeds(path, raw.get("seeds", [self.seed]))
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
        self.cf_heldout = _integer(path, "cf.heldout", cf.pop("heldout", 128),
                                        "held-out T=1 samples of the base for the KL", 2)
        for banned in RUNNER_SET_CF:
            if banned in cf:
                raise CftuneError(f"{path}: cf.{banned} is set by the runner; remove it")
        self.cf = from_dict(GenerateConfig, {"model": self.model, **cf}, f"{path}: cf")
        self.train_defaults = dict(raw.get("train") or {})
        _check_train_keys(self.train_defaults, f"{path}: train")
        self.runs = self._expand_runs(raw.get("runs") or [])
        self.ablation = self._ablation(raw.get("ablation"))
        self._check_equal_task_batches()
        self._check_benchmarks()

    # ------------------------------------------------------------------ validation

    def _expand_runs(self, runs: list[Any]) -> list[Run]:
        if not isinstance(runs, list) or not runs:
            raise CftuneError(f"{self.path}: `runs` must be a non-empty list of runs")
        specs: list[dict[str, Any]] = []  # runs before their copies over seeds
        for i, run in enumerate(runs):
            where = f"{self.path}: runs[{i}]"
            if not isinstance(run, dict) or "name" not in run or "method" not in run:
                raise CftuneError(f"{where}: each run needs a `name` and a `method`")
            settings = {k: v for k, v in run.items() if k not in RUN_KEYS}
            seeds = self._run_seeds(run.get("seeds"), where)
            family = run.get("family")
            if family is not None and (not isinstance(family, str) or not family):
                raise CftuneError(f"{where}: `family` = {family!r} must be a name (the frontier "
                                  f"family the run joins)")
            cf = self._cf_overrides(run.get("cf") or {}, run, f"{where}: cf")
            if run["method"] == WISE_FT:
                if "of" not in run or "alphas" not in run:
                    raise CftuneError(f"{where}: a wise-ft run needs `of` (a run name) and `alphas`")
                if settings:
                    raise CftuneError(f"{where}: a wise-ft run takes no training settings "
                                      f"({', '.join(sorted(settings))})")
                for a in run["alphas"]:
                    specs.append({"name": f"{run['name']}-a{a}", "method": WISE_FT,
                                "of": str(run["of"]), "alpha": float(a), "seeds": seeds,
                                "family": family})
                continue
            _check_train_keys({**settings, "method": run["method"]}, where)
            sweep = run.get("sweep") or {}
            if len(sweep) > 1:
                raise CftuneError(f"{where}: sweep over one setting at a time (got {list(sweep)})")
            _check_train_keys({k: v for k, v in sweep.items() if not k.startswith(CF_SWEEP)},
                                   f"{where}: sweep")
            for key, values in sweep.items() or [(None, [None])]:
                on_cf = key is not None and key.startswith(CF_SWEEP)
                for v in values:
                    name = (run["name"] if key is None
                            else f"{run['name']}-{key.removeprefix(CF_SWEEP)}={v}")
                    extra = {} if key is None or on_cf else {key: v}
                    cf_extra = {key.removeprefix(CF_SWEEP): v} if on_cf else {}
                    specs.append({"name": name, "method": run["method"], "seeds": seeds,
                                "family": family,
                                "settings": {**self.train_defaults, **settings, **extra},
                                "cf": self._cf_overrides({**cf, **cf_extra}, run,
                                                         f"{where}: sweep")})
        out = self._replicate(specs)
        names = [r.name for r in out]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise CftuneError(f"{self.path}: duplicated run name(s) {', '.join(dupes)}")
        for r in out:
            if r.method == WISE_FT:
                parent = next((p for p in out if p.name == r.of), None)
                if parent is None or parent.method == WISE_FT:
                    raise CftuneError(f"{self.path}: run '{r.name}' merges unknown run "
                                      f"'{r.of}' (of: must name a training run)")
            else:  # fail now, not after an hour of training, on bad values
                self.train_config(r)
        return out

    def _cf_overrides(self, cf: Any, run: dict[str, Any], where: str) -> dict[str, Any]:
        """A run's own CF pool settings (`cf: {temperature: 0.8}`, `cf: {chat: true}`) over the
        config's `cf`, checked now: the run trains on a pool drawn with them."""
        if not cf:
            return {}
        if not isinstance(cf, dict):
            raise CftuneError(f"{where}: give CF settings as a mapping, e.g. {{temperature: 0.8}}")
        if run["method"] not in CF_METHODS:
            raise CftuneError(f"{where}: only {' and '.join(CF_METHODS)} runs train on the CF "
                              f"pool ('{run['method']}' does not)")
        for banned in (*RUNNER_SET_CF, "seed"):  # a run's pool seed follows the run's seed
            if banned in cf:
                raise CftuneError(f"{where}: cf.{banned} is set by the runner; remove it")
        from_dict(GenerateConfig, {**dataclasses.asdict(self.cf), **cf}, where)
        # Only what differs from the config's pool: `temperature: 1.0` in a sweep is that pool.
        return {k: v for k, v in cf.items() if getattr(self.cf, k) != v}

    def _ablation(self, setting: Any) -> str | None:
        """`ablation: cf.temperature` (or a training setting such as `cfs_lambda`): the setting
        the config varies, drawn as the x axis of `ablation.png` for its cfs and kd runs."""
        if setting is None:
            return None
        where = f"{self.path}: ablation"
        if not isinstance(setting, str):
            raise CftuneError(f"{where}: name one setting, e.g. cf.temperature or cfs_lambda")
        name = setting.removeprefix(CF_SWEEP)
        known = {f.name for f in dataclasses.fields(
            GenerateConfig if setting.startswith(CF_SWEEP) else TrainConfig)}
        if name not in known:
            raise CftuneError(f"{where}: unknown setting {setting}{did_you_mean(name, known)}")
        return setting

    def setting_value(self, run: Run, setting: str) -> Any:
        """A training run's value of `setting` (`cf.NAME`: its CF pool's), defaults included."""
        if setting.startswith(CF_SWEEP):
            name = setting.removeprefix(CF_SWEEP)
            return run.cf.get(name, getattr(self.cf, name))
        return getattr(self.train_config(run), setting)

    def _run_seeds(self, value: Any, where: str) -> list[int]:
        """A run's own `seeds` (a subset of the experiment's: the costly runs replicated, the
        rest on the first seed); by default every seed."""
        if value is None:
            return self.seeds
        seeds = _seeds(self.path, value)
        extra = sorted(set(seeds) - set(self.seeds))
        if extra:
            raise CftuneError(f"{where}: seeds {extra} are not among the experiment's `seeds` "
                              f"{self.seeds}; a run replicates over a subset of them")
        return seeds

    def _replicate(self, runs: list[dict[str, Any]]) -> list[Run]:
        """One copy of each run per seed (the run's own `seeds`, else every seed): named
        `NAME-sSEED` when the experiment has several seeds, with `group` = NAME (what the report
        averages over) and `seed`; a Wise-FT run merges the copy of its parent with the same
        seed."""
        out = []
        for s in self.seeds:
            tag = f"-s{s}" if len(self.seeds) > 1 else ""
            for r in runs:
                if s not in r["seeds"]:
                    continue
                merge = r["method"] == WISE_FT
                out.append(Run(name=r["name"] + tag, method=r["method"], group=r["name"], seed=s,
                               settings=r.get("settings") or {}, cf=r.get("cf") or {},
                               of=r["of"] + tag if merge else None,
                               alpha=r["alpha"] if merge else None, family=r.get("family")))
        return out

    def _check_equal_task_batches(self) -> None:
        """Every training run must see the same task examples per optimizer step (issue 9, item
        4): a second stream adds examples on top, it never takes task examples' place."""
        per_step: dict[int, list[str]] = {}
        for r in self.runs:
            if r.method != WISE_FT:
                cfg = self.train_config(r)
                per_step.setdefault(cfg.batch_size * cfg.grad_accum, []).append(r.name)
        if len(per_step) > 1:
            groups = "; ".join(f"{n} for {', '.join(names)}" for n, names in sorted(per_step.items()))
            raise CftuneError(f"{self.path}: runs see different task examples per step "
                              f"(batch_size x grad_accum: {groups}); give every run the same "
                              f"batch_size (task examples; a second stream adds cfs_ratio x "
                              f"batch_size on top)")

    def _check_benchmarks(self) -> None:
        import cftune.evaluate.benchmarks as benchmarks

        for name in self.eval.bench:
            benchmarks.resolve(name, self.eval.data_dir)
        groups = {r.name for r in self.runs} | {r.group for r in self.runs} | {"base"}
        for pair in self.eval.compare:
            unknown = [n for n in pair if n not in groups]
            if len(pair) != 2 or unknown:
                raise CftuneError(f"{self.path}: eval.compare entry {pair}: give two run names "
                                  f"(or run groups) of {', '.join(sorted(groups))}")

    # ------------------------------------------------------------------ stage settings

    def train_settings(self, run: Run, task_file: Path, stream: Path | None
                       ) -> dict[str, Any]:
        """A run's TrainConfig values (the runner sets model, data and prompt format); `stream`
        is the run's second data stream: CF pool, contextual samples or replay corpus."""
        settings = {"model": self.model, "task": str(task_file), "out": "unused",
                    "prompt_field": self.task.prompt_field,
                    "response_field": self.task.response_field, "seed": run.seed,
                    "prompt_format": self.task.prompt, "doc_start": self.task.doc_start,
                    # the tracker's run name; like `report_to`, in no stage key (NOT_A_SETTING)
                    "method": run.method, "run_name": run.name, **run.settings,
                    **({"report_to": self.report_to} if self.report_to else {})}
        if settings["method"] == "replay":
            settings["replay"] = str(stream)
        elif settings["method"] in STREAM_METHODS:
            settings["cfs"] = str(stream)
        return settings

    def train_config(self, run: Run) -> TrainConfig:
        """The run's TrainConfig with placeholder data paths: validates every other setting
        before anything runs (the data files are written by earlier stages)."""
        placeholder = "builtin:arithmetic"  # passes the existence checks, like a builtin task
        settings = self.train_settings(run, Path(placeholder), Path(placeholder))
        return from_dict(TrainConfig, settings, f"{self.path}: run '{run.name}'")

    def cf_consumed(self, run: Run) -> int:
        """CF examples a run draws in training (the trainer's own count, so the pool is drawn
        exactly as large as training consumes)."""
        cfg = self.train_config(run)
        return cf_draws(cfg, self.task.train_rows) if cfg.method in STREAM_METHODS else 0
