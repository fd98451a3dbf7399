"""Benchmark registry and readers: every shared data file parses, prompts match lm-eval's
templates, Winogrande partial scoring, subsets, and a one-line error for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cftune.evaluate.benchmarks as benchmarks
from cftune.errors import CftuneError
from cftune.evaluate.benchmarks import REGISTRY, Benchmark, Doc, build_item, load, subset
from cftune.evaluate.task_accuracy import read_task

SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "boolq": 3270, "lambada": 5153,
         "pubmedqa": 1000, "medmcqa": 2816}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", sorted(SIZES))
def test_every_shared_file_parses(shared_data, name):
    loaded = load(name, data_dir=shared_data)
    assert loaded.n_total == len(loaded.items) == SIZES[name]
    for item in loaded.items:
        assert 0 <= item.gold < len(item.continuations) == len(item.contexts)
        assert all(c.startswith(" ") and c.strip() for c in item.continuations)


def test_gsm8k_files_parse(shared_data):
    assert len(read_task(shared_data / "gsm8k" / "test.jsonl")) == 1319
    assert len(read_task(shared_data / "gsm8k" / "train.jsonl")) == 7473


def test_prompts_follow_lm_eval_templates(shared_data):
    arc = load("arc_easy", limit=1, data_dir=shared_data).items[0]
    assert arc.contexts[0] == ("Question: Which statement best explains why photosynthesis is the "
                               "foundation of most food webs?\nAnswer:")
    assert arc.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems."
    piqa = load("piqa", limit=1, data_dir=shared_data).items[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    boolq = load("boolq", limit=1, data_dir=shared_data).items[0]
    assert boolq.contexts[0].startswith("All biomass goes through")  # "Passage: " removed
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.continuations == [" no", " yes"]
    lam = load("lambada", limit=1, data_dir=shared_data).items[0]
    assert lam.contexts[0].endswith("I don't care about") and lam.continuations == [" signs"]
    med = load("medmcqa", limit=1, data_dir=shared_data).items[0]
    assert med.contexts[0].startswith("Question: A 29 yrs old woman")
    assert "\nChoices:\nA. No test is required" in med.contexts[0]
    assert med.contexts[0].endswith("\nAnswer:") and med.continuations == [" A", " B", " C", " D"]
    assert med.gold == 2
    pub = load("pubmedqa", limit=1, data_dir=shared_data).items[0]
    assert pub.contexts[0].endswith("\nAnswer:") and pub.continuations == [" yes", " no", " maybe"]


def test_winogrande_partial_scoring_item():
    bench = REGISTRY["winogrande"]
    doc = benchmarks.read_winogrande(
        {"sentence": "The trophy doesn't fit in the suitcase because the _ is too big.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"}, "x line 1", bench)
    item = build_item(bench, doc)
    assert item.contexts == ["The trophy doesn't fit in the suitcase because the trophy",
                             "The trophy doesn't fit in the suitcase because the suitcase"]
    assert item.continuations == [" is too big."] * 2 and item.gold == 0


def test_cftune_schema_and_detection(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"context": "Q: 1+1=?\nA:", "choices": ["2", "3"], "gold": 0},
        {"context": "Q: 2+2=?\nA:", "choices": ["4", "5", "6"], "gold": 0},
    ])
    loaded = load(str(path))
    assert loaded.bench.reader == "cftune" and loaded.bench.name == "mine"
    assert loaded.items[1].contexts == ["Q: 2+2=?\nA:"] * 3
    assert loaded.items[1].continuations == [" 4", " 5", " 6"]


def test_subsets_are_fixed():
    assert subset(10, 3) == [0, 1, 2]
    assert subset(10, 3, seed=7) == subset(10, 3, seed=7) != subset(10, 3, seed=8)
    assert subset(10, 3, seed=7) == sorted(subset(10, 3, seed=7))
    assert subset(3, 10) == [0, 1, 2]


def test_offset_gives_a_disjoint_split(tmp_path):
    assert subset(10, 3, offset=5) == [5, 6, 7]
    assert subset(10, 30, offset=8) == [8, 9]
    drawn = subset(10, 3, seed=7, offset=5)
    assert len(drawn) == 3 and min(drawn) >= 5
    with pytest.raises(CftuneError, match="offset 10 leaves no items"):
        subset(10, 3, offset=10)
    path = write_jsonl(tmp_path / "six.jsonl", [{"context": f"q{i}", "choices": ["x", "y"],
                                                 "gold": i % 2} for i in range(6)])
    search, report = load(str(path), limit=3, offset=3), load(str(path), limit=3)
    assert search.indices == [3, 4, 5] and report.indices == [0, 1, 2]
    assert [it.contexts[0] for it in search.items] == ["q3", "q4", "q5"]
    with pytest.raises(CftuneError, match=r"six.jsonl\): offset 6 leaves no items"):
        load(str(path), offset=6)


@pytest.mark.parametrize("rows,message", [
    ([{"context": "a", "choices": ["x", "y"], "gold": 0}, {"context": "b", "choices": ["x", "y"]}],
     r"mine.jsonl line 2: missing field `gold`"),
    ([{"context": "a", "gold": 0}], r"mine.jsonl line 1: missing field `choices`"),
    ([{"context": "a", "choices": ["x", "y"], "gold": 2}],
     r"mine.jsonl line 1: `gold` = 2 is out of range for 2 choices"),
    ([{"context": "a", "choices": ["x", "y"], "gold": "0"}], r"line 1: `gold` = '0' must be an integer"),
    ([{"foo": 1}], r"mine.jsonl line 1: cannot tell the benchmark format"),
])
def test_bad_benchmark_files(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    with pytest.raises(CftuneError, match=message) as e:
        load(str(path))
    assert "\n" not in str(e.value)


def test_llmfoundry_bad_gold_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "arc.jsonl", [
        {"query": "Question: q", "choices": ["a", "b"], "gold": 1},
        {"query": "Question: q", "choices": ["a", "b"], "gold": 1},
        {"query": "Question: q", "choices": ["a", "b"], "gold": -1},
    ])
    with pytest.raises(CftuneError, match=r"arc.jsonl line 3: `gold` = -1 is out of range"):
        load(str(path))


def test_empty_benchmark(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CftuneError, match="empty.jsonl: empty benchmark"):
        load(str(tmp_path / "empty.jsonl"))
    bench = Benchmark("e", "e.jsonl", "cftune", "{context}")
    with pytest.raises(CftuneError, match="empty benchmark"):
        benchmarks.read_docs(bench, tmp_path / "empty.jsonl")


def test_limit_larger_than_set_is_clamped(tmp_path, capsys):
    path = write_jsonl(tmp_path / "two.jsonl", [{"context": "a", "choices": ["x", "y"], "gold": 0}] * 2)
    loaded = load(str(path), limit=50)
    assert len(loaded.items) == 2
    assert "--limit 50 is more than the 2 items" in capsys.readouterr().out


def test_unknown_name_and_missing_data_dir(tmp_path):
    with pytest.raises(CftuneError, match="unknown benchmark 'nope'.*arc_easy"):
        load("nope", data_dir=tmp_path)
    with pytest.raises(CftuneError, match="arc_easy.*not found"):
        load("arc_easy", data_dir=tmp_path)


def test_doc_missing_template_field():
    bench = Benchmark("b", "f", "cftune", "{question}")
    with pytest.raises(CftuneError, match="f line 1: template of 'b' needs field 'question'"):
        build_item(bench, Doc({"context": "c"}, ["a"], 0, "f line 1"))
