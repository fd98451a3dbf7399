"""Bring-your-own benchmarks and per-task primary metrics (issues 9.6 and 10.3): each file shape
is detected, named and loads; malformed rows fail with a one-line error naming file and line; a
file-loaded copy of a built-in task scores identically; per-item records match the aggregates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cftune.errors import CftuneError
from cftune.evaluate.benchmarks import (
    PRIMARY_METRICS,
    REGISTRY,
    Benchmark,
    custom,
    load,
    parse_bench,
    resolve,
)
from cftune.evaluate.multiple_choice import primary_value, run_benchmark
from cftune.models import load_model, load_tokenizer

ARC_ROWS = [
    {"query": f"Question: Which of these is number {i}?",
     "choices": [f"number {i}", f"the letter {chr(97 + i)}", "a colour, probably blue", "none"],
     "gold": i % 4}
    for i in range(24)
]
BOOLQ_ROWS = [
    {"query": f"Passage: The sky has {i} clouds today.\nQuestion: are there {i} clouds?",
     "choices": ["no", "yes"], "gold": i % 2}
    for i in range(6)
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(str(tiny_model), device="cpu"), load_tokenizer(str(tiny_model))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A data folder holding registry-format copies of ARC-Easy and BoolQ (synthetic rows)."""
    write_jsonl(tmp_path / REGISTRY["arc_easy"].file, ARC_ROWS)
    write_jsonl(tmp_path / REGISTRY["boolq"].file, BOOLQ_ROWS)
    return tmp_path


def test_registry_primary_metrics_follow_lm_eval():
    assert {n: b.primary for n, b in REGISTRY.items()} == {
        "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm", "boolq": "acc",
        "lambada": "acc", "pubmedqa": "acc", "medmcqa": "acc", "winogrande": "acc"}
    assert PRIMARY_METRICS["hellaswag"] == PRIMARY_METRICS["openbookqa"] == "acc_norm"
    assert PRIMARY_METRICS["copa"] == "acc"


def test_boolq_is_reported_by_acc(tiny, data_dir):
    """Issue 9 item 6: BoolQ's primary metric is acc, though acc_norm is computed beside it."""
    model, tok = tiny
    res = run_benchmark(model, tok, "boolq", data_dir=data_dir)
    assert res["primary"] == "acc" and "acc_norm" in res
    assert primary_value(res) == res["acc"]
    arc = run_benchmark(model, tok, "arc_easy", data_dir=data_dir)
    assert arc["primary"] == "acc_norm" and primary_value(arc) == arc["acc_norm"]
    assert primary_value({"benchmark": "boolq", "acc": 0.4, "acc_norm": 0.6}) == 0.4  # cached result


def test_per_item_records_match_the_aggregates(tiny, data_dir):
    model, tok = tiny
    res = run_benchmark(model, tok, "arc_easy", limit=10, seed=3, data_dir=data_dir)
    items = res["items"]
    assert [r["index"] for r in items] == sorted(r["index"] for r in items) and len(items) == 10
    assert items[0]["index"] != 0 or items[-1]["index"] != 9  # a seeded draw keeps file ids
    for r in items:
        row = ARC_ROWS[r["index"]]
        assert r["gold"] == row["gold"] and len(r["logliks"]) == 4
        assert r["lengths"] == [len(c.encode()) for c in row["choices"]]
        normed = [ll / k for ll, k in zip(r["logliks"], r["lengths"])]
        assert r["pred"] == normed.index(max(normed)) and r["correct"] == (r["pred"] == r["gold"])
    assert sum(r["correct"] for r in items) / 10 == pytest.approx(res["acc_norm"])
    acc = sum(r["logliks"].index(max(r["logliks"])) == r["gold"] for r in items) / 10
    assert acc == pytest.approx(res["acc"])
    assert res["shape"] == "{query, choices, gold}"
    json.dumps(res)  # stored as JSON in the eval cache


