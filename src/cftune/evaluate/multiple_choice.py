"""Multiple-choice scoring by log-likelihood, the way lm-evaluation-harness does it, but faster.

lm-eval runs one forward pass per (context, choice) pair. Here an item's choices share their
context: `cftune.scoring.score_continuations` packs the context once with every choice after it
in one row (a mask lets each choice see the context and itself only), so ARC's 4 choices cost
one context instead of four. The numbers are those of one row per pair up to float rounding
(tested to 1e-4 nats).

Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the
continuation, the pair is encoded whole and the continuation is what follows the encoded context.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cftune.errors import CftuneError
from cftune.evaluate.benchmarks import REGISTRY, Benchmark, Item, load
from cftune.scoring import Scored, score_continuations


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HF backend builds them (tokenizer defaults
    for special tokens; an empty context becomes the BOS, else EOS, token)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation).input_ids
    ctx = tokenizer(context).input_ids
    cont = whole[len(ctx):]
    if not cont:
        raise CftuneError(f"continuation {continuation!r} encodes to no tokens after {context[-40:]!r}")
    return ctx, cont


def binomial_stderr(p: float, n: int) -> float:
    """sqrt(p(1-p)/(n-1)): lm-eval's `mean_stderr` of 0/1 outcomes."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def score_items(model, tokenizer, items: list[Item], batch_size: int = 16, dtype: str = "fp32",
                desc: str | None = None) -> list[list[Scored]]:
    """Per item, the `Scored` of each choice's continuation."""
    requests, owner = [], []
    for n, item in enumerate(items):
        for ctx, cont in zip(item.contexts, item.continuations):
            requests.append(encode_pair(tokenizer, ctx, cont))
            owner.append(n)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = score_continuations(model, requests, batch_size, dtype, pad_id=pad_id, desc=desc)
    per_item: list[list[Scored]] = [[] for _ in items]
    for n, s in zip(owner, scored):
        per_item[n].append(s)
    return per_item


def _argmax(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)  # first maximum, as np.argmax


def choice_lengths(item: Item) -> list[int]:
    """What acc_norm divides each choice's log-likelihood by: its UTF-8 byte length (lm-eval
    divides by characters, the same for ASCII)."""
    return [max(1, len(c.encode("utf-8"))) for c in item.choices]


def mc_metrics(items: list[Item], scored: list[list[Scored]], partial: bool = False) -> dict:
    """acc (argmax of summed log-prob), acc_norm (divided by the choice's UTF-8 byte length; lm-eval
    divides by characters, the same for ASCII), each with its binomial standard error."""
    n = len(items)
    correct, correct_norm = 0, 0
    for item, s in zip(items, scored):
        lls = [x.logprob for x in s]
        correct += int(_argmax(lls) == item.gold)
        correct_norm += int(_argmax([ll / k for ll, k in zip(lls, choice_lengths(item))]) == item.gold)
    acc = correct / n
    out = {"acc": acc, "acc_stderr": binomial_stderr(acc, n), "n": n}
    if not partial:  # with partial scoring every choice scores the same continuation
        acc_norm = correct_norm / n
        out.update(acc_norm=acc_norm, acc_norm_stderr=binomial_stderr(acc_norm, n))
    return out


def mc_records(items: list[Item], scored: list[list[Scored]], indices: list[int],
               primary: str = "acc", partial: bool = False) -> list[dict]:
    """Per-item results, for paired comparisons between models (cftune.evaluate.paired):
    `index` (the item's record number in the file), `logliks` (summed log-likelihood per choice),
    `lengths` (acc_norm's divisors; absent with partial scoring), `pred` (the chosen index under
    the primary metric), `gold`, `correct`."""
    records = []
    for index, item, s in zip(indices, items, scored):
        lls = [x.logprob for x in s]
        rec: dict = {"index": index, "logliks": lls}
        if partial:
            pred = _argmax(lls)
        else:
            rec["lengths"] = choice_lengths(item)
            normed = [ll / k for ll, k in zip(lls, rec["lengths"])]
            pred = _argmax(normed if primary == "acc_norm" else lls)
        rec.update(pred=pred, gold=item.gold, correct=pred == item.gold)
        records.append(rec)
    return records


