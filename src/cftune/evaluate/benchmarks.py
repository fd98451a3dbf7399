"""The benchmark registry: a benchmark is a reader (file format), a prompt template and a metric.

Adding a benchmark is one `Benchmark(...)` entry in `REGISTRY` (lm-evaluation-harness's idea of a
short declarative task spec, STYLE.md): the reader turns each JSONL line into a `Doc` (named text
fields, the answer choices, the gold index), the template formats the fields into the context,
and the scorer scores `target_delimiter + choice` after it. Templates follow lm-evaluation-harness
0.4 task YAMLs, so numbers are comparable; docs/eval.md lists them.

A path instead of a registered name is read by the reader its first record's keys point to (the
cftune schema, llm-foundry, medagents or context/continuation files, see `detect`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cftune.errors import CftuneError


@dataclass
class Doc:
    """One benchmark item as read from its file, before the prompt template is applied."""

    fields: dict[str, str]
    choices: list[str]
    gold: int
    where: str  # "file line N", for error messages


@dataclass
class Item:
    """One scored item: the model scores `continuations[i]` after `contexts[i]` for each choice i.

    Ordinary multiple choice shares one context across the choices; Winogrande-style partial
    scoring has one context per choice and a shared continuation.
    """

    contexts: list[str]
    continuations: list[str]
    gold: int
    choices: list[str]  # the answer texts, for length normalisation


@dataclass(frozen=True)
class Benchmark:
    """A registry entry.

    `metric`: "mc" (acc, acc_norm over the choices) or "last_word" (one continuation: accuracy =
    greedy decoding reproduces it, plus perplexity; LAMBADA). `partial`: Winogrande partial
    scoring, where the choice is substituted for "_" in `sentence` and the rest of the sentence is
    scored. `choices`: fixed answer choices when the file stores the answer as text.
    """

    name: str
    file: str  # path relative to the data folder (or absolute)
    reader: str  # key of READERS
    template: str  # str.format template over the Doc fields
    metric: str = "mc"
    choices: tuple[str, ...] = ()
    partial: bool = False
    target_delimiter: str = " "
    description: str = ""


def _need(rec: dict, key: str, where: str, kind: type | tuple = str) -> Any:
    if key not in rec:
        raise CftuneError(f"{where}: missing field `{key}` (keys present: {', '.join(rec) or 'none'})")
    if not isinstance(rec[key], kind):
        raise CftuneError(f"{where}: field `{key}` = {rec[key]!r:.60} has the wrong type")
    return rec[key]


def _gold_index(value: Any, n: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CftuneError(f"{where}: `gold` = {value!r} must be an integer index into `choices`")
    if not 0 <= value < n:
        raise CftuneError(f"{where}: `gold` = {value} is out of range for {n} choices (0..{n - 1})")
    return value


def _choices(rec: dict, key: str, where: str) -> list[str]:
    choices = _need(rec, key, where, list)
    if len(choices) < 1 or not all(isinstance(c, str) for c in choices):
        raise CftuneError(f"{where}: `{key}` must be a non-empty list of strings")
    return choices


def read_llmfoundry_mc(rec: dict, where: str, bench: Benchmark) -> Doc:
    """llm-foundry `{"query", "choices", "gold"}`. `query` carries "Question: " or "Passage: …
    \\nQuestion: …" prefixes; they are split into fields so templates rebuild lm-eval's prompts."""
    query = _need(rec, "query", where).strip()
    choices = _choices(rec, "choices", where)
    gold = _gold_index(_need(rec, "gold", where, object), len(choices), where)
    fields = {"query": query, "passage": "", "question": query}
    if query.startswith("Passage: ") and "\nQuestion: " in query:
        passage, question = query[len("Passage: "):].rsplit("\nQuestion: ", 1)
        fields.update(passage=passage, question=question.rstrip("?"))
    elif query.startswith("Question: "):
        fields["question"] = query[len("Question: "):]
    return Doc(fields, choices, gold, where)


def read_medagents(rec: dict, where: str, bench: Benchmark) -> Doc:
    """medagents-benchmark `{"question", "options": {"A": ..}, "answer_idx": "A"}`: the choices
    are the option letters, as in lm-eval's medmcqa task."""
    question = _need(rec, "question", where)
    options = _need(rec, "options", where, dict)
    letters = sorted(options)
    answer = _need(rec, "answer_idx", where)
    if answer not in options:
        raise CftuneError(f"{where}: `answer_idx` = {answer!r} is not one of {', '.join(letters)}")
    block = "".join(f"{k}. {options[k]}\n" for k in letters)
    return Doc({"question": question, "options": block}, letters, letters.index(answer), where)


