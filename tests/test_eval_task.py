"""Generative task accuracy: answer extraction on tricky strings, batched greedy decoding equal
to one-at-a-time greedy decoding, prompts, and bad task files."""

from __future__ import annotations

import json

import pytest
import torch

from cftune.errors import CftuneError
from cftune.evaluate.task_accuracy import (
    answer_nll,
    encode_prompt,
    extract_answer,
    greedy_generate,
    read_task,
    task_accuracy,
)
from cftune.models import load_model, load_tokenizer


@pytest.mark.parametrize("text,expected", [
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("#### -5", "-5"),
    ("#### \u22127", "-7"),  # unicode minus
    ("She pays $1,234.50 in total.\n#### $1,234.50", "1234.5"),
    ("The answer is 42.", "42"),
    ("So the answer is: $18.", "18"),
    ("The answer is 3.5 hours", "3.5"),
    ("the answer is 12 apples. Then 5 more pears.", "12"),
    ("He earns 12 dollars per hour, so 12 x 5 = 60 dollars", "60"),
    ("It costs 18.00", "18"),
    ("Total: 2,500,000 people", "2500000"),
    ("The loss is -$20.", "-20"),
    ("#### 72\n\nQuestion: next one has 5", "72"),
    ("I do not know.", None),
    ("0.5 of them", "0.5"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(str(tiny_model), device="cpu"), load_tokenizer(str(tiny_model))


@torch.no_grad()
def greedy_one(model, tokenizer, ids: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
    return out


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [tok(p).input_ids for p in
               ["Question: 1+1?\nAnswer:", "Hi", "A much longer prompt than the others, padded left"]]
    texts = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=3, stop=())
    for prompt, text in zip(prompts, texts):
        assert text == tok.decode(greedy_one(model, tok, prompt, 12), skip_special_tokens=True)


def test_few_shot_prompt(tiny):
    """lm-eval's gsm8k few-shot layout, after the document start token (`<|endoftext|>` for a
    tokenizer whose bos is a chat-turn marker)."""
    _, tok = tiny
    shots = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]
    assert tok.decode(encode_prompt(tok, "2+2?", "qa", shots)) == (
        "<|endoftext|>Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: 2+2?\nAnswer:")


def test_task_accuracy_runs_and_counts(tiny, tmp_path):
    model, tok = tiny
    rows = [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
            for i in range(4)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = task_accuracy(model, tok, path, limit=3, max_new_tokens=8, batch_size=2)
    assert out["n"] == 3 and [e["gold"] for e in out["examples"]] == ["0", "2", "4"]
    start = [tok.convert_tokens_to_ids("<|endoftext|>")]
    texts = [greedy_one(model, tok, start + tok(f"Question: {r['question']}\nAnswer:").input_ids, 8)
             for r in rows[:3]]
    preds = [extract_answer(tok.decode(t, skip_special_tokens=True)) for t in texts]
    assert [e["pred"] for e in out["examples"]] == preds
    assert out["acc"] == sum(p == g for p, g in zip(preds, ["0", "2", "4"])) / 3
    few = task_accuracy(model, tok, path, limit=1, max_new_tokens=4, num_fewshot=2, fewshot_file=path)
    assert few["n"] == 1
    with pytest.raises(CftuneError, match="--num-fewshot needs --fewshot-file"):
        task_accuracy(model, tok, path, num_fewshot=2)


def test_answer_nll_equals_one_forward_per_problem(tiny, tmp_path):
    """Batched, padded scoring of the reference solutions equals scoring each prompt + solution +
    EOS with its own forward pass."""
    model, tok = tiny
    rows = [{"question": f"What is {i} times {i + 3}?" + " Think." * i,
             "answer": f"{i}*{i + 3}={i * (i + 3)}\n#### {i * (i + 3)}"} for i in range(5)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = answer_nll(model, tok, path, limit=4, prompt="qa", batch_size=3)
    per_problem, total, tokens = [], 0.0, 0
    for r in rows[:4]:
        ctx = [tok.convert_tokens_to_ids("<|endoftext|>")] + \
            tok(f"Question: {r['question']}\nAnswer:").input_ids
        cont = tok(" " + r["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
        logp = torch.log_softmax(logits[len(ctx) - 1:-1], -1).gather(-1, torch.tensor(cont)[:, None])
        per_problem.append(-float(logp.mean()))
        total, tokens = total - float(logp.sum()), tokens + len(cont)
    assert out["n"] == 4 and out["tokens"] == tokens
    assert out["value"] == pytest.approx(sum(per_problem) / 4, rel=1e-4)
    assert out["token_weighted"] == pytest.approx(total / tokens, rel=1e-4)
    assert out["stderr"] == pytest.approx(torch.tensor(per_problem).std().item() / 2, rel=1e-3)


def test_bad_task_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(CftuneError, match="a.jsonl record 1: missing text field `answer`"):
        read_task(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text(json.dumps({"question": "q", "answer": "no number"}) + "\n")
    with pytest.raises(CftuneError, match="b.jsonl record 1: `answer` has no final number"):
        read_task(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text("")
    with pytest.raises(CftuneError, match="c.jsonl: empty task file"):
        read_task(tmp_path / "c.jsonl")
