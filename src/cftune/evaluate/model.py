"""One model's evaluation: the one function `cftune eval` and the experiment runner both call.

`Measure` (`cftune.evaluate.measure`) says what to score and how; `evaluate_model` loads the
model once and returns every metric under the report's names (`cftune.results.metrics`:
`task_acc`, `task_nll`, `kl`, `kl_per_token`, `bench/<name>`, `bench_avg`, `instr_kl`,
`instr_ref_nll`, `perplexity/<name>`), each as {value, stderr, ci95, n}, with the per-item
outcomes paired comparisons read. Each metric's raw result is cached by the model's content
fingerprint, the content of what was scored and the settings that change the numbers, so a
model scored once (the base above all) is not scored again.

One precision rule: every log-likelihood metric in `score_dtype` (fp32 by default), and only
greedy decoding in `decode_dtype`, last, so a bf16 near-tie never flips a scored item.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cftune.evaluate.benchmarks as benchmarks
from cftune import precision
from cftune.errors import CftuneError
from cftune.evaluate.instructions import (
    PROMPTS_FILE,
    RESPONSES,
    instruction_kl,
    instruction_spec,
    reference_nll,
)
from cftune.evaluate.kl import base_reference, kl_to_base, needs_reference
from cftune.evaluate.measure import VERSION, Measure
from cftune.evaluate.multiple_choice import run_benchmark
from cftune.evaluate.perplexity import perplexity
from cftune.evaluate.task_accuracy import answer_nll, decoder, task_accuracy
from cftune.generate.samples import samples_file
from cftune.io import read_manifest
from cftune.models import cache_dir, load_model, load_tokenizer, resolve_device, weight_dtype
from cftune.provenance import package_versions

# The normal quantile of the report's 95% intervals, as every committed evaluation used it.
Z = 1.96
def evaluate_model(spec: str | Path, m: Measure, base_fp: str, fp: str | None = None,
                   base_tokenizer: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Every metric `m` asks for on model `spec`: {"model", "metrics", "items", "raw",
    "seconds", "versions"}. `base_fp` identifies the base the KLs are against; `fp` the model's
    content (the cache key; None: no cache); `base_tokenizer` the base's (default: the
    model's, whose vocabulary must then be the base's). Where a KL needs the base re-scored in
    `score_dtype` (`kl.needs_reference`), that is done once per base and cached (`_reference`)."""
    started = time.perf_counter()
    tokenizer = tokenizer or load_tokenizer(spec)  # the caller's, where it checked the vocabulary
    base_tokenizer = base_tokenizer or tokenizer
    model = load_model(spec, m.device, m.score_dtype, inference=True)
    device = next(model.parameters()).device
    scoring = {"dtype": m.score_dtype, "device": device.type}
    bs, dt = m.batch_size, m.score_dtype

    def cached(key: dict[str, Any], compute: Callable[[], dict]) -> dict:
        return cached_result(m.cache and fp is not None, fp or "", {**key, **scoring}, compute)

    raw: list[tuple[str, str, dict]] = []  # (kind, name, result), in the report's order
    if m.task is not None:
        key = {"kind": "task_nll", "data": file_hash(m.task), "limit": m.task_limit,
               "prompt": dataclasses.asdict(m.prompt)}
        raw.append(("task_nll", m.task.stem, cached(key, lambda: answer_nll(
            model, tokenizer, m.task, m.task_limit, m.prompt, bs, dt))))
    if m.kl_samples is not None:
        reference = _reference(m, m.kl_samples, base_fp, m.kl_limit)
        key = {"kind": "kl", "samples": file_hash(samples_file(m.kl_samples)),
               "limit": m.kl_limit, "force": m.force_kl, "reference": reference is not None}
        raw.append(("kl", "kl", cached(key, lambda: kl_to_base(
            model, m.kl_samples, bs, dt, m.force_kl, m.kl_limit, base_fp, base_tokenizer,
            reference))))
    for entry in m.bench:
        bench, path = benchmarks.resolve(entry, m.data_dir)
        key = {"kind": "bench", "data": benchmarks.content_hash(path, bench),
               "limit": m.bench_limit, "seed": m.bench_seed, "offset": m.bench_offset}
        raw.append(("bench", bench.name, cached(key, lambda entry=entry: run_benchmark(
            model, tokenizer, entry, m.bench_limit, bs, dt, m.data_dir, m.bench_seed,
            m.bench_offset))))
    if m.instructions is not None:
        key = {"kind": "instr_kl", "samples": file_hash(samples_file(m.instructions / RESPONSES))}
        raw.append(("instr_kl", "instr_kl", cached(key, lambda: instruction_kl(
            model, m.instructions, bs, dt, base_fp, base_tokenizer,
            _reference(m, m.instructions / RESPONSES, base_fp)))))
        posed = instruction_spec(base_tokenizer, m.doc_start)
        key = {"kind": "instr_ref_nll", "data": file_hash(m.instructions / PROMPTS_FILE),
               "prompt": dataclasses.asdict(posed)}
        raw.append(("instr_ref_nll", "instr_ref_nll", cached(key, lambda: reference_nll(
            model, tokenizer, m.instructions / PROMPTS_FILE, posed, bs, dt))))
    if m.perplexity is not None:
        key = {"kind": "perplexity", "data": file_hash(m.perplexity), "limit": m.perplexity_limit}
        raw.append(("perplexity", m.perplexity.stem, cached(key, lambda: perplexity(
            model, tokenizer, m.perplexity, batch_size=bs, dtype=dt, limit=m.perplexity_limit))))
    if m.task is not None and m.task_acc:
        raw.insert(0, ("task", m.task.stem, _task_accuracy(model, tokenizer, spec, m, fp)))
    metrics, items = report_metrics(raw)
    return {"model": str(spec), "metrics": metrics, "items": items,
            "raw": [{"kind": k, "name": n, **{key: v for key, v in r.items() if key not in PER_ITEM}}
                    for k, n, r in raw],
            "seconds": round(time.perf_counter() - started, 3), "versions": package_versions()}