def read_context_continuation(rec: dict, where: str, bench: Benchmark) -> Doc:
    """`{"context", "continuation"}` (llm-foundry LAMBADA, PubMedQA). With fixed `bench.choices`
    the continuation names the gold choice; otherwise it is the single scored continuation."""
    context = _need(rec, "context", where).rstrip()
    continuation = _need(rec, "continuation", where).strip()
    if bench.choices:
        if continuation not in bench.choices:
            raise CftuneError(f"{where}: `continuation` = {continuation!r} is not one of "
                              f"{', '.join(bench.choices)}")
        return Doc({"context": context}, list(bench.choices), bench.choices.index(continuation), where)
    return Doc({"context": context}, [continuation], 0, where)


def read_winogrande(rec: dict, where: str, bench: Benchmark) -> Doc:
    """Winogrande `{"sentence" (with one "_"), "option1", "option2", "answer": "1"|"2"}`."""
    sentence = _need(rec, "sentence", where)
    if sentence.count("_") != 1:
        raise CftuneError(f"{where}: `sentence` must contain exactly one '_' blank")
    choices = [_need(rec, "option1", where), _need(rec, "option2", where)]
    answer = str(_need(rec, "answer", where, (str, int)))
    if answer not in ("1", "2"):
        raise CftuneError(f"{where}: `answer` = {answer!r} must be 1 or 2")
    return Doc({"sentence": sentence}, choices, int(answer) - 1, where)


def read_cftune(rec: dict, where: str, bench: Benchmark) -> Doc:
    """The cftune schema (docs/eval.md): `{"context", "choices", "gold"}`; the context is used
    verbatim and each choice is scored as " " + choice."""
    context = _need(rec, "context", where)
    choices = _choices(rec, "choices", where)
    gold = _gold_index(_need(rec, "gold", where, object), len(choices), where)
    return Doc({"context": context}, choices, gold, where)


READERS: dict[str, Callable[[dict, str, Benchmark], Doc]] = {
    "llmfoundry_mc": read_llmfoundry_mc,
    "medagents": read_medagents,
    "context_continuation": read_context_continuation,
    "winogrande": read_winogrande,
    "cftune": read_cftune,
}

_QA = "Question: {question}\nAnswer:"
REGISTRY: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("arc_easy", "arc_easy/arc_easy_test.llmfoundry.jsonl", "llmfoundry_mc", _QA,
              description="ARC-Easy test (llm-foundry copy, 4 choices each)"),
    Benchmark("arc_challenge", "arc_challenge/arc_challenge_test.llmfoundry.jsonl",
              "llmfoundry_mc", _QA, description="ARC-Challenge test (llm-foundry copy)"),
    Benchmark("piqa", "piqa/piqa_validation.llmfoundry.jsonl", "llmfoundry_mc", _QA,
              description="PIQA validation"),
    Benchmark("boolq", "boolq/boolq_dev.llmfoundry.jsonl", "llmfoundry_mc",
              "{passage}\nQuestion: {question}?\nAnswer:", description="BoolQ dev (no/yes)"),
    Benchmark("lambada", "lambada/lambada_openai_test.llmfoundry.jsonl", "context_continuation",
              "{context}", metric="last_word", description="LAMBADA (OpenAI) last-word accuracy"),
    Benchmark("pubmedqa", "pubmedqa/pubmedqa_labeled.llmfoundry.jsonl", "context_continuation",
              "{context}", choices=("yes", "no", "maybe"), description="PubMedQA labeled"),
    Benchmark("medmcqa", "medmcqa/medmcqa_dev_subset.medagents.jsonl", "medagents",
              "Question: {question}\nChoices:\n{options}Answer:", description="MedMCQA dev subset"),
    Benchmark("winogrande", "winogrande/winogrande_xl_dev.jsonl", "winogrande", "{sentence}",
              partial=True, description="Winogrande (partial scoring; file not shipped)"),
]}


def detect(path: Path, first: dict) -> Benchmark:
    """A benchmark spec for a file given by path, chosen by its first record's keys."""
    keys = set(first)
    name = path.stem
    if "query" in keys:
        return Benchmark(name, str(path), "llmfoundry_mc", "{query}\nAnswer:")
    if "options" in keys or "answer_idx" in keys:
        return Benchmark(name, str(path), "medagents", REGISTRY["medmcqa"].template)
    if "sentence" in keys:
        return Benchmark(name, str(path), "winogrande", "{sentence}", partial=True)
    if {"context", "continuation"} <= keys:
        return Benchmark(name, str(path), "context_continuation", "{context}", metric="last_word")
    if "context" in keys:
        return Benchmark(name, str(path), "cftune", "{context}")
    raise CftuneError(
        f"{path} line 1: cannot tell the benchmark format from keys {', '.join(sorted(keys))}; "
        "use the cftune schema {\"context\", \"choices\", \"gold\"} (docs/eval.md)"
    )


