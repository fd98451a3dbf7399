"""`cftune eval`: every metric for the base and each model, one comparison report.

Models are loaded one at a time (only one sits in memory). Every result is cached under
`cache_dir()/eval`, keyed by the model's content fingerprint, the content hash of what was scored
and the settings that change the numbers, so the base is scored once however many fine-tuned
models are later compared with it (the batch size is not in the key: it changes results only by
float rounding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cftune import precision
from cftune.config import field, to_dict
from cftune.errors import CftuneError
from cftune.evaluate import benchmarks
from cftune.evaluate.instructions import (
    PROMPTS_FILE,
    RESPONSES,
    draw_responses,
    instruction_kl,
    instruction_spec,
    reference_nll,
)
from cftune.evaluate.kl import base_reference, kl_to_base, needs_reference
from cftune.evaluate.multiple_choice import run_benchmark
from cftune.evaluate.perplexity import perplexity
from cftune.evaluate.report import build_entries, write
from cftune.evaluate.task_accuracy import (
    DECODE_ENGINES,
    PROMPTS,
    answer_nll,
    decoder,
    task_accuracy,
)
from cftune.locking import output_locked
from cftune.models import (
    DEFAULT_MODEL,
    DTYPES,
    cache_dir,
    fingerprint,
    load_model,
    load_tokenizer,
    weight_dtype,
)
from cftune.prompts import PromptSpec
from cftune.report import comparisons_markdown, paired_markdown
from cftune.samples import atomic_write_json, samples_file

CACHE_VERSION = 3  # bump when a metric's computation changes


@dataclass
class EvalConfig:
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
    batch_size: int = field(16, "sequences per forward pass")
    score_dtype: str = field("fp32", "precision of every log-likelihood metric (KL, benchmarks, "
                             "answer NLL, perplexity); not fp32: the KL's base log-probs are "
                             "re-scored in it and their gap to the stored ones is reported")
    decode_dtype: str = field("fp32", "precision of greedy task decoding: fp32 | bf16 | fp16 | "
                              "auto (the machine's faster, cftune.precision); not fp32 flips "
                              "near-ties, so the default keeps task accuracy machine-independent")
    decode_engine: str = field("auto", "greedy task decoding by torch | vllm | auto (vLLM on one "
                               "GPU where it is installed, for whole models; torch elsewhere)")
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
        if self.decode_engine not in DECODE_ENGINES:
            problems.append(f"decode_engine must be one of {', '.join(DECODE_ENGINES)} "
                            f"(got {self.decode_engine})")
        for name in ("limit", "batch_size", "max_new_tokens", "instruction_samples",
                     "instruction_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0 (got {value})")
        if self.offset < 0:
            problems.append(f"offset must be >= 0 (got {self.offset})")
        if self.num_fewshot < 0:
            problems.append(f"num_fewshot must be >= 0 (got {self.num_fewshot})")
        if self.score_dtype not in DTYPES:
            problems.append(f"score_dtype must be one of {', '.join(DTYPES)} "
                            f"(got {self.score_dtype})")
        if self.decode_dtype not in (*DTYPES, precision.AUTO):
            problems.append(f"decode_dtype must be one of {', '.join(DTYPES)}, {precision.AUTO} "
                            f"(got {self.decode_dtype})")
        if self.task_prompt not in PROMPTS:
            problems.append(f"task_prompt must be one of {', '.join(PROMPTS)} (got {self.task_prompt})")
        if problems:
            raise CftuneError("; ".join(problems))

    @property
    def prompt_spec(self) -> PromptSpec:
        return PromptSpec(self.task_prompt, self.prompt_template, self.doc_start)


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]


def _cached(use: bool, model_fp: str, key: dict, compute: Callable[[], dict]) -> dict:
    """`compute()`, or its earlier result for the same model content, data content and settings."""
    if not use or model_fp.startswith("hub:"):  # a hub id names no fixed weights
        return compute()
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, model_fp, key], sort_keys=True).encode())
    path = cache_dir() / "eval" / f"{digest.hexdigest()[:32]}.json"
    if path.is_file():
        return json.loads(path.read_text())["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": model_fp, "key": key, "result": result}))
    tmp.replace(path)
    return result


def check_vocab(spec: str, tokenizer, base: str, base_tokenizer) -> None:
    """Log-probs of two models are comparable token by token only with one vocabulary."""
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise CftuneError(
            f"model '{spec}': its tokenizer's vocabulary ({len(tokenizer)} tokens) differs from "
            f"the base '{base}' ({len(base_tokenizer)} tokens); compare models fine-tuned from "
            "this base, or pass the right --base"
        )


def _evaluate_model(config: EvalConfig, spec: str, fp: str, tokenizer, base_fp: str,
                    base_tokenizer, reference: list[float] | None,
                    instr: Path | None = None) -> list[tuple[str, str, dict]]:
    """(kind, name, result) for every requested metric of one model (freed on return).

    Log-likelihood metrics first, in `score_dtype`; greedy decoding last, in `decode_dtype`
    (issue 9, item 8: one precision rule for the CLI and the runner).
    """
    model = load_model(spec, config.device, config.score_dtype, inference=True)
    device = next(model.parameters()).device
    scoring = {"dtype": config.score_dtype, "device": device.type}
    bs, dt, use = config.batch_size, config.score_dtype, config.cache
    prompt = config.prompt_spec
    out = []
    if config.kl_samples:
        key = {"kind": "kl", "samples": file_hash(samples_file(config.kl_samples)),
               "force": config.force_kl, "reference": reference is not None, **scoring}
        out.append(("kl", "kl", _cached(use, fp, key, lambda: kl_to_base(
            model, config.kl_samples, bs, dt, config.force_kl, None, base_fp, base_tokenizer,
            reference))))
    for name in config.bench:
        bench, path = benchmarks.resolve(name, config.data_dir)
        key = {"kind": "bench", "data": benchmarks.content_hash(path, bench),
               "limit": config.limit, "seed": config.seed, "offset": config.offset, **scoring}
        out.append(("bench", bench.name, _cached(use, fp, key, lambda name=name: run_benchmark(
            model, tokenizer, name, config.limit, bs, dt, config.data_dir, config.seed,
            config.offset))))
    if config.task:
        key = {"kind": "task_nll", "data": file_hash(config.task), "limit": config.limit,
               "prompt": dataclasses.asdict(prompt), **scoring}
        out.append(("task_nll", Path(config.task).stem, _cached(use, fp, key, lambda: answer_nll(
            model, tokenizer, config.task, config.limit, prompt, bs, dt))))
    if instr is not None:  # a `draw_responses` folder of the base
        key = {"kind": "instr_kl", "samples": file_hash(samples_file(instr / RESPONSES)), **scoring}
        out.append(("instr_kl", "instr_kl", _cached(use, fp, key, lambda: instruction_kl(
            model, instr, bs, dt, base_fp, base_tokenizer))))
        posed = instruction_spec(base_tokenizer, config.doc_start)  # as the base's responses
        key = {"kind": "instr_ref_nll", "data": file_hash(instr / PROMPTS_FILE),
               "prompt": dataclasses.asdict(posed), **scoring}
        out.append(("instr_ref_nll", "instr_ref_nll", _cached(use, fp, key, lambda: reference_nll(
            model, tokenizer, instr / PROMPTS_FILE, posed, bs, dt))))
    if config.perplexity:
        key = {"kind": "perplexity", "data": file_hash(config.perplexity), "limit": config.limit,
               **scoring}
        out.append(("perplexity", Path(config.perplexity).stem, _cached(use, fp, key, lambda: perplexity(
            model, tokenizer, config.perplexity, batch_size=bs, dtype=dt, limit=config.limit))))
    if config.task:
        decode_dtype = precision.resolve(config.decode_dtype, device)[0]
        key = {"kind": "task", "data": file_hash(config.task), "limit": config.limit,
               "fewshot": [config.num_fewshot, config.fewshot_file and file_hash(config.fewshot_file)],
               "max_new_tokens": config.max_new_tokens, "prompt": dataclasses.asdict(prompt),
               "dtype": decode_dtype, "device": device.type}

        engine, decode_fn = decoder(config.decode_engine, model, spec, tokenizer,
                                    config.max_new_tokens, decode_dtype)
        if engine != "torch":  # in the key only when not torch: earlier results keep theirs
            key["engine"] = engine

        def decode() -> dict:
            if decode_fn is None:
                model.to(weight_dtype(decode_dtype, device, inference=True))
            return task_accuracy(model, tokenizer, config.task, config.limit,
                                 config.max_new_tokens, config.num_fewshot, config.fewshot_file,
                                 prompt, bs, decode_dtype, decode=decode_fn)
        out.insert(0, ("task", Path(config.task).stem, _cached(use, fp, key, decode)))
    return out


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


PER_ITEM = ("items", "per_sample", "per_problem", "correct", "per_prompt", "indices")
# result kind -> (its per-item key, the yardstick's name in `cftune.compare`)
OUTCOMES = {"kl": ("per_sample", "kl"), "task": ("correct", "task_acc"),
            "task_nll": ("per_problem", "task_nll"), "instr_kl": ("per_prompt", "instr_kl"),
            "instr_ref_nll": ("per_prompt", "instr_ref_nll")}


def item_outcomes(rows: list[tuple[str, str, dict]]) -> dict:
    """One model's per-item outcomes, in the shape `cftune.compare.paired_metrics` reads."""
    items: dict = {}
    for kind, name, r in rows:
        if kind == "bench" and "items" in r:
            items[f"bench/{name}"] = {"primary": r["primary"], "records": r["items"]}
        elif kind in OUTCOMES and OUTCOMES[kind][0] in r:
            key, label = OUTCOMES[kind]
            items[label] = r[key]
    return {"items": items}