def last_word_metrics(scored: list[list[Scored]]) -> dict:
    """LAMBADA: accuracy = greedy decoding reproduces the last word; perplexity = exp of minus the
    mean per-item log-likelihood (lm-eval's `perplexity` aggregation); `loglik`: that mean (the
    answer's log-likelihood, nats per item) with its standard error."""
    n = len(scored)
    acc = sum(s[0].is_greedy for s in scored) / n
    lls = [s[0].logprob for s in scored]
    mean_ll = sum(lls) / n
    ll_se = math.sqrt(sum((x - mean_ll) ** 2 for x in lls) / (n - 1) / n) if n > 1 else float("nan")
    return {"acc": acc, "acc_stderr": binomial_stderr(acc, n), "perplexity": math.exp(-mean_ll),
            "loglik": mean_ll, "loglik_stderr": ll_se, "n": n}


def last_word_records(scored: list[list[Scored]], indices: list[int]) -> list[dict]:
    """Per-item results of last-word scoring: one choice (the word), `logliks` = [its summed
    log-likelihood], `n_tokens`, `correct` = greedy decoding reproduces it; `pred` is 0 when it
    does and None otherwise (the greedy continuation is not among the scored choices)."""
    return [{"index": index, "logliks": [s[0].logprob], "n_tokens": len(s[0].token_logprobs),
             "pred": 0 if s[0].is_greedy else None, "gold": 0, "correct": bool(s[0].is_greedy)}
            for index, s in zip(indices, scored)]


def primary_value(result: dict) -> float:
    """The value of a `run_benchmark` result under its primary metric (result["primary"]: acc or
    acc_norm, as lm-eval reports the task). Results from before `primary` existed fall back to
    the registry's choice for their benchmark, else acc."""
    primary = result.get("primary") or getattr(REGISTRY.get(result.get("benchmark", "")), "primary", "acc")
    return result[primary]


def describe_subset(n: int, n_total: int, seed: int, offset: int) -> str:
    """What a subset is, in words: "all", "first 200", "items [500, 1000)", "200 drawn with seed 3"."""
    if n == n_total:
        return "all"
    if seed:
        return f"{n} drawn with seed {seed}" + (f" from item {offset} on" if offset else "")
    return f"items [{offset}, {offset + n})" if offset else f"first {n}"


def run_benchmark(model, tokenizer, name_or_path: str | dict | Benchmark, limit: int | None = None,
                  batch_size: int = 16, dtype: str = "fp32", data_dir: str | Path | None = None,
                  seed: int = 0, offset: int = 0) -> dict:
    """Score one benchmark (registry name, JSONL path, NAME=PATH or a `Benchmark`): acc,
    acc_stderr, acc_norm (multiple choice) or perplexity and loglik (last word), n, items/s, what
    was scored (file, shape, subset), `primary` (the metric to report: acc or acc_norm) and
    `items`, the per-item records (`mc_records`, `last_word_records`) paired comparisons need."""
    loaded = load(name_or_path, limit, data_dir, seed, offset)
    bench = loaded.bench
    start = time.perf_counter()
    scored = score_items(model, tokenizer, loaded.items, batch_size, dtype, desc=bench.name)
    seconds = time.perf_counter() - start
    if bench.metric == "last_word":
        out = last_word_metrics(scored)
        records = last_word_records(scored, loaded.indices)
    else:
        out = mc_metrics(loaded.items, scored, partial=bench.partial)
        records = mc_records(loaded.items, scored, loaded.indices, bench.primary, bench.partial)
    out.update(benchmark=bench.name, primary=bench.primary, shape=loaded.shape,
               file=str(loaded.path), n_total=loaded.n_total,
               subset=describe_subset(len(loaded.items), loaded.n_total, seed, offset),
               seconds=seconds, items_per_s=len(loaded.items) / max(seconds, 1e-9), items=records)
    print(f"cftune eval: {bench.name}: {len(loaded.items)} items in {seconds:.1f} s "
          f"({out['items_per_s']:.2f} items/s), {bench.primary} {out[bench.primary]:.4f}")
    return out
