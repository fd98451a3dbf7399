"""One prompt everywhere (issue 9, item 2): training, greedy task accuracy, the reference
solutions' NLL, few-shot evaluation and the contextual baseline's generation pose a task question
with the same token ids, for a chat tokenizer and a plain (GPT-2-like) one."""

from __future__ import annotations

import json

import pytest
import torch

from cftune.evaluate.task_accuracy import answer_nll, encode_prompt, task_accuracy
from cftune.generate.config import GenerateConfig
from cftune.generate.samples import iter_samples
from cftune.generate.stage import generate
from cftune.models import load_model, load_tokenizer
from cftune.prompts import PromptSpec
from cftune.train import data

ROWS = [{"question": f"What is {i} plus {i + 2}?", "answer": f"{i}+{i + 2}={2 * i + 2}\n#### {2 * i + 2}"}
        for i in range(3)]
CASES = [("tiny_model", "chat"), ("tiny_model", "qa"), ("tiny_model_no_bos", "qa"),
         ("tiny_model_no_bos", "plain")]


@pytest.fixture(params=CASES, ids=[f"{m}-{f}" for m, f in CASES])
def case(request, tmp_path):
    model_name, fmt = request.param
    folder = request.getfixturevalue(model_name)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return folder, fmt, task


def training_split(tok, row: dict, fmt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a row as `cftune train` tokenises it."""
    task_format = data.TaskFormat(prompt_field="question", response_field="answer",
                                  prompt_format=fmt, prompt_template="Q: {prompt}\nA:")
    ids, labels = data.task_example(row, tok, task_format, "row")
    first = next(i for i, t in enumerate(labels) if t != -100)
    return ids[:first], ids[first:]


def spec(fmt: str) -> PromptSpec:
    return PromptSpec(fmt, "Q: {prompt}\nA:")


def test_training_and_evaluation_pose_the_same_prompt(case):
    folder, fmt, _ = case
    tok = load_tokenizer(folder)
    for row in ROWS:
        prompt, _ = training_split(tok, row, fmt)
        assert encode_prompt(tok, row["question"], spec(fmt)) == prompt
        if fmt != "chat":  # a plain document starts at the pretraining start token, never at BOS
            assert prompt[0] == tok.convert_tokens_to_ids("<|endoftext|>")


def test_answer_nll_is_the_training_loss_of_the_example(case):
    """The reference solutions' NLL scores exactly the tokens training supervises."""
    folder, fmt, task = case
    tok, model = load_tokenizer(folder), load_model(folder, "cpu")
    per_problem = []
    for row in ROWS:
        prompt, response = training_split(tok, row, fmt)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        per_problem.append(-float(logp.gather(-1, torch.tensor(response)[:, None]).mean()))
    out = answer_nll(model, tok, task, prompt=spec(fmt), batch_size=2)
    assert out["value"] == pytest.approx(sum(per_problem) / len(ROWS), rel=1e-5)


def test_greedy_answers_follow_the_training_prompt(case):
    folder, fmt, task = case
    tok, model = load_tokenizer(folder), load_model(folder, "cpu")
    out = task_accuracy(model, tok, task, max_new_tokens=5, prompt=spec(fmt), batch_size=3)
    for row, example in zip(ROWS, out["examples"]):
        ids, new = training_split(tok, row, fmt)[0], []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert example["output"] == tok.decode(new, skip_special_tokens=True)


def test_few_shot_prompt_ends_with_the_zero_shot_question(case):
    folder, fmt, _ = case
    tok = load_tokenizer(folder)
    zero = encode_prompt(tok, ROWS[0]["question"], spec(fmt))
    few = encode_prompt(tok, ROWS[0]["question"], spec(fmt), ROWS[1:])
    if fmt == "chat":
        assert tok.decode(few).endswith(tok.decode(zero))
        assert "assistant\n" + ROWS[1]["answer"] in tok.decode(few)
    else:
        start = zero[:1]
        assert few[:1] == start and few.count(start[0]) == 1  # one document, one start token
        assert tok.decode(few[1:]).endswith("\n\n" + tok.decode(zero[1:]))


def test_contextual_generation_answers_the_training_prompt(case, tmp_path):
    folder, fmt, task = case
    tok = load_tokenizer(folder)
    out = generate(GenerateConfig(model=str(folder), out=str(tmp_path / "ctx"), task_prompts=str(task),
                                  prompt_format=fmt, prompt_template="Q: {prompt}\nA:",
                                  num_samples=3, max_new_tokens=4, device="cpu"))
    records = sorted(iter_samples(out), key=lambda r: r["id"])
    for row, record in zip(ROWS, records):
        assert record["prompt_ids"] == training_split(tok, row, fmt)[0]
