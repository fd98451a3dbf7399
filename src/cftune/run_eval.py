"""The runner's evaluation stage: every metric of one model, in the report's row format, with
the per-item outcomes that paired comparisons need (`cftune.compare`)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from cftune import precision
from cftune.experiment import Experiment
from cftune.provenance import package_versions


def evaluate_one(exp: Experiment, name: str, model_spec: Path | str, heldout: Path,
                 test_file: Path, base_fp: str,
                 instructions: Path | None = None) -> dict[str, Any]:
    """Every metric of one model, in the report's row-metric format.

    One precision rule (issue 9, item 8): every log-likelihood metric (answer NLL, KL, benchmark
    choices) in `eval.score_dtype` (fp32 by default), and only greedy decoding in
    `eval.decode_dtype`, after the scoring, so a bf16 near-tie never flips a scored item.
    """
    from cftune.evaluate import answer_nll, kl_to_base, run_benchmark, task_accuracy
    from cftune.evaluate.task_accuracy import decoder
    from cftune.models import load_model, load_tokenizer, weight_dtype

    e, spec = exp.eval, exp.task.prompt_spec
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, "auto", e.score_dtype, inference=True)
    metrics: dict[str, Any] = {}
    nll = answer_nll(model, tokenizer, test_file, limit=e.task_limit, prompt=spec,
                     batch_size=e.batch_size, dtype=e.score_dtype)
    metrics["task_nll"] = _metric(nll, "value")
    kl = kl_to_base(model, heldout, batch_size=e.batch_size, dtype=e.score_dtype,
                    limit=exp.cf_heldout, base_fingerprint=base_fp, tokenizer=tokenizer)
    metrics["kl"] = {**_metric(kl, "value"), "samples_digest": kl["samples_digest"]}
    metrics["kl_per_token"] = _metric(kl, "per_token")
    primaries = []
    items: dict[str, Any] = {"kl": kl["per_sample"]}
    for bench in e.bench:
        res = run_benchmark(model, tokenizer, bench, limit=e.limit, batch_size=e.batch_size,
                            dtype=e.score_dtype, data_dir=e.data_dir, offset=e.offset)
        key = f"bench/{res['benchmark']}"
        metrics[key] = {**_metric(res, res["primary"]), "metric": res["primary"]}
        items[key] = {"primary": res["primary"], "records": res["items"]}
        primaries.append(metrics[key])
    if primaries:
        se = math.sqrt(sum((m["stderr"] or 0) ** 2 for m in primaries)) / len(primaries)
        mean = sum(m["value"] for m in primaries) / len(primaries)
        metrics["bench_avg"] = {"value": mean, "stderr": se,
                                "ci95": [mean - 1.96 * se, mean + 1.96 * se],
                                "n": sum(m["n"] for m in primaries)}
    if instructions is not None:
        _instruction_metrics(model, tokenizer, instructions, exp, base_fp, metrics, items)
    items["task_nll"] = nll["per_problem"]
    if e.task_acc:
        device = next(model.parameters()).device
        decode_dtype = precision.resolve(e.decode_dtype, device)[0]
        _, decode = decoder(e.decode_engine, model, str(model_spec), tokenizer,
                            e.max_new_tokens, decode_dtype)
        if decode is None:
            model.to(weight_dtype(decode_dtype, device, inference=True))
        acc = task_accuracy(model, tokenizer, test_file, limit=e.task_limit,
                            max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                            dtype=decode_dtype, prompt=spec, decode=decode)
        metrics = {"task_acc": _metric(acc, "acc"), **metrics}
        items["task_acc"] = acc["correct"]
    return {"model": str(model_spec), "name": name, "metrics": metrics, "items": items,
            "seconds": round(time.perf_counter() - started, 3), "versions": package_versions()}


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
    metrics["instr_kl"] = {**_metric(kl, "value"), "seconds": kl.get("seconds"),
                           "samples_digest": kl["samples_digest"]}
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
