"""`cftune eval`: every metric for the base and each model, one comparison report.

Models are loaded one at a time (only one sits in memory). Every result is cached under
`cache_dir()/eval`, keyed by the model's content fingerprint, the content hash of what was scored
and the settings that change the numbers, so the base is scored once however many fine-tuned
models are later compared with it (the batch size is not in the key: it changes results only by
float rounding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cftune.evaluate.benchmarks as benchmarks
from cftune.config import field, to_dict
from cftune.errors import CftuneError
from cftune.evaluate.measure import Scoring
from cftune.evaluate.model import Measure, evaluate_model
from cftune.evaluate.report import build_entries, write
from cftune.evaluate.responses import draw_responses
from cftune.evaluate.task_accuracy import (
    PROMPTS,
)
from cftune.io import atomic_write_json
from cftune.locking import output_locked
from cftune.models import (
    DEFAULT_MODEL,
    fingerprint,
    load_tokenizer,
)
from cftune.prompts import PromptSpec
from cftune.results.tables import comparisons_markdown, paired_markdown


@dataclass
class EvalConfig(Scoring):
    """Settings of `cftune eval` (flags and YAML keys come from these fields)."""

    base: str = field(DEFAULT_MODEL, "base model: alias, local folder, .gguf file or hub id")
    model: list[str] = field([], "model(s) to compare with the base")
    kl_samples: str | None = field(None, "held-out CF sample folder of the base (T=1) for the KL")
    bench: list[str] = field([], "benchmarks: registry names (arc_easy, piqa, …) or .jsonl files")
    task: str | None = field(None, "GSM8K-format task test file for greedy exact-match accuracy")
    perplexity: str | None = field(None, "text file (.txt, or .jsonl with `text`) for perplexity")
    instructions: str | None = field(
        None, "held-out instructions (JSONL with prompt/reference fields, or the self-instruct "
        "seed format) for instr_kl and instr_ref_nll")
    instruction_samples: int = field(2, "base responses (T=1) drawn per instruction for instr_kl")
    instruction_max_new_tokens: int = field(128, "maximum tokens per base response (instr_kl)")
    instruction_prompt_field: str = field("prompt", "field of --instructions holding the prompt")
    instruction_reference_field: str = field(
        "reference", "field of --instructions holding the human reference response (optional)")
    limit: int | None = field(None, "items per benchmark / task rows / perplexity docs / "
                              "instructions (a fixed subset)")
    seed: int = field(0, "subset for --limit: 0 = the first N items, else a seeded draw of N")
    offset: int = field(0, "benchmark items and instructions start at this index: items "
                        "[offset, offset + limit), a split apart from the first N")
    num_fewshot: int = field(0, "few-shot examples before each task question")
    fewshot_file: str | None = field(None, "GSM8K-format file the few-shot examples come from")
    task_prompt: str = field("qa", "task prompt, as in training: qa ('Question: …\\nAnswer:') | "
                             "chat (chat template) | plain (prompt_template) | auto")
    prompt_template: str = field("{prompt}\n", "plain task prompt format, {prompt} is replaced")
    doc_start: str | None = field(None, "token a qa/plain prompt starts with, as in training "
                                  "(default: cftune.prompts.doc_start_ids)")
    max_new_tokens: int = field(256, "maximum generated tokens per task answer")
    device: str = field("auto", "auto | cpu | cuda | mps")
    out: str = field("evals", "output folder for eval.json and eval.md")
    force_kl: bool = field(False, "estimate the KL even from biased or mismatched samples")
    data_dir: str | None = field(None, "folder of benchmark files (default $CFTUNE_DATA or ../shared/data)")
    cache: bool = field(True, "reuse cached results (keyed by model and data content)")
    compare: list[str] = field([], "two of the models (or the base) to compare item by item: "
                               "B − A on every yardstick, with paired intervals")

    def __post_init__(self) -> None:
        problems = []
        if not (self.kl_samples or self.bench or self.task or self.perplexity or self.instructions):
            problems.append("nothing to evaluate: give --kl-samples, --bench, --task, "
                            "--perplexity or --instructions")
        for name in ("limit", "batch_size", "max_new_tokens", "instruction_samples",
                     "instruction_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0 (got {value})")
        if self.offset < 0:
            problems.append(f"offset must be >= 0 (got {self.offset})")
        if self.num_fewshot < 0:
            problems.append(f"num_fewshot must be >= 0 (got {self.num_fewshot})")
        problems += self.scoring_problems()
        if self.task_prompt not in PROMPTS:
            problems.append(f"task_prompt must be one of {', '.join(PROMPTS)} (got {self.task_prompt})")
        if problems:
            raise CftuneError("; ".join(problems))

    @property
    def prompt_spec(self) -> PromptSpec:
        return PromptSpec(self.task_prompt, self.prompt_template, self.doc_start)


def check_vocab(spec: str, tokenizer, base: str, base_tokenizer) -> None:
    """Log-probs of two models are comparable token by token only with one vocabulary."""
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise CftuneError(
            f"model '{spec}': its tokenizer's vocabulary ({len(tokenizer)} tokens) differs from "
            f"the base '{base}' ({len(base_tokenizer)} tokens); compare models fine-tuned from "
            "this base, or pass the right --base"
        )


def measure(config: EvalConfig, instructions: Path | None) -> Measure:
    """What `cftune eval` scores on each model: `--limit` items of every benchmark, task rows and
    perplexity documents (the KL uses every held-out sample), `instructions` the base's drawn
    responses (None: not asked)."""
    path = (lambda p: Path(p) if p else None)  # noqa: E731
    return Measure(kl_samples=path(config.kl_samples), force_kl=config.force_kl,
                   bench=tuple(config.bench), bench_limit=config.limit,
                   bench_offset=config.offset, bench_seed=config.seed, data_dir=config.data_dir,
                   task=path(config.task), task_limit=config.limit, prompt=config.prompt_spec,
                   num_fewshot=config.num_fewshot, fewshot_file=config.fewshot_file,
                   max_new_tokens=config.max_new_tokens, instructions=instructions,
                   doc_start=config.doc_start, perplexity=path(config.perplexity),
                   perplexity_limit=config.limit, batch_size=config.batch_size,
                   score_dtype=config.score_dtype, decode_dtype=config.decode_dtype,
                   decode_engine=config.decode_engine, device=config.device, cache=config.cache)


def instruction_responses(config: EvalConfig, base_fp: str) -> Path | None:
    """The base's responses to `--instructions`, drawn once into the cache (None: not asked)."""
    if not config.instructions:
        return None
    return draw_responses(config.base, config.instructions, config.instruction_samples,
                          config.instruction_max_new_tokens, limit=config.limit,
                          offset=config.offset,
                          prompt_field=config.instruction_prompt_field,
                          reference_field=config.instruction_reference_field,
                          batch_size=config.batch_size, dtype=config.score_dtype,
                          device=config.device, doc_start=config.doc_start,
                          base_fingerprint=base_fp)


