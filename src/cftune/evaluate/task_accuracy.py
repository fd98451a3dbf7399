"""Generative task accuracy (batched greedy decoding, GSM8K answer extraction, exact match) and
the reference solutions' NLL.

Prompts follow lm-eval's gsm8k task ("Question: {question}\\nAnswer:", few-shot examples joined
by a blank line, generation stopped at "Question:"), or the model's chat template with
`prompt="chat"`. The answer is the number after "####", else after "the answer is", else the last
number in the text; numbers are compared after removing commas, "$" and units.

Greedy decoding is a small loop of our own rather than `model.generate`, which would apply the
model's `generation_config` (repetition penalties, sampling defaults) unless every knob is reset.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cftune.errors import CftuneError
from cftune.evaluate.kl import mean_interval
from cftune.evaluate.multiple_choice import binomial_stderr
from cftune.models import autocast
from cftune.samples import iter_jsonl
from cftune.scoring import score_continuations

PROMPTS = ("qa", "chat")
STOP = ("Question:", "</s>", "<|im_end|>")
_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+"


def normalize_number(text: str) -> str | None:
    """'1,000.00' -> '1000', '$-3.50' -> '-3.5', '−5' -> '-5'; None when there is no number."""
    match = re.search(_NUMBER, text.replace("\u2212", "-").replace("$-", "-$"))
    if match is None:
        return None
    raw = re.sub(r"[\s$,]", "", match.group())
    value = float(raw)
    if value == int(value):
        return str(int(value))
    return repr(value)


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a model's (or GSM8K's) solution, normalised."""
    text = text.replace("\u2212", "-")
    marked = re.search(r"####\s*(.*)", text)
    if marked and normalize_number(marked.group(1)) is not None:
        return normalize_number(marked.group(1))
    stated = list(re.finditer(r"answer is[:\s]*(.*)", text, flags=re.IGNORECASE))
    if stated and normalize_number(stated[-1].group(1)) is not None:
        return normalize_number(stated[-1].group(1))
    numbers = re.findall(_NUMBER, text.replace("$-", "-$"))
    return normalize_number(numbers[-1]) if numbers else None


def read_task(path: str | Path) -> list[dict]:
    """GSM8K-format rows `{"question", "answer"}` (answer ends with `#### <number>`)."""
    path = Path(path)
    if not path.is_file():
        raise CftuneError(f"task file {path} not found")
    rows = []
    for n, rec in enumerate(iter_jsonl(path), 1):
        for key in ("question", "answer"):
            if not isinstance(rec.get(key), str):
                raise CftuneError(f"{path} record {n}: missing text field `{key}` (GSM8K format "
                                  "{\"question\", \"answer\": \"… #### 42\"})")
        if extract_answer(rec["answer"]) is None:
            raise CftuneError(f"{path} record {n}: `answer` has no final number (`#### 42`)")
        rows.append(rec)
    if not rows:
        raise CftuneError(f"{path}: empty task file (no records)")
    return rows