def default_data_dir() -> Path | None:
    """`$CFTUNE_DATA`, else `../shared/data` relative to the working directory when present."""
    if os.environ.get("CFTUNE_DATA"):
        return Path(os.environ["CFTUNE_DATA"])
    candidate = Path("..") / "shared" / "data"
    return candidate if candidate.is_dir() else None


def resolve(name_or_path: str, data_dir: str | Path | None = None) -> tuple[Benchmark, Path]:
    """The registry entry (or detected spec) and the file for a `--bench` value."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".jsonl" or path.is_file():
        if not path.is_file():
            raise CftuneError(f"benchmark file {path} not found")
        first = next(_iter_records(path), None)
        if first is None:
            raise CftuneError(f"{path}: empty benchmark (no records)")
        return detect(path, first[1]), path
    if name_or_path not in REGISTRY:
        raise CftuneError(f"unknown benchmark '{name_or_path}': give a .jsonl file or one of "
                          f"{', '.join(REGISTRY)}")
    bench = REGISTRY[name_or_path]
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None:
        raise CftuneError(f"benchmark '{name_or_path}' is looked up in a data folder: pass "
                          "--data-dir or set $CFTUNE_DATA")
    file = root / bench.file
    if not file.is_file():
        raise CftuneError(f"benchmark '{name_or_path}': {file} not found (check --data-dir)")
    return bench, file


def _iter_records(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CftuneError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise CftuneError(f"{path} line {lineno}: expected a JSON object")
            yield lineno, rec


def read_docs(bench: Benchmark, path: Path) -> list[Doc]:
    """Every doc of a benchmark file, each validated (errors name the file and line)."""
    reader = READERS[bench.reader]
    docs = [reader(rec, f"{path} line {lineno}", bench) for lineno, rec in _iter_records(path)]
    if not docs:
        raise CftuneError(f"{path}: empty benchmark (no records)")
    return docs


def subset(n_total: int, limit: int | None, seed: int = 0) -> list[int]:
    """The fixed item indices for `--limit`: the first `limit` items (seed 0 keeps file order), or
    a seeded random sample of them; always sorted so the subset reads like the file."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if seed == 0:
        return list(range(limit))
    return sorted(random.Random(seed).sample(range(n_total), limit))


def build_item(bench: Benchmark, doc: Doc) -> Item:
    """Apply the prompt template: contexts and scored continuations of one doc."""
    try:
        context = bench.template.format(**doc.fields)
    except KeyError as e:
        raise CftuneError(f"{doc.where}: template of '{bench.name}' needs field {e}") from None
    d = bench.target_delimiter
    if bench.partial:  # lm-eval winogrande: context = text before "_" + option; score the rest
        sentence = doc.fields["sentence"]
        cut = sentence.index("_")
        rest = d + sentence[cut + 1:].strip()
        return Item([sentence[:cut] + c for c in doc.choices], [rest] * len(doc.choices), doc.gold,
                    doc.choices)
    return Item([context] * len(doc.choices), [d + c for c in doc.choices], doc.gold, doc.choices)


def content_hash(path: Path, bench: Benchmark) -> str:
    """Hash of the file bytes and the spec, for caching results."""
    h = hashlib.sha256(Path(path).read_bytes())
    h.update(json.dumps(bench.__dict__, sort_keys=True, default=list).encode())
    return h.hexdigest()[:20]


@dataclass
class LoadedBenchmark:
    bench: Benchmark
    path: Path
    items: list[Item]
    n_total: int
    indices: list[int]


def load(name_or_path: str, limit: int | None = None, data_dir: str | Path | None = None,
         seed: int = 0) -> LoadedBenchmark:
    """Read, validate and template a benchmark; `limit` keeps a fixed subset (first N by
    default). A limit above the set size is clamped with a note, not an error."""
    bench, path = resolve(name_or_path, data_dir)
    docs = read_docs(bench, path)
    if limit is not None and limit > len(docs):
        print(f"cftune eval: {bench.name}: --limit {limit} is more than the {len(docs)} items "
              f"in {path}; using all {len(docs)}")
    indices = subset(len(docs), limit, seed)
    items = [build_item(bench, docs[i]) for i in indices]
    return LoadedBenchmark(bench, path, items, len(docs), indices)