def paired_results(results: dict[str, dict], base: str, compare: list[str]
                   ) -> tuple[dict[str, dict], list[dict]]:
    """Every model paired against the base item by item, and the `--compare A B` pair."""
    from cftune.results.compare import paired_metrics

    outcomes = {spec: {"items": r["items"]} for spec, r in results.items()}
    paired = {spec: paired_metrics([outcomes[base]], [outcomes[spec]])
              for spec in results if spec != base}
    comparisons = []
    if compare:
        a, b = compare
        comparisons.append({"ref": a, "model": b, "metrics": paired_metrics(
            [outcomes[a]], [outcomes[b]], with_kl=True)})
    return paired, comparisons


@output_locked
def evaluate(config: EvalConfig) -> dict:
    """Score the base and every model, print the comparison table, write `out/eval.json` and
    `out/eval.md`; returns the eval.json content."""
    specs = list(dict.fromkeys([config.base, *config.model]))
    unknown = [c for c in config.compare if c not in specs]
    if config.compare and (len(config.compare) != 2 or unknown):
        raise CftuneError(f"--compare takes two of the models evaluated ({', '.join(specs)}); "
                          f"got {', '.join(config.compare)}")
    for name in config.bench:  # a mistyped benchmark fails before any model is loaded
        benchmarks.resolve(name, config.data_dir)
    base_tokenizer = load_tokenizer(config.base)
    tokenizers = {config.base: base_tokenizer}
    for spec in specs[1:]:  # fail fast, before any scoring
        tokenizers[spec] = load_tokenizer(spec)
        check_vocab(spec, tokenizers[spec], config.base, base_tokenizer)
    fps = {spec: fingerprint(spec) for spec in specs}
    instr = instruction_responses(config, fps[config.base])
    m = measure(config, instr)
    results = {}
    for spec in specs:
        print(f"cftune eval: {spec}")
        results[spec] = evaluate_model(spec, m, fps[config.base], fps[spec], base_tokenizer,
                                       tokenizers[spec])
    paired, comparisons = paired_results(results, config.base, config.compare)
    entries = build_entries({s: r["metrics"] for s, r in results.items()}, config.base)
    models = [{"spec": s, "fingerprint": fps[s], "role": "base" if s == config.base else "model"}
              for s in specs]
    raw = {s: r["raw"] for s, r in results.items()}
    out = Path(config.out)
    text = write(out, entries, models, config.base, to_dict(config), raw, paired, comparisons)
    atomic_write_json(out / "items.json", {s: r["items"] for s, r in results.items()})
    print(text)
    print(paired_markdown([{"run": s, "metrics": m} for s, m in paired.items()])
          + comparisons_markdown(comparisons))
    print(f"cftune eval: wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'items.json'} "
          f"(per-item outcomes)")
    return json.loads((Path(config.out) / "eval.json").read_text())
