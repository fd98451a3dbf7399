"""`cftune eval`: every metric for the base and each model, one comparison report.

Models are loaded one at a time (only one sits in memory). Every result is cached under
`cache_dir()/eval`, keyed by the model's content fingerprint, the content hash of what was scored
and the settings that change the numbers, so the base is scored once however many fine-tuned
models are later compared with it (the batch size is not in the key: it changes results only by
float rounding).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cftune.config import field, to_dict
from cftune.errors import CftuneError
from cftune.evaluate import benchmarks
from cftune.evaluate.kl import kl_to_base
from cftune.evaluate.multiple_choice import run_benchmark
from cftune.evaluate.perplexity import perplexity
from cftune.evaluate.report import build_entries, write
from cftune.evaluate.task_accuracy import PROMPTS, answer_nll, task_accuracy
from cftune.models import DEFAULT_MODEL, DTYPES, cache_dir, fingerprint, load_model, load_tokenizer
from cftune.samples import samples_file

CACHE_VERSION = 1  # bump when a metric's computation changes


@dataclass
class EvalConfig:
    """Settings of `cftune eval` (flags and YAML keys come from these fields)."""

    base: str = field(DEFAULT_MODEL, "base model: alias, local folder, .gguf file or hub id")
    model: list[str] = field([], "model(s) to compare with the base")
    kl_samples: str | None = field(None, "held-out CF sample folder of the base (T=1) for the KL")
    bench: list[str] = field([], "benchmarks: registry names (arc_easy, piqa, …) or .jsonl files")
    task: str | None = field(None, "GSM8K-format task test file for greedy exact-match accuracy")
    perplexity: str | None = field(None, "text file (.txt, or .jsonl with `text`) for perplexity")
    limit: int | None = field(None, "items per benchmark / task rows / perplexity docs (a fixed subset)")
    seed: int = field(0, "subset for --limit: 0 = the first N items, else a seeded draw of N")
    num_fewshot: int = field(0, "few-shot examples before each task question")
    fewshot_file: str | None = field(None, "GSM8K-format file the few-shot examples come from")
    task_prompt: str = field("qa", "task prompt: qa ('Question: …\\nAnswer:') | chat (chat template)")
    max_new_tokens: int = field(256, "maximum generated tokens per task answer")
    batch_size: int = field(16, "sequences per forward pass")
    dtype: str = field("fp32", "fp32 | bf16 | fp16 (bf16 on CPU = bf16 autocast)")
    device: str = field("auto", "auto | cpu | cuda | mps")
    out: str = field("evals", "output folder for eval.json and eval.md")
    force_kl: bool = field(False, "estimate the KL even from biased or mismatched samples")
    data_dir: str | None = field(None, "folder of benchmark files (default $CFTUNE_DATA or ../shared/data)")
    cache: bool = field(True, "reuse cached results (keyed by model and data content)")

    def __post_init__(self) -> None:
        problems = []
        if not (self.kl_samples or self.bench or self.task or self.perplexity):
            problems.append("nothing to evaluate: give --kl-samples, --bench, --task or --perplexity")
        for name in ("limit", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0 (got {value})")
        if self.num_fewshot < 0:
            problems.append(f"num_fewshot must be >= 0 (got {self.num_fewshot})")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype})")
        if self.task_prompt not in PROMPTS:
            problems.append(f"task_prompt must be one of {', '.join(PROMPTS)} (got {self.task_prompt})")
        if problems:
            raise CftuneError("; ".join(problems))


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
                    base_tokenizer) -> list[tuple[str, str, dict]]:
    """(kind, name, result) for every requested metric of one model (freed on return)."""
    model = load_model(spec, config.device, config.dtype)
    settings = {"dtype": config.dtype, "device": str(next(model.parameters()).device.type)}
    bs, dt, use = config.batch_size, config.dtype, config.cache
    out = []
    if config.kl_samples:
        key = {"kind": "kl", "samples": file_hash(samples_file(config.kl_samples)),
               "force": config.force_kl, **settings}
        out.append(("kl", "kl", _cached(use, fp, key, lambda: kl_to_base(
            model, config.kl_samples, bs, dt, config.force_kl, None, base_fp, base_tokenizer))))
    for name in config.bench:
        bench, path = benchmarks.resolve(name, config.data_dir)
        key = {"kind": "bench", "data": benchmarks.content_hash(path, bench),
               "limit": config.limit, "seed": config.seed, **settings}
        out.append(("bench", bench.name, _cached(use, fp, key, lambda name=name: run_benchmark(
            model, tokenizer, name, config.limit, bs, dt, config.data_dir, config.seed))))
    if config.task:
        key = {"kind": "task", "data": file_hash(config.task), "limit": config.limit,
               "fewshot": [config.num_fewshot, config.fewshot_file and file_hash(config.fewshot_file)],
               "max_new_tokens": config.max_new_tokens, "prompt": config.task_prompt, **settings}
        out.append(("task", Path(config.task).stem, _cached(use, fp, key, lambda: task_accuracy(
            model, tokenizer, config.task, config.limit, config.max_new_tokens,
            config.num_fewshot, config.fewshot_file, config.task_prompt, bs, dt))))
        key = {"kind": "task_nll", "data": file_hash(config.task), "limit": config.limit,
               "prompt": config.task_prompt, **settings}
        out.append(("task_nll", Path(config.task).stem, _cached(use, fp, key, lambda: answer_nll(
            model, tokenizer, config.task, config.limit, config.task_prompt, bs, dt))))
    if config.perplexity:
        key = {"kind": "perplexity", "data": file_hash(config.perplexity), "limit": config.limit,
               **settings}
        out.append(("perplexity", Path(config.perplexity).stem, _cached(use, fp, key, lambda: perplexity(
            model, tokenizer, config.perplexity, batch_size=bs, dtype=dt, limit=config.limit))))
    return out


def evaluate(config: EvalConfig) -> dict:
    """Score the base and every model, print the comparison table, write `out/eval.json` and
    `out/eval.md`; returns the eval.json content."""
    specs = list(dict.fromkeys([config.base, *config.model]))
    base_tokenizer = load_tokenizer(config.base)
    tokenizers = {config.base: base_tokenizer}
    for spec in specs[1:]:  # fail fast, before any scoring
        tokenizers[spec] = load_tokenizer(spec)
        check_vocab(spec, tokenizers[spec], config.base, base_tokenizer)
    fps = {spec: fingerprint(spec) for spec in specs}
    results = {}
    for spec in specs:
        print(f"cftune eval: {spec}")
        results[spec] = _evaluate_model(config, spec, fps[spec], tokenizers[spec],
                                        fps[config.base], base_tokenizer)
    entries = build_entries(results, config.base)
    models = [{"spec": s, "fingerprint": fps[s], "role": "base" if s == config.base else "model"}
              for s in specs]
    raw = {s: [{"kind": k, "name": n, **r} for k, n, r in rs] for s, rs in results.items()}
    text = write(Path(config.out), entries, models, config.base, to_dict(config), raw)
    print(text)
    print(f"cftune eval: wrote {Path(config.out) / 'eval.json'} and {Path(config.out) / 'eval.md'}")
    return json.loads((Path(config.out) / "eval.json").read_text())