def build_prompt(tokenizer, question: str, shots: list[dict], prompt: str) -> str:
    if prompt == "chat":
        messages = []
        for s in shots:
            messages += [{"role": "user", "content": s["question"]},
                         {"role": "assistant", "content": s["answer"]}]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
    return "\n\n".join(parts + [f"Question: {question}\nAnswer:"])


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return ids


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                    batch_size: int = 8, dtype: str = "fp32", stop: tuple[str, ...] = STOP,
                    desc: str | None = None) -> list[str]:
    """Greedy continuations of `prompts` (text cut at the first stop string), batched and
    left-padded, longest prompts first."""
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    texts = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc or "generating", unit="item", disable=desc is None)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        new = [[] for _ in idx]
        done = [False] * len(idx)
        cache, step_ids, pos = None, ids, (mask.cumsum(-1) - 1).clamp(min=0)
        for _ in range(max_new_tokens):
            with autocast(device, dtype):
                out = model(input_ids=step_ids.to(device), attention_mask=mask.to(device),
                            position_ids=pos.to(device), cache=cache, use_cache=True,
                            logits_to_keep=1)
            cache = out.cache
            nxt = out.logits[:, -1].argmax(-1).cpu()
            for r in range(len(idx)):
                if not done[r]:
                    if int(nxt[r]) in eos:
                        done[r] = True
                    else:
                        new[r].append(int(nxt[r]))
                        tail = tokenizer.decode(new[r][-24:])
                        done[r] = any(s in tail for s in stop)
            if all(done):
                break
            step_ids = torch.where(torch.tensor(done), pad, nxt)[:, None]
            mask = torch.cat([mask, torch.ones((len(idx), 1), dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
        for r, i in enumerate(idx):
            text = tokenizer.decode(new[r], skip_special_tokens=True)
            cuts = [text.index(s) for s in stop if s in text]
            texts[i] = text[: min(cuts)] if cuts else text
        bar.update(len(idx))
    bar.close()
    return texts


def prompt_needs_specials(tokenizer, prompt: str) -> bool:
    """Add the tokenizer's special tokens unless a chat template already put the BOS in."""
    bos = tokenizer.bos_token
    return not (bos and prompt.startswith(bos))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt: the same for generation and for scoring solutions."""
    return tokenizer(prompt, add_special_tokens=prompt_needs_specials(tokenizer, prompt)).input_ids


def _rows(task_file: str | Path, limit: int | None, prompt: str) -> list[dict]:
    """The first `limit` rows of a task file, for prompt format `prompt` (checked)."""
    if prompt not in PROMPTS:
        raise CftuneError(f"task prompt '{prompt}' is not one of {', '.join(PROMPTS)}")
    rows = read_task(task_file)
    if limit is not None and limit > len(rows):
        print(f"cftune eval: task: --limit {limit} is more than the {len(rows)} rows of "
              f"{task_file}; using all {len(rows)}")
    return rows[:limit] if limit is not None else rows


def answer_nll(model, tokenizer, task_file: str | Path, limit: int | None = None,
               prompt: str = "qa", batch_size: int = 8, dtype: str = "fp32") -> dict:
    """Teacher-forced NLL of the reference solutions (first `limit` rows), nats per token.

    Why beside accuracy: a small model's exact-match score on a hard task sits near 0 and moves
    in steps of 1/n, while the NLL of the gold solution (prompt in the training format, the
    solution and the end-of-sequence token as targets) moves smoothly with what was learned.
    `value` averages each problem's mean token NLL, so `stderr` is over problems;
    `token_weighted` is the plain loss over all solution tokens.
    """
    rows = _rows(task_file, limit, prompt)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    requests = []
    for r in rows:
        ctx = encode_prompt(tokenizer, build_prompt(tokenizer, r["question"], [], prompt))
        requests.append((ctx, tokenizer(r["answer"], add_special_tokens=False).input_ids + eos))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = score_continuations(model, requests, batch_size, dtype, pad_id=pad,
                                 desc="task (answer NLL)")
    tokens = sum(len(s.token_logprobs) for s in scored)
    return {**mean_interval([-float(s.token_logprobs.mean()) for s in scored]),
            "token_weighted": -sum(s.logprob for s in scored) / tokens, "tokens": tokens}


def task_accuracy(model, tokenizer, task_file: str | Path, limit: int | None = None,
                  max_new_tokens: int = 256, num_fewshot: int = 0,
                  fewshot_file: str | Path | None = None, prompt: str = "qa",
                  batch_size: int = 8, dtype: str = "fp32", seed: int = 1234) -> dict:
    """Exact-match accuracy of greedy answers on a GSM8K-format file (first `limit` rows).

    Few-shot examples are a seeded draw of `num_fewshot` rows of `fewshot_file` (the same for
    every question, as in lm-eval). Returns acc, acc_stderr, n and the first few predictions.
    """
    rows = _rows(task_file, limit, prompt)
    shots: list[dict] = []
    if num_fewshot:
        if fewshot_file is None:
            raise CftuneError("--num-fewshot needs --fewshot-file (e.g. the task's train.jsonl)")
        pool = read_task(fewshot_file)
        shots = random.Random(seed).sample(pool, min(num_fewshot, len(pool)))
    prompts = [build_prompt(tokenizer, r["question"], shots, prompt) for r in rows]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, dtype,
                              desc="task (greedy)")
    golds = [extract_answer(r["answer"]) for r in rows]
    preds = [extract_answer(o) for o in outputs]
    correct = [p is not None and p == g for p, g in zip(preds, golds)]
    acc = sum(correct) / len(rows)
    examples = [{"question": r["question"][:200], "output": o[:400], "pred": p, "gold": g}
                for r, o, p, g in list(zip(rows, outputs, preds, golds))[:3]]
    return {"acc": acc, "acc_stderr": binomial_stderr(acc, len(rows)), "n": len(rows),
            "examples": examples}