def _task_accuracy(model: Any, tokenizer: Any, spec: str | Path, m: Measure, fp: str | None
                   ) -> dict:
    """Greedy exact-match accuracy, decoded last in `decode_dtype` (by vLLM where it pays)."""
    device = next(model.parameters()).device
    decode_dtype = precision.resolve(m.decode_dtype, device)[0]
    key = {"kind": "task", "data": file_hash(m.task), "limit": m.task_limit,
           "fewshot": [m.num_fewshot, m.fewshot_file and file_hash(m.fewshot_file)],
           "max_new_tokens": m.max_new_tokens, "prompt": dataclasses.asdict(m.prompt),
           "dtype": decode_dtype, "device": device.type}
    engine, decode_fn = decoder(m.decode_engine, model, str(spec), tokenizer, m.max_new_tokens,
                                decode_dtype)
    if engine != "torch":  # in the key only when not torch: earlier results keep theirs
        key["engine"] = engine

    def decode() -> dict:
        if decode_fn is None:
            model.to(weight_dtype(decode_dtype, device, inference=True))
        return task_accuracy(model, tokenizer, m.task, m.task_limit, m.max_new_tokens,
                             m.num_fewshot, m.fewshot_file, m.prompt, m.batch_size,
                             decode_dtype, decode=decode_fn)
    return cached_result(m.cache and fp is not None, fp or "", key, decode)


# --------------------------------------------------------------------------- the report's names
PER_ITEM = ("items", "per_sample", "per_problem", "correct", "per_prompt", "indices")


