"""Generative task accuracy (batched greedy decoding, GSM8K answer extraction, exact match) and
the reference solutions' NLL.

Prompts come from `cftune.prompts.prompt_ids`, the function training uses: lm-eval's gsm8k task
("Question: {question}\\nAnswer:", few-shot examples joined by a blank line, generation stopped at
"Question:") after the document start token, or the model's chat template with `prompt="chat"`. The answer is
the number after "####", else after "the answer is", else the last number in the text; numbers are compared after removing commas, "$" and units.

Greedy decoding is a small loop of our own rather than `model.generate`, which would apply the
model's `generation_config` (repetition penalties, sampling defaults) unless every knob is reset.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cftune.errors import CftuneError
from cftune.evaluate.kl import mean_interval
from cftune.evaluate.multiple_choice import binomial_stderr
from cftune.io import iter_jsonl
from cftune.models import ENGINES, autocast
from cftune.prompts import FORMATS, PromptSpec, cut_at_stop, prompt_ids, response_ids
from cftune.scoring import score_continuations

PROMPTS = FORMATS
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


def as_spec(prompt: str | PromptSpec) -> PromptSpec:
    """A prompt format name (qa, chat, plain, auto) or a full `PromptSpec`."""
    return prompt if isinstance(prompt, PromptSpec) else PromptSpec(prompt)


def encode_prompt(tokenizer, question: str, prompt: str | PromptSpec = "qa",
                  shots: Sequence[dict] = ()) -> list[int]:
    """Token ids of a task question (after few-shot `shots`), exactly as training poses it."""
    return prompt_ids(tokenizer, question, as_spec(prompt),
                      [(s["question"], s["answer"]) for s in shots])


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return ids


def decoder(engine: str, model, model_spec: str, tokenizer, max_new_tokens: int, dtype: str
            ) -> tuple[str, Callable[[list[list[int]]], list[str]] | None]:
    """(engine, decode) for `task_accuracy`: cftune's torch loop (decode None) or vLLM.

    `auto` picks vLLM where it pays: one CUDA GPU, vLLM installed (`generate.auto_engine`), and
    a whole model (vLLM does not load a LoRA adapter folder by itself). With vLLM the torch model
    leaves the GPU to it; the texts are cut at the same stop strings, so both engines score the
    same answers up to float rounding at near-ties."""
    from cftune.generate.config import auto_engine
    from cftune.models import local_path

    if engine not in ENGINES:
        raise CftuneError(f"decode engine '{engine}' is not one of {', '.join(ENGINES)}")
    device = next(model.parameters()).device
    adapter = (Path(str(model_spec)) / "adapter_config.json").is_file()
    if engine == "auto":
        engine = "vllm" if not adapter and auto_engine(device.type) == "vllm" else "torch"
    if engine == "torch":
        return engine, None
    if adapter:
        raise CftuneError(f"{model_spec} is a LoRA adapter, which vLLM does not decode by itself: "
                          f"merge it first (`cftune merge --finetuned {model_spec} --alpha 1 "
                          f"--out FOLDER`) or decode with the torch engine")
    from cftune.generate.vllm_engine import greedy_texts

    stop_ids = _eos_ids(model, tokenizer)
    model.to("cpu")
    return engine, functools.partial(greedy_texts, local_path(model_spec), tokenizer,
                                     max_new_tokens=max_new_tokens, stop=STOP,
                                     stop_ids=stop_ids, dtype=dtype)


@torch.no_grad()
def greedy_generate(model, tokenizer, encoded: list[list[int]], max_new_tokens: int = 256,
                    batch_size: int = 8, dtype: str = "fp32", stop: tuple[str, ...] = STOP,
                    desc: str | None = None) -> list[str]:
    """Greedy continuations of the prompt ids `encoded` (text cut at the first stop string),
    batched and left-padded, longest prompts first."""
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    texts = [""] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc or "generating", unit="item", disable=desc is None)
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
            texts[i] = cut_at_stop(tokenizer.decode(new[r], skip_special_tokens=True), stop)
        bar.update(len(idx))
    bar.close()
    return texts


def _rows(task_file: str | Path, limit: int | None) -> list[dict]:
    """The first `limit` rows of a task file."""
    rows = read_task(task_file)
    if limit is not None and limit > len(rows):
        print(f"cftune eval: task: --limit {limit} is more than the {len(rows)} rows of "
              f"{task_file}; using all {len(rows)}")
    return rows[:limit] if limit is not None else rows


def answer_nll(model, tokenizer, task_file: str | Path, limit: int | None = None,
               prompt: str | PromptSpec = "qa", batch_size: int = 8, dtype: str = "fp32") -> dict:
    """Teacher-forced NLL of the reference solutions (first `limit` rows), nats per token.

    Why beside accuracy: a small model's exact-match score on a hard task sits near 0 and moves
    in steps of 1/n, while the NLL of the gold solution (prompt in the training format, the
    solution and the end-of-sequence token as targets) moves smoothly with what was learned.
    `value` averages each problem's mean token NLL, so `stderr` is over problems;
    `token_weighted` is the plain loss over all solution tokens.
    """
    rows = _rows(task_file, limit)
    spec = as_spec(prompt)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    requests = [(encode_prompt(tokenizer, r["question"], spec),
                 response_ids(tokenizer, r["answer"], spec) + eos) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = score_continuations(model, requests, batch_size, dtype, pad_id=pad,
                                 desc="task (answer NLL)")
    tokens = sum(len(s.token_logprobs) for s in scored)
    per_problem = [-float(s.token_logprobs.mean()) for s in scored]
    return {**mean_interval(per_problem), "per_problem": per_problem,
            "token_weighted": -sum(s.logprob for s in scored) / tokens, "tokens": tokens}


def task_accuracy(model, tokenizer, task_file: str | Path, limit: int | None = None,
                  max_new_tokens: int = 256, num_fewshot: int = 0,
                  fewshot_file: str | Path | None = None, prompt: str | PromptSpec = "qa",
                  batch_size: int = 8, dtype: str = "fp32", seed: int = 1234,
                  decode: Callable[[list[list[int]]], list[str]] | None = None) -> dict:
    """Exact-match accuracy of greedy answers on a GSM8K-format file (first `limit` rows).

    Few-shot examples are a seeded draw of `num_fewshot` rows of `fewshot_file` (the same for
    every question, as in lm-eval). `decode` turns prompt ids into answer texts (`decoder`:
    vLLM); None decodes with `model`. Returns acc, acc_stderr, n, the first few predictions and
    `correct` (per problem, for paired comparisons).
    """
    rows = _rows(task_file, limit)
    shots: list[dict] = []
    if num_fewshot:
        if fewshot_file is None:
            raise CftuneError("--num-fewshot needs --fewshot-file (e.g. the task's train.jsonl)")
        pool = read_task(fewshot_file)
        shots = random.Random(seed).sample(pool, min(num_fewshot, len(pool)))
    prompts = [encode_prompt(tokenizer, r["question"], prompt, shots) for r in rows]
    outputs = decode(prompts) if decode else greedy_generate(
        model, tokenizer, prompts, max_new_tokens, batch_size, dtype, desc="task (greedy)")
    golds = [extract_answer(r["answer"]) for r in rows]
    preds = [extract_answer(o) for o in outputs]
    correct = [p is not None and p == g for p, g in zip(preds, golds)]
    acc = sum(correct) / len(rows)
    examples = [{"question": r["question"][:200], "output": o[:400], "pred": p, "gold": g}
                for r, o, p, g in list(zip(rows, outputs, preds, golds))[:3]]
    return {"acc": acc, "acc_stderr": binomial_stderr(acc, len(rows)), "n": len(rows),
            "examples": examples, "correct": correct}  # per problem, for paired comparisons