def test_file_loaded_copy_scores_identically(tiny, data_dir, tmp_path):
    """A copy of the built-in ARC-Easy file loaded as NAME=PATH (default template, and the
    registry's template given explicitly) scores exactly as the registry task does."""
    model, tok = tiny
    copy = write_jsonl(tmp_path / "mine" / "arc_copy.jsonl", ARC_ROWS[:20])
    builtin = run_benchmark(model, tok, "arc_easy", limit=20, data_dir=data_dir)
    by_cli = run_benchmark(model, tok, f"arc_copy={copy}")
    by_yaml = run_benchmark(model, tok, parse_bench(
        {"name": "arc_copy", "path": str(copy), "template": REGISTRY["arc_easy"].template,
         "metric": "acc_norm"}))
    assert by_cli["benchmark"] == "arc_copy" and by_cli["primary"] == "acc"  # own files: acc
    assert by_yaml["primary"] == "acc_norm"
    assert by_yaml["items"] == builtin["items"]  # same logliks, predictions, ids
    for other in (by_cli, by_yaml):
        assert [r["logliks"] for r in other["items"]] == [r["logliks"] for r in builtin["items"]]
        assert (other["acc"], other["acc_norm"], other["n"]) == (builtin["acc"], builtin["acc_norm"], 20)
    # named like a built-in task, a file of your own gets lm-eval's metric for it
    assert custom("arc_easy", copy).primary == "acc_norm"


def test_file_loaded_copy_of_shared_arc_easy(tiny, shared_data, tmp_path):
    model, tok = tiny
    rows = (shared_data / REGISTRY["arc_easy"].file).read_text().splitlines()[:20]
    copy = tmp_path / "arc20.jsonl"
    copy.write_text("\n".join(rows) + "\n")
    builtin = run_benchmark(model, tok, "arc_easy", limit=20, data_dir=shared_data)
    mine = run_benchmark(model, tok, {"name": "arc20", "path": str(copy), "metric": "acc_norm",
                                      "template": REGISTRY["arc_easy"].template})
    assert mine["items"] == builtin["items"]
    assert (mine["acc"], mine["acc_norm"]) == (builtin["acc"], builtin["acc_norm"])


def test_each_shape_is_detected_named_and_templated(tmp_path):
    med = write_jsonl(tmp_path / "med.jsonl", [
        {"question": "Which organ pumps blood?", "options": {"A": "heart", "B": "liver"},
         "answer_idx": "A"},
        {"question": "Which is a bone?", "options": {"A": "femur", "B": "aorta"}, "answer_idx": 1},
    ])
    loaded = load(f"med={med}")
    assert loaded.shape == "{question, options, answer_idx}" and loaded.bench.name == "med"
    assert loaded.items[0].contexts[0] == "Question: Which organ pumps blood?\nChoices:\nA. heart\nB. liver\nAnswer:"
    assert loaded.items[0].continuations == [" A", " B"] and loaded.items[1].gold == 1

    last = write_jsonl(tmp_path / "last.jsonl", [{"context": "The cat sat on the", "continuation": " mat"}])
    loaded = load(f"last={last}")
    assert loaded.shape == "{context, continuation}" and loaded.bench.metric == "last_word"
    assert loaded.items[0].contexts == ["The cat sat on the"] and loaded.items[0].continuations == [" mat"]

    part = write_jsonl(tmp_path / "part.jsonl", [
        {"context_options": ["The cup is on the table", "The cup is on the floor"],
         "continuation": "now.", "gold": 1}])
    loaded = load(f"part={part}")
    assert loaded.shape == "{context_options, continuation, gold}" and loaded.bench.partial
    item = loaded.items[0]
    assert item.contexts == ["The cup is on the table", "The cup is on the floor"]
    assert item.continuations == [" now.", " now."] and item.gold == 1
    story = write_jsonl(tmp_path / "story.jsonl", [
        {"context_options": ["the table", "the floor"], "continuation": "now.", "gold": 0,
         "context": "unused", "prefix": "Where is the cup? On"}])
    item = load(parse_bench({"name": "s", "path": str(story), "template": "{prefix} {context}"})).items[0]
    assert item.contexts == ["Where is the cup? On the table", "Where is the cup? On the floor"]

    q = write_jsonl(tmp_path / "q.jsonl", ARC_ROWS[:2])
    loaded = load(parse_bench({"name": "q", "path": str(q), "template": "Q: {question}\nA:"}))
    assert loaded.items[0].contexts[0] == "Q: Which of these is number 0?\nA:"
    assert load(str(q)).items[0].contexts[0] == "Question: Which of these is number 0?\nAnswer:"


