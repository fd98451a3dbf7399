"""The built-in arithmetic task: seeded, disjoint splits, correct worked solutions, GSM8K format."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from cftune.errors import CftuneError
from cftune.tasks import arithmetic, export_task, is_builtin, resolve_task

SPEC = "builtin:arithmetic"
EQUATION = re.compile(r"(\d+)([-+*/])(\d+)=\$?(\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: a / b}


def final_answer(answer: str) -> str:
    """GSM8K's convention: the text after the last `#### `."""
    return answer.rsplit("#### ", 1)[1].strip()


def test_same_seed_same_rows_other_seed_other_rows():
    a = resolve_task(SPEC, "train", 50, seed=3)
    assert a == resolve_task(SPEC, "train", 50, seed=3)
    assert a != resolve_task(SPEC, "train", 50, seed=4)
    assert resolve_task(SPEC, "train", 20, seed=3) == a[:20]  # one stream: smaller = prefix


def test_splits_are_disjoint_whatever_the_seeds():
    train = arithmetic.problems("train", 3000, seed=0)
    test = arithmetic.problems("test", 400, seed=0) + arithmetic.problems("test", 400, seed=1)
    assert not {(p.template, p.numbers) for p in train} & {(p.template, p.numbers) for p in test}
    assert not {p.question for p in train} & {p.question for p in test}
    assert all(arithmetic.split_of(p) == "train" for p in train)
    # about TEST_PERCENT of fresh draws are test problems: the hash split is not degenerate
    import random

    rng = random.Random(0)
    draws = [rng.choice(arithmetic.TEMPLATES)(rng) for _ in range(2000)]
    share = sum(arithmetic.split_of(p) == "test" for p in draws) / len(draws)
    assert abs(share - arithmetic.TEST_PERCENT / 100) < 0.05


def test_no_duplicates_within_a_split_and_every_template_used():
    problems = arithmetic.problems("test", 300, seed=0)
    assert len({(p.template, p.numbers) for p in problems}) == 300
    assert set(Counter(p.template for p in problems)) == {t(arithmetic.random.Random(0)).template
                                                          for t in arithmetic.TEMPLATES}


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_worked_solution_is_correct(split):
    for row in resolve_task(SPEC, split, 500, seed=7):
        q_numbers = {int(x) for x in re.findall(r"\d+", row["question"])}
        lines = row["answer"].split("\n")
        known, result = q_numbers | {2}, None  # 2: "half of them"
        for line in lines[:-1]:
            (a, op, b, c), = EQUATION.findall(line)  # exactly one equation per step
            a, b, c = int(a), int(b), int(c)
            assert OPS[op](a, b) == c, line
            assert a in known and b in known, (line, row["question"])  # grounded in the question
            known.add(c)
            result = c
        assert 2 <= len(lines) - 1 <= 3
        assert int(final_answer(row["answer"])) == result >= 0


def test_gsm8k_format():
    rows = resolve_task(SPEC, "test", 200, seed=0)
    for row in rows:
        assert set(row) == {"question", "answer"}
        assert row["question"].endswith("?")
        assert row["answer"].count("####") == 1
        assert re.fullmatch(r"#### \d+", row["answer"].split("\n")[-1])
        assert "<<" not in row["answer"]
        assert not re.search(r"\b1 (?:" + "|".join(arithmetic.ITEMS) + r")\b", row["question"]
                             + row["answer"]), row  # no "1 apples"
    # short enough for fast CPU training and eval (~4 characters per token), small numbers
    assert max(len(r["answer"]) for r in rows) < 160
    assert max(int(x) for r in rows for x in re.findall(r"\d+", r["question"] + r["answer"])) <= 60


def test_export_round_trips_and_the_eval_stage_reads_it(tmp_path):
    from cftune.evaluate.task_accuracy import extract_answer, read_task

    path = export_task(SPEC, tmp_path / "sub" / "test.jsonl", "test", 25, seed=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == resolve_task(SPEC, "test", 25, seed=2) == read_task(path)
    assert [extract_answer(r["answer"]) for r in rows] == [final_answer(r["answer"]) for r in rows]


def test_bad_specs_are_one_line_errors():
    assert is_builtin(SPEC) and not is_builtin("data/train.jsonl")
    with pytest.raises(CftuneError, match="builtin:arithmetic"):
        resolve_task("builtin:algebra", "train", 5)
    with pytest.raises(CftuneError, match="not a built-in"):
        resolve_task("data/train.jsonl", "train", 5)
    with pytest.raises(CftuneError, match="split 'dev'"):
        resolve_task(SPEC, "dev", 5)
    with pytest.raises(CftuneError, match="ask for fewer"):
        resolve_task(SPEC, "test", 10**6)


@pytest.mark.integration
def test_base_model_scores_low(embedded_model, tmp_path):
    """The demo needs headroom: the base model rarely solves these problems (greedy, 0-shot),
    scored by the eval stage's own metric."""
    import cftune.evaluate.task_accuracy as task_accuracy
    from cftune.models import load_model, load_tokenizer

    path = export_task(SPEC, tmp_path / "test.jsonl", "test", 30, seed=0)
    result = task_accuracy(load_model(embedded_model, device="cpu"),
                           load_tokenizer(embedded_model), path, max_new_tokens=96,
                           batch_size=10)
    assert result["n"] == 30 and result["acc"] <= 0.25