def paired_results(results: dict[str, list[tuple[str, str, dict]]], base: str,
                   compare: list[str]) -> tuple[dict[str, dict], list[dict]]:
    """Every model paired against the base item by item, and the `--compare A B` pair."""
    from cftune.compare import paired_metrics

    outcomes = {spec: item_outcomes(rows) for spec, rows in results.items()}
    paired = {spec: paired_metrics([outcomes[base]], [outcomes[spec]])
              for spec in results if spec != base}
    comparisons = []
    if compare:
        a, b = compare
        comparisons.append({"ref": a, "model": b, "metrics": paired_metrics(
            [outcomes[a]], [outcomes[b]], with_kl=True)})
    return paired, comparisons


def kl_reference(config: EvalConfig, base_fp: str) -> list[float] | None:
    """`kl.base_reference` for the KL samples in `score_dtype`, cached like every result."""
    if not config.kl_samples or not needs_reference(config.kl_samples, config.score_dtype):
        return None
    key = {"kind": "kl_reference", "samples": file_hash(samples_file(config.kl_samples)),
           "dtype": config.score_dtype}
    return _cached(config.cache, base_fp, key, lambda: {"logps": base_reference(
        config.base, config.kl_samples, config.score_dtype, None, config.batch_size,
        config.device)})["logps"]


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
    reference = kl_reference(config, fps[config.base])
    instr = instruction_responses(config, fps[config.base])
    results = {}
    for spec in specs:
        print(f"cftune eval: {spec}")
        results[spec] = _evaluate_model(config, spec, fps[spec], tokenizers[spec],
                                        fps[config.base], base_tokenizer, reference, instr)
    paired, comparisons = paired_results(results, config.base, config.compare)
    entries = build_entries(results, config.base)
    models = [{"spec": s, "fingerprint": fps[s], "role": "base" if s == config.base else "model"}
              for s in specs]
    raw = {s: [{"kind": k, "name": n, **{key: v for key, v in r.items() if key not in PER_ITEM}}
               for k, n, r in rs] for s, rs in results.items()}
    out = Path(config.out)
    text = write(out, entries, models, config.base, to_dict(config), raw, paired, comparisons)
    atomic_write_json(out / "items.json", {s: item_outcomes(rs)["items"] for s, rs in results.items()})
    print(text)
    print(paired_markdown([{"run": s, "metrics": m} for s, m in paired.items()])
          + comparisons_markdown(comparisons))
    print(f"cftune eval: wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'items.json'} "
          f"(per-item outcomes)")
    return json.loads((Path(config.out) / "eval.json").read_text())