def test_partial_and_last_word_files_score(tiny, tmp_path):
    model, tok = tiny
    part = write_jsonl(tmp_path / "part.jsonl", [
        {"context_options": ["The cup is on the table", "The cup is on the floor"],
         "continuation": "now.", "gold": i % 2} for i in range(3)])
    res = run_benchmark(model, tok, f"part={part}")
    assert res["primary"] == "acc" and "acc_norm" not in res
    assert all("lengths" not in r and len(r["logliks"]) == 2 for r in res["items"])
    last = write_jsonl(tmp_path / "last.jsonl", [{"context": "Hello there", "continuation": "friend"}] * 2)
    res = run_benchmark(model, tok, f"last={last}")
    assert [r["index"] for r in res["items"]] == [0, 1] and res["primary"] == "acc"
    assert res["loglik"] == pytest.approx(res["items"][0]["logliks"][0])
    assert res["acc"] == sum(r["correct"] for r in res["items"]) / 2


@pytest.mark.parametrize("rows,message", [
    ([ARC_ROWS[0], {"query": "Question: q", "gold": 0}], r"x.jsonl line 2: missing field `choices`"),
    ([{"query": "Question: q", "choices": ["a", "b"], "gold": 5}], r"x.jsonl line 1: `gold` = 5 is out of range"),
    ([{"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "E"}],
     r"x.jsonl line 1: `answer_idx` = 'E' is not one of A, B"),
    ([{"question": "q", "options": ["a", "b"], "answer_idx": "A"}], r"x.jsonl line 1: field `options`"),
    ([{"context": "c", "continuation": "w"}, {"context": "c", "continuation": "  "}],
     r"x.jsonl line 2: `continuation` is empty"),
    ([{"context": "c", "continuation": "w"}, {"continuation": "w"}], r"x.jsonl line 2: missing field `context`"),
    ([{"context_options": ["a", "b"], "continuation": "c", "gold": 2}],
     r"x.jsonl line 1: `gold` = 2 is out of range for 2 choices"),
    ([{"context_options": "ab", "continuation": "c", "gold": 0}], r"x.jsonl line 1: field `context_options`"),
    ([{"context_options": ["a", "b"], "continuation": "c", "gold": 0}, "not an object"],
     r"x.jsonl line 2: expected a JSON object"),
    ([{"nothing": 1}], r"x.jsonl line 1: cannot tell the benchmark format"),
    # items that cannot tell models apart (issue 32, item 4): one choice is always right, and
    # repeated choices always tie, the first winning
    ([{"context": "c", "choices": ["a", "b"], "gold": 0}, {"context": "c", "choices": ["a"], "gold": 0}],
     r"x.jsonl line 2: `choices` holds one choice, which is always scored right"),
    ([{"query": "Question: q", "choices": ["a", "b", "a"], "gold": 1}],
     r"x.jsonl line 1: `choices` repeats 'a' \(choices 0 and 2\), so they always tie"),
    ([{"question": "q", "options": {"A": "a"}, "answer_idx": "A"}],
     r"x.jsonl line 1: `options` holds one choice"),
    ([{"context_options": ["on the table", "on the table"], "continuation": "c", "gold": 0}],
     r"x.jsonl line 1: `context_options` repeats 'on the table'"),
    ([{"sentence": "The _ fell.", "option1": "cup", "option2": "cup", "answer": "2"}],
     r"x.jsonl line 1: `option1/option2` repeats 'cup'"),
])
def test_malformed_rows_fail_with_one_line_naming_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(CftuneError, match=message) as e:
        load(f"x={path}")
    assert "\n" not in str(e.value)


def test_a_file_of_your_own_is_checked_before_any_model_loads(tmp_path):
    """`custom` reads every item, so `cftune eval` and the runner's config check refuse a bad
    line before a model is loaded or a stage runs, not after the metrics before it."""
    path = write_jsonl(tmp_path / "x.jsonl", ARC_ROWS[:3] + [{"query": "Question: q",
                                                               "choices": ["a", "a"], "gold": 0}])
    with pytest.raises(CftuneError, match=r"x.jsonl line 4: `choices` repeats 'a'"):
        parse_bench(f"x={path}")
    with pytest.raises(CftuneError, match=r"x.jsonl line 4: `choices` repeats 'a'"):
        resolve(str(path))


def test_registry_files_keep_their_repeated_choices(shared_data, tmp_path):
    """llm-foundry's ARC-Easy repeats a choice in a few items (line 94: "decrease" twice): the
    registry task is scored as lm-eval ships it, while a copy given as a file of your own is
    refused at that line."""
    loaded = load("arc_easy", data_dir=shared_data)
    assert any(len(set(item.choices)) < len(item.choices) for item in loaded.items)
    copy = tmp_path / "arc.jsonl"
    copy.write_text((shared_data / REGISTRY["arc_easy"].file).read_text())
    with pytest.raises(CftuneError, match=r"arc.jsonl line 94: `choices` repeats 'decrease'"):
        load(f"arc={copy}")


def test_template_metric_and_spec_errors(tmp_path):
    q = write_jsonl(tmp_path / "q.jsonl", ARC_ROWS[:2])
    with pytest.raises(CftuneError, match=r"q.jsonl line 1: template of 'q' needs field 'title'"):
        load(parse_bench({"name": "q", "path": str(q), "template": "{title}\nAnswer:"}))
    last = write_jsonl(tmp_path / "last.jsonl", [{"context": "a", "continuation": "b"}])
    with pytest.raises(CftuneError, match=r"metric 'acc_norm' is not available with last_word"):
        parse_bench({"name": "l", "path": str(last), "metric": "acc_norm"})
    with pytest.raises(CftuneError, match=r"metric 'f1' .*use acc or acc_norm"):
        custom("q", q, metric="f1")
    with pytest.raises(CftuneError, match=r"unknown key\(s\) prompt; missing path .*allowed: name, path"):
        parse_bench({"name": "q", "prompt": "x"})
    with pytest.raises(CftuneError, match=r"expected NAME=PATH"):
        parse_bench("my/task=x.jsonl")
    with pytest.raises(CftuneError, match=r"benchmark 'nope': file .*missing.jsonl not found"):
        parse_bench(f"nope={tmp_path / 'missing.jsonl'}")
    assert parse_bench("arc_easy") == "arc_easy" and parse_bench(str(q)) == str(q)


def test_resolve_accepts_every_spelling(tmp_path):
    q = write_jsonl(tmp_path / "q.jsonl", ARC_ROWS[:2])
    by_path, p1 = resolve(str(q))
    by_name, p2 = resolve(f"mine={q}")
    by_spec, p3 = resolve(custom("mine", q))
    assert p1 == p2 == p3 == q
    assert by_path.name == "q" and by_name == by_spec and by_name.name == "mine"
    weird = write_jsonl(tmp_path / "a=b.jsonl", ARC_ROWS[:1])  # a path with "=" stays a path
    assert resolve(str(weird))[0].name == "a=b"
    assert isinstance(by_spec, Benchmark)
