"""Multiple-choice scoring by log-likelihood, the way lm-evaluation-harness does it, but faster.

lm-eval runs one forward pass per (context, choice) pair. Here each distinct context is run once
(left-padded, batched, longest first) and its key/value cache is copied to the rows of its
choices, which then run only their own tokens: ARC's 4 choices cost one context pass instead of
four, and BoolQ's one-token "no"/"yes" need no second pass at all. The numbers are those of
`cftune.scoring.score_continuations` up to float rounding (tested).

Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the
continuation, the pair is encoded whole and the continuation is what follows the encoded context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from cftune.errors import CftuneError
from cftune.evaluate.benchmarks import REGISTRY, Benchmark, Item, load
from cftune.models import autocast
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


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _choices_pass(model, cache, ctx_mask, rows, device, dtype, pad_id) -> torch.Tensor:
    """Logits of every continuation's own tokens (all but the last), each row reading its
    context's keys/values from a copy of the context pass's cache."""
    width = max(len(cont) for _, cont in rows) - 1
    sel = torch.tensor([g for g, _ in rows])
    cache.batch_select_indices(sel.to(device))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (_, cont) in enumerate(rows):
        ids[r, : len(cont) - 1] = torch.tensor(cont[:-1])
        mask[r, : len(cont) - 1] = 1
    positions = ctx_mask.sum(-1)[sel][:, None] + torch.arange(width)[None, :]
    with autocast(device, dtype):
        return model(input_ids=ids.to(device),
                     attention_mask=torch.cat([ctx_mask[sel], mask], dim=1).to(device),
                     position_ids=positions.to(device), cache=cache).logits


def _score_group_batch(model, groups, device, dtype, pad_id) -> list[list[Scored]]:
    """One context pass + at most one choices pass for a batch of (context, [continuations])."""
    ctx_ids, ctx_mask = _left_pad([ctx for ctx, _ in groups], pad_id)
    pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    with autocast(device, dtype):
        out = model(input_ids=ctx_ids.to(device), attention_mask=ctx_mask.to(device),
                    position_ids=pos.to(device), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].double(), dim=-1)  # predicts continuation token 0
    rows = [(g, cont) for g, (_, conts) in enumerate(groups) for cont in conts]
    multi_token = any(len(cont) > 1 for _, cont in rows)
    if multi_token and not isinstance(out.cache, DynamicCache):  # e.g. recurrent models
        flat = iter(score_continuations(model, [(ctx, c) for ctx, conts in groups for c in conts],
                                        len(rows), dtype, pad_id=pad_id))
        return [[next(flat) for _ in conts] for _, conts in groups]
    later = _choices_pass(model, out.cache, ctx_mask, rows, device, dtype, pad_id) if multi_token else None
    results: list[list[Scored]] = [[] for _ in groups]
    for r, (g, cont) in enumerate(rows):
        logp = first[g][None]
        if len(cont) > 1:
            logp = torch.cat([logp, torch.log_softmax(later[r, : len(cont) - 1].double(), -1)])
        target = torch.tensor(cont, device=logp.device)
        token_lp = logp.gather(-1, target[:, None])[:, 0].cpu()
        results[g].append(Scored(token_lp, bool((logp.argmax(-1) == target).all())))
    return results


@torch.no_grad()
def score_shared(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    dtype: str = "fp32",
    pad_id: int = 0,
    desc: str | None = None,
) -> list[Scored]:
    """`score_continuations` with one forward pass per distinct context.

    `batch_size` counts continuation rows per forward. Contexts are cut from the left to fit the
    model's maximum length. Models whose cache is not a transformers `DynamicCache` fall back to
    one pass per pair (`score_continuations`).
    """
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        assert len(ctx) >= 1 and len(cont) >= 1, "need a non-empty context and continuation"
        keep = max(1, max_len + 1 - len(cont))  # inputs are ctx + cont[:-1]
        groups.setdefault(tuple(ctx[-keep:]), []).append(i)
    keys = sorted(groups, key=lambda k: -(len(k) + max(len(requests[i][1]) for i in groups[k])))
    results: list[Scored | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc or "scoring", unit="choice", disable=desc is None)
    start = 0
    while start < len(keys):
        end, rows = start, 0
        while end < len(keys) and (end == start or rows + len(groups[keys[end]]) <= batch_size):
            rows += len(groups[keys[end]])
            end += 1
        batch = [(list(k), [list(requests[i][1]) for i in groups[k]]) for k in keys[start:end]]
        for k, scored in zip(keys[start:end], _score_group_batch(model, batch, device, dtype, pad_id)):
            for i, s in zip(groups[k], scored):
                results[i] = s
        bar.update(rows)
        start = end
    bar.close()
    return results  # type: ignore[return-value]


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
    scored = score_shared(model, requests, batch_size, dtype, pad_id, desc)
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
