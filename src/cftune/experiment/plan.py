"""The runner's plan: an `Experiment` turned into stages (task data → CF pools → trainings →
Wise-FT merges → evaluations), each with a folder named by the hash of everything it depends on.

A stage whose folder already holds its finished output is cached; `Runner.todo` lists, for each
evaluation not yet done, the stages it needs that are not done, so a killed run resumes where it
stopped and a changed setting redoes only what depends on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cftune.errors import CftuneError
from cftune.evaluate.instructions import PROMPTS_FILE, RESPONSES
from cftune.evaluate.measure import VERSION as METRICS_VERSION
from cftune.experiment.config import CF_METHODS, STREAM_METHODS, WISE_FT, Experiment
from cftune.experiment.config import stage_key as _key
from cftune.generate.config import GenerateConfig, engine_settings, without_later_defaults
from cftune.generate.samples import SAMPLES_JSONL
from cftune.io import read_json
from cftune.models import fingerprint
from cftune.train.config import NOT_A_SETTING


@dataclass
class Stage:
    """One unit of work, described, not done: its name, output folder, `action` (what fills the
    folder: data, replay, generate, instructions, train, merge, eval; `cftune.experiment.execute`
    performs it) with its `args`, and `done`, whether the folder holds the finished output.
    `cost` is its size in its kind's units (training examples, sampled tokens), for the ETA;
    `needs`: the stages it reads, so a stage runs only while a missing evaluation needs it."""

    name: str
    folder: Path
    action: str
    done: Callable[[], bool]
    cost: float = 1.0
    needs: tuple[Path, ...] = ()  # folders of the stages whose output this one reads
    args: dict[str, Any] = dataclasses.field(default_factory=dict)


class Runner:
    """An `Experiment` planned: its stages, each keyed and described, and which are still to do
    (`cftune.experiment.execute` does them). Pure: planning reads configs and files, runs nothing."""

    def __init__(self, exp: Experiment, only: list[str], stages: Path | None = None):
        self.exp = exp
        self.out = stages or exp.out  # where the stages live; the report goes to exp.out
        unknown = sorted(set(only) - {r.name for r in exp.runs})
        if unknown:
            raise CftuneError(f"--only: unknown run(s) {', '.join(unknown)}")
        # The whole config is planned (so the report can hold every evaluation already done);
        # `only` narrows what is run to these runs' evaluations and what they need.
        self.wanted = {"base", *(only or (r.name for r in exp.runs))}
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
        self._add("data", data_dir, "data", lambda: self.test_file.is_file())

        trained = [r for r in self.runs if r.method != WISE_FT]
        # Over every run of the config: the pool is the same folder whichever runs `--only`
        # asks for (a pool drawn without top-K for `--only cfs` would be another folder).
        kd = any(r.method == "kd" for r in exp.runs)
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
        self.pool: dict[tuple[int, tuple], Path] = {}
        self.contextual: dict[int, Path] = {}
        for s in dict.fromkeys(r.seed for r in trained):
            mine = [r for r in trained if r.seed == s]
            cf_seed, tag = exp.cf.seed + s - exp.seed, f"-s{s}" if len(exp.seeds) > 1 else ""
            for over in dict.fromkeys(r.pool for r in mine if r.method in CF_METHODS):
                need = max(exp.cf_consumed(r) for r in mine
                           if r.method in CF_METHODS and r.pool == over)
                own = dict(over)
                name = "cf-pool" + "".join(f"-{k}={v}" for k, v in own.items()) + tag
                self.pool[s, over] = self._generate_stage(name, {**cf_settings, **own}, need,
                                                          cf_seed)
            need = max([exp.cf_consumed(r) for r in mine if r.method == "contextual"] or [0])
            if need:  # the base's own answers to the training prompts, posed as in training
                self.contextual[s] = self._generate_stage(f"contextual{tag}", contextual_settings,
                                                          need, cf_seed, needs=(data_dir,))
        self.replay_file = None
        if any(r.method == "replay" for r in trained):
            if not exp.replay.file:
                raise CftuneError(f"{exp.path}: a replay run needs `replay: {{file: ...}}`")
            folder = self.out / "data" / f"replay-{self._key(dataclasses.asdict(exp.replay))}"
            self.replay_file = folder / "replay.jsonl"
            self._add("replay corpus", folder, "replay",
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
            if r.method == WISE_FT:
                parent = self.models[r.of]
                folder = self.out / "runs" / f"{r.name}-{self._key(parent, r.alpha)}"
                self._add(f"merge {r.name}", folder, "merge",
                          lambda f=folder: has_weights(f), needs=(Path(parent),),
                          args={"parent": parent, "alpha": r.alpha})
            else:
                stream = {"replay": self.replay_file,
                          "contextual": self.contextual.get(r.seed)}.get(
                    r.method, self.pool.get((r.seed, r.pool)))
                settings = exp.train_settings(r, self.train_file, stream)
                # memory and resume options do not change the model: they keep the folder
                kept = {k: v for k, v in settings.items() if k not in NOT_A_SETTING}
                folder = self.out / "runs" / f"{r.name}-{self._key(kept, self.base_fp)}"
                examples = (settings.get("max_steps") or 1) * (settings.get("batch_size") or 1)
                self._add(f"train {r.name}", folder, "train",
                          lambda f=folder: has_weights(f), cost=examples,
                          needs=(data_dir,) + ((_stage_of(stream),)
                                               if r.method in STREAM_METHODS else ()),
                          args={"settings": settings})
            self.models[r.name] = folder
        measured = {k: v for k, v in dataclasses.asdict(exp.eval).items()
                    if k not in ("plot_y", "compare")  # report settings, not measurements
                    and not (k == "decode_engine" and v == "auto")  # added later: old keys
                    and not (k.startswith("instruction") and exp.eval.instructions is None)}
        # The held-out folder is extended in place when `cf.heldout` grows: the count is part of
        # the key (sample i is fixed), so a changed count re-scores every model on the new set.
        eval_key = self._key(measured, self.heldout, exp.cf_heldout, self.test_file,
                             exp.task.prompt_spec, METRICS_VERSION)
        self.instructions = None
        if exp.eval.instructions:
            self.instructions = self._instruction_stage()
        for name, model in self.models.items():
            folder = self.out / "evals" / f"{name}-{self._key(model, eval_key)}"
            inputs = (data_dir, self.heldout, *([self.instructions] if self.instructions else []),
                      *([] if isinstance(model, str) else [model]))
            self._add(f"eval {name}", folder, "eval",
                      lambda f=folder: (f / "result.json").is_file(), needs=inputs,
                      args={"name": name, "model": model})

    def _instruction_stage(self) -> Path:
        """The base's T=1 responses to the held-out instructions (drawn once, for instr_kl)."""
        e = self.exp.eval
        settings = {"file": e.instructions, "limit": e.instruction_limit,
                    "offset": e.instruction_offset,
                    "samples": e.instruction_samples, "max_new_tokens": e.instruction_max_new_tokens,
                    "doc_start": self.exp.task.doc_start, "dtype": e.score_dtype}
        folder = self.out / "cf" / f"instructions-{self._key(settings, self.base_fp)}"

        n = e.instruction_samples * (e.instruction_limit or 175)  # a cost estimate only
        self._add(f"generate instructions ({n} responses)", folder, "instructions",
                  # a committed folder keeps the responses without their prompts (a copy of
                  # data the repository must not hold): the prompts are read again from the
                  # config's file and the responses restored, not drawn (evaluate.responses)
                  lambda: (folder / RESPONSES / "manifest.json").is_file()
                  and (folder / PROMPTS_FILE).is_file()
                  and (folder / RESPONSES / SAMPLES_JSONL).is_file(),
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

    def _add(self, name: str, folder: Path, action: str, done: Callable[[], bool],
             cost: float = 1.0, needs: tuple[Path, ...] = (),
             args: dict[str, Any] | None = None) -> None:
        self.stages.append(Stage(name, folder, action, done, cost, needs, args or {}))

    def _generate_stage(self, name: str, settings: dict[str, Any], n: int, seed: int,
                        needs: tuple[Path, ...] = ()) -> Path:
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
        self._add(f"generate {name} ({n} samples{engine})", folder, "generate", done,
                  cost=n * (settings.get("max_new_tokens") or 1), needs=needs,
                  args={"config": config})
        return folder

    # ------------------------------------------------------------------ running

    def todo(self) -> list[Stage]:
        """The stages to run: each evaluation not yet done, right after what it needs that is
        not done, so results land one model at a time (a run cut short keeps every evaluation
        it finished). A stage no missing evaluation needs is not run even when its folder is
        incomplete: an experiment folder kept without its model weights (committed results, a
        clone on another machine) reports without training again, and trains again only a model
        whose evaluation, or whose Wise-FT merge's evaluation, is missing."""
        return self.upstream(lambda stage: not stage.done())

    def upstream(self, follow: Callable[[Stage], bool]) -> list[Stage]:
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
                want(self.eval_stage(name))
        return order

    def eval_stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == f"eval {name}")


def _stage_of(stream: Path) -> Path:
    """The stage folder of a run's second stream: a CF or contextual pool is a folder, the
    replay corpus a file in its stage's folder."""
    return stream.parent if stream.suffix == ".jsonl" else stream


def has_weights(folder: Path) -> bool:
    """A finished model folder: its manifest (written last) and its weights (a folder kept
    without `*.safetensors`, as committed results are, holds a report's facts but no model)."""
    return (folder / "manifest.json").is_file() and any(folder.glob("*.safetensors"))