def report_metrics(raw: list[tuple[str, str, dict]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, items) under the report's names from the raw results: each metric as {value,
    stderr, ci95, n}; items the per-item outcomes `cftune.results.compare` pairs."""
    metrics: dict[str, Any] = {}
    items: dict[str, Any] = {}
    primaries = []
    for kind, name, r in raw:
        if kind == "task":
            metrics["task_acc"] = _metric(r, "acc")
            items["task_acc"] = r["correct"]
        elif kind == "task_nll":
            metrics["task_nll"] = _metric(r, "value")
            items["task_nll"] = r["per_problem"]
        elif kind == "kl":
            metrics["kl"] = {**_metric(r, "value"), "samples_digest": r.get("samples_digest")}
            metrics["kl_per_token"] = _metric(r, "per_token")
            items["kl"] = r["per_sample"]
        elif kind == "bench":
            key = f"bench/{name}"
            metrics[key] = {**_metric(r, r["primary"]), "metric": r["primary"]}
            items[key] = {"primary": r["primary"], "records": r["items"]}
            primaries.append(metrics[key])
        elif kind == "instr_kl":
            metrics["instr_kl"] = {**_metric(r, "value"), "seconds": r.get("seconds"),
                                   "samples_digest": r.get("samples_digest")}
            items["instr_kl"] = r["per_prompt"]
        elif kind == "instr_ref_nll":
            metrics["instr_ref_nll"] = {**_metric(r, "value"), "seconds": r.get("seconds")}
            items["instr_ref_nll"] = r["per_prompt"]
        elif kind == "perplexity":
            metrics[f"perplexity/{name}"] = _metric(r, "perplexity")
            metrics[f"bits_per_byte/{name}"] = _metric(r, "bits_per_byte")
    if primaries:  # right after the last benchmark, as the report's columns run
        se = math.sqrt(sum((p["stderr"] or 0) ** 2 for p in primaries)) / len(primaries)
        mean = sum(p["value"] for p in primaries) / len(primaries)
        names = list(metrics)
        at = max(i for i, k in enumerate(names) if k.startswith("bench/")) + 1
        avg = {"value": mean, "stderr": se, "ci95": [mean - Z * se, mean + Z * se],
               "n": sum(p["n"] for p in primaries)}
        metrics = {k: metrics[k] for k in names[:at]} | {"bench_avg": avg} | {
            k: metrics[k] for k in names[at:]}
    return metrics, items


def _metric(result: dict[str, Any], key: str) -> dict[str, Any]:
    """Normalise a raw result's `key` (with `key_stderr` / `key_ci95` beside it, or the plain
    `stderr` / `ci95` for `value`, or a nested dict) to the report's {value, stderr, ci95, n}."""
    if isinstance(result.get(key), dict):
        result, key = result[key], "value"
    value = result.get(key)
    se = result.get(f"{key}_stderr", result.get("stderr"))
    ci = result.get(f"{key}_ci95", result.get("ci95"))
    if ci is None and se is not None and value is not None:
        ci = [value - Z * se, value + Z * se]
    return {"value": value, "stderr": se, "ci95": ci, "n": result.get("n")}


# --------------------------------------------------------------------------- the result cache
def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]


def _reference(m: Measure, samples: Path, base_fp: str, limit: int | None = None
               ) -> list[float] | None:
    """`kl.base_reference` for a KL's samples in `m.score_dtype`, cached per base (every model of
    an evaluation or an experiment reuses it); None where the stored fp32 `logp_base` serves.
    Its key, unlike the others, holds the batch size and device: in bf16 or fp16 they change the
    rounding, and the reference must round as the model's own scoring does, so that KL(base ‖
    base) is 0 (issue 32, item 5). The base is the model the samples' manifest names (the one
    `logp_base` is of; `kl.check_manifest` holds it to `base_fp`)."""
    if not needs_reference(samples, m.score_dtype):
        return None
    base = read_manifest(samples).get("model")
    if not base:
        raise CftuneError(f"{Path(samples) / 'manifest.json'}: names no `model` to re-score "
                          f"`logp_base` with, which the KL in {m.score_dtype} needs; score in "
                          "fp32 or draw the samples again with `cftune generate`")
    device = resolve_device(m.device).type
    key = {"kind": "kl_reference", "samples": file_hash(samples_file(samples)), "limit": limit,
           "dtype": m.score_dtype, "batch_size": m.batch_size, "device": device}
    return cached_result(m.cache, base_fp, key, lambda: {"logps": base_reference(
        base, samples, m.score_dtype, limit, m.batch_size, device)})["logps"]


def cached_result(use: bool, model_fp: str, key: dict, compute: Callable[[], dict]) -> dict:
    """`compute()`, or its earlier result for the same model content, data content and settings."""
    if not use or model_fp.startswith("hub:"):  # a hub id names no fixed weights
        return compute()
    digest = hashlib.sha256(json.dumps([VERSION, model_fp, key], sort_keys=True).encode())
    path = cache_dir() / "eval" / f"{digest.hexdigest()[:32]}.json"
    if path.is_file():
        return json.loads(path.read_text())["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": model_fp, "key": key, "result": result}))
    tmp.replace(path)
    return result
