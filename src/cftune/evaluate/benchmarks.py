"""The benchmark registry: a benchmark is a reader (file format), a prompt template and a metric.

Adding a benchmark is one `Benchmark(...)` entry in `REGISTRY` (lm-evaluation-harness's idea of a
short declarative task spec): the reader turns each JSONL line into a `Doc` (named text
fields, the answer choices, the gold index), the template formats the fields into the context,
and the scorer scores `target_delimiter + choice` after it. Templates follow lm-evaluation-harness
0.4 task YAMLs, so numbers are comparable; docs/eval.md lists them.

A file of your own ("bring your own benchmark", issue 10) is read by the reader its first
record's keys point to: its *shape* (`SHAPES`, see `detect_shape`). `custom(name, path, template,
metric)` builds its spec, and `parse_bench` turns a CLI value `NAME=PATH` or a YAML entry
`{name, path, template, metric}` into one; a bare `.jsonl` path is named after the file. Each shape
has a default template (`DEFAULT_TEMPLATES`), overridable per benchmark.

Each benchmark names its *primary* metric the way lm-evaluation-harness reports the task
(`PRIMARY_METRICS`): acc_norm only where lm-eval reports it (ARC, PIQA, HellaSwag, OpenBookQA),
acc elsewhere (BoolQ, COPA, Winogrande, PubMedQA, MedMCQA, LAMBADA) and for files of your own
unless you say otherwise; averages over benchmarks use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cftune.errors import CftuneError, did_you_mean


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

    `metric`: how items are scored: "mc" (acc, acc_norm over the choices) or "last_word" (one
    continuation: accuracy = greedy decoding reproduces it, plus perplexity; LAMBADA).
    `primary`: the reported metric ("acc" or "acc_norm"; acc only for last_word and partial
    scoring). `partial`: partial scoring, one context per choice and one shared continuation
    (Winogrande: the choice replaces "_" in `sentence`; the `partial` shape: `context_options`).
    `choices`: fixed answer choices when the file stores the answer as text.
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
    primary: str = "acc"

    def __post_init__(self) -> None:
        allowed = ("acc",) if self.partial or self.metric == "last_word" else ("acc", "acc_norm")
        if self.metric not in ("mc", "last_word"):
            raise CftuneError(f"benchmark '{self.name}': scoring {self.metric!r} must be mc or last_word")
        if self.primary not in allowed:
            kind = "partial scoring" if self.partial else f"{self.metric} scoring"
            raise CftuneError(f"benchmark '{self.name}': metric {self.primary!r} is not available "
                              f"with {kind}; use {' or '.join(allowed)}")


def _need(rec: dict, key: str, where: str, kind: type | tuple = str) -> Any:
    if key not in rec:
        raise CftuneError(f"{where}: missing field `{key}` (keys present: {', '.join(rec) or 'none'})")
    if not isinstance(rec[key], kind):
        raise CftuneError(f"{where}: field `{key}` = {rec[key]!r:.60} has the wrong type")
    return rec[key]


def _gold_index(value: Any, n: int, where: str, into: str = "choices") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CftuneError(f"{where}: `gold` = {value!r} must be an integer index into `{into}`")
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
    if not letters or not all(isinstance(options[k], str) for k in letters):
        raise CftuneError(f"{where}: `options` must map letters to answer texts, e.g. {{\"A\": \"...\"}}")
    answer = _need(rec, "answer_idx", where, (str, int))
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(letters):
        answer = letters[answer]  # an index into the sorted letters
    if answer not in options:
        raise CftuneError(f"{where}: `answer_idx` = {answer!r} is not one of {', '.join(letters)}")
    block = "".join(f"{k}. {options[k]}\n" for k in letters)
    return Doc({"question": question, "options": block}, letters, letters.index(answer), where)


def read_context_continuation(rec: dict, where: str, bench: Benchmark) -> Doc:
    """`{"context", "continuation"}` (llm-foundry LAMBADA, PubMedQA). With fixed `bench.choices`
    the continuation names the gold choice; otherwise it is the single scored continuation."""
    context = _need(rec, "context", where).rstrip()
    continuation = _need(rec, "continuation", where).strip()
    if not continuation:
        raise CftuneError(f"{where}: `continuation` is empty")
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


def read_partial(rec: dict, where: str, bench: Benchmark) -> Doc:
    """The partial-scoring shape `{"context_options": [..], "continuation", "gold"}` (lm-eval's
    Winogrande in general form): each option is a context, the same continuation is scored
    after each; `gold` indexes the options. The template sees the option as `{context}` (and any
    other string field of the record)."""
    options = _choices(rec, "context_options", where)
    continuation = _need(rec, "continuation", where).strip()
    if not continuation:
        raise CftuneError(f"{where}: `continuation` is empty")
    gold = _gold_index(_need(rec, "gold", where, object), len(options), where, "context_options")
    fields = {k: v for k, v in rec.items() if isinstance(v, str)}
    fields["continuation"] = continuation
    return Doc(fields, options, gold, where)


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
    "partial": read_partial,
    "cftune": read_cftune,
}

# The file shapes, named by their keys (reported as `shape` in results), and each one's default
# template (override with `custom(..., template=...)` / YAML `template:`).
SHAPES: dict[str, str] = {
    "cftune": "{context, choices, gold}",
    "llmfoundry_mc": "{query, choices, gold}",
    "medagents": "{question, options, answer_idx}",
    "context_continuation": "{context, continuation}",
    "partial": "{context_options, continuation, gold}",
    "winogrande": "{sentence, option1, option2, answer}",
}
DEFAULT_TEMPLATES: dict[str, str] = {
    "cftune": "{context}",
    "llmfoundry_mc": "{query}\nAnswer:",  # = "Question: {question}\nAnswer:" for ARC/PIQA files
    "medagents": "Question: {question}\nChoices:\n{options}Answer:",
    "context_continuation": "{context}",
    "partial": "{context}",
    "winogrande": "{sentence}",
}

_QA = "Question: {question}\nAnswer:"
REGISTRY: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("arc_easy", "arc_easy/arc_easy_test.llmfoundry.jsonl", "llmfoundry_mc", _QA,
              primary="acc_norm", description="ARC-Easy test (llm-foundry copy, 4 choices each)"),
    Benchmark("arc_challenge", "arc_challenge/arc_challenge_test.llmfoundry.jsonl",
              "llmfoundry_mc", _QA, primary="acc_norm",
              description="ARC-Challenge test (llm-foundry copy)"),
    Benchmark("piqa", "piqa/piqa_validation.llmfoundry.jsonl", "llmfoundry_mc", _QA,
              primary="acc_norm", description="PIQA validation"),
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

# lm-evaluation-harness's reported metric per task (its task YAMLs; issue 9 item 6): acc_norm
# where lm-eval reports it, acc otherwise. A benchmark file of your own named like one of these
# gets its metric; any other defaults to acc.
PRIMARY_METRICS: dict[str, str] = {
    **{b.name: b.primary for b in REGISTRY.values()},
    "hellaswag": "acc_norm", "openbookqa": "acc_norm", "copa": "acc",
}


def detect_shape(first: dict, where: str) -> str:
    """The shape (a key of `SHAPES` / `READERS`) of a file, from its first record's keys."""
    keys = set(first)
    if "context_options" in keys:
        return "partial"
    if "query" in keys:
        return "llmfoundry_mc"
    if "options" in keys or "answer_idx" in keys:
        return "medagents"
    if "sentence" in keys:
        return "winogrande"
    if {"context", "continuation"} <= keys:
        return "context_continuation"
    if "context" in keys:
        return "cftune"
    raise CftuneError(
        f"{where}: cannot tell the benchmark format from keys {', '.join(sorted(keys)) or 'none'}; "
        f"use one of the shapes {'; '.join(SHAPES.values())} (docs/eval.md)"
    )


def custom(name: str, path: str | Path, template: str | None = None,
           metric: str | None = None) -> Benchmark:
    """The spec of a benchmark file of your own: its shape detected from the first record, the
    shape's default template unless `template` is given, and `metric` (the primary metric: acc,
    or acc_norm for multiple choice; default acc, or lm-eval's choice when `name` is a task in
    `PRIMARY_METRICS`). Fails fast, with a one-line error, on a missing or empty file or an
    invalid item (`read_docs`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CftuneError(f"benchmark '{name}': file {path} not found")
    first = next(_iter_records(path), None)
    if first is None:
        raise CftuneError(f"{path}: empty benchmark (no records)")
    reader = detect_shape(first[1], f"{path} line {first[0]}")
    bench = Benchmark(name, str(path), reader, template or DEFAULT_TEMPLATES[reader],
                      metric="last_word" if reader == "context_continuation" else "mc",
                      partial=reader in ("partial", "winogrande"),
                      primary=metric or PRIMARY_METRICS.get(name, "acc"))
    read_docs(bench, path)  # every item checked now, before a model is loaded or a stage runs
    return bench


_NAME = re.compile(r"[A-Za-z0-9_.-]+")
SPEC_KEYS = ("name", "path", "template", "metric")


def parse_bench(value: str | dict | Benchmark) -> str | Benchmark:
    """One `--bench` value or YAML `bench:` entry: a registry name or a `.jsonl` path is returned
    as is; `NAME=PATH` (CLI) and `{name, path, template, metric}` (YAML) become the `custom`
    spec of that file named NAME."""
    if isinstance(value, Benchmark):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(SPEC_KEYS))
        missing = [k for k in ("name", "path") if not value.get(k)]
        if unknown or missing:
            raise CftuneError(f"bench entry {value!r:.80}: "
                              + "; ".join([f"unknown key(s) {', '.join(unknown)}"] * bool(unknown)
                                          + [f"missing {', '.join(missing)}"] * bool(missing))
                              + f" (allowed: {', '.join(SPEC_KEYS)})")
        return custom(str(value["name"]), value["path"], value.get("template"), value.get("metric"))
    if not isinstance(value, str):
        raise CftuneError(f"bench entry {value!r:.60} must be a name, a path, NAME=PATH or a mapping")
    name, sep, path = value.partition("=")
    if not sep or Path(value).expanduser().is_file():  # a file whose name holds "=" is a path
        return value
    if not _NAME.fullmatch(name) or not path:
        raise CftuneError(f"--bench {value!r}: expected NAME=PATH with NAME of letters, digits, "
                          "'_', '.', '-' (e.g. mytask=data/mytask.jsonl)")
    return custom(name, path)


def default_data_dir() -> Path | None:
    """`$CFTUNE_DATA`, else `../shared/data` relative to the working directory when present."""
    if os.environ.get("CFTUNE_DATA"):
        return Path(os.environ["CFTUNE_DATA"])
    candidate = Path("..") / "shared" / "data"
    return candidate if candidate.is_dir() else None


def resolve(spec: str | dict | Benchmark, data_dir: str | Path | None = None) -> tuple[Benchmark, Path]:
    """The registry entry (or file spec) and the file for a `--bench` value (see `parse_bench`).
    A `Benchmark`'s relative file is read from the working directory, else the data folder."""
    if not isinstance(spec, Benchmark):
        spec = parse_bench(spec)
    if isinstance(spec, Benchmark):
        file = Path(spec.file).expanduser()
        root = Path(data_dir) if data_dir else default_data_dir()
        if not file.is_file() and not file.is_absolute() and root is not None:
            file = root / file
        if not file.is_file():
            raise CftuneError(f"benchmark '{spec.name}': {file} not found")
        return spec, file
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" or path.is_file():
        if not path.is_file():
            raise CftuneError(f"benchmark file {path} not found")
        return custom(path.stem, path), path
    if spec not in REGISTRY:
        raise CftuneError(f"unknown benchmark '{spec}': give a .jsonl file, NAME=PATH or one of "
                          f"{', '.join(REGISTRY)}{did_you_mean(spec, REGISTRY)}")
    bench = REGISTRY[spec]
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None:
        raise CftuneError(f"benchmark '{spec}' is looked up in a data folder: pass "
                          "--data-dir or set $CFTUNE_DATA")
    file = root / bench.file
    if not file.is_file():
        raise CftuneError(f"benchmark '{spec}': {file} not found (check --data-dir)")
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


# The field that holds the answer choices in each multiple-choice shape, for error messages.
CHOICE_FIELDS = {"cftune": "choices", "llmfoundry_mc": "choices", "medagents": "options",
                 "partial": "context_options", "winogrande": "option1/option2"}


def check_choices(bench: Benchmark, doc: Doc) -> None:
    """Refuse an item that cannot tell models apart (issue 32, item 4): with one choice it is
    always scored right, and repeated choices score alike, so the tie goes silently to the first
    (as lm-eval's argmax). Registry files are scored as lm-eval ships them (llm-foundry's
    ARC-Easy and ARC-Challenge repeat a choice in 7 and 4 items), so only files of your own are
    checked."""
    key = CHOICE_FIELDS.get(bench.reader, "choices")
    if len(doc.choices) < 2:
        raise CftuneError(f"{doc.where}: `{key}` holds one choice, which is always scored right; "
                          "give at least two choices or remove the item")
    first: dict[str, int] = {}
    for i, choice in enumerate(doc.choices):
        if choice in first:
            raise CftuneError(f"{doc.where}: `{key}` repeats {choice!r:.40} (choices {first[choice]} "
                              f"and {i}), so they always tie and the first wins; make the choices "
                              "distinct or remove the item")
        first[choice] = i


def read_docs(bench: Benchmark, path: Path) -> list[Doc]:
    """Every doc of a benchmark file, each validated (errors name the file and line)."""
    reader = READERS[bench.reader]
    docs = [reader(rec, f"{path} line {lineno}", bench) for lineno, rec in _iter_records(path)]
    if bench.metric == "mc" and REGISTRY.get(bench.name) != bench:  # a file of your own
        for doc in docs:
            check_choices(bench, doc)
    if not docs:
        raise CftuneError(f"{path}: empty benchmark (no records)")
    return docs


def subset(n_total: int, limit: int | None, seed: int = 0, offset: int = 0) -> list[int]:
    """The fixed item indices for `--limit`: the first `limit` items from `offset` on (seed 0
    keeps file order), or a seeded random sample of the items from `offset` on; always sorted so
    the subset reads like the file. An offset keeps a split apart: choosing a schedule on items
    [500, 1000) does not inflate what is reported on [0, 500)."""
    if not 0 <= offset < n_total:
        raise CftuneError(f"offset {offset} leaves no items (the benchmark has {n_total}); "
                          f"use an offset below {n_total}")
    pool = range(offset, n_total)
    if limit is None or limit >= len(pool):
        return list(pool)
    if seed == 0:
        return list(pool[:limit])
    return sorted(random.Random(seed).sample(pool, limit))


def _format(bench: Benchmark, doc: Doc, **extra: str) -> str:
    try:
        return bench.template.format(**{**doc.fields, **extra})
    except (KeyError, IndexError) as e:
        raise CftuneError(f"{doc.where}: template of '{bench.name}' needs field {e} (fields: "
                          f"{', '.join(sorted({**doc.fields, **extra}))})") from None


def build_item(bench: Benchmark, doc: Doc) -> Item:
    """Apply the prompt template: contexts and scored continuations of one doc."""
    d = bench.target_delimiter
    if bench.reader == "partial":  # each option is a context (the template's {context})
        rest = d + doc.fields["continuation"]
        return Item([_format(bench, doc, context=c) for c in doc.choices], [rest] * len(doc.choices),
                    doc.gold, doc.choices)
    context = _format(bench, doc)
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
    """A benchmark ready to score: `items[k]` is the file's record number `indices[k]` (0-based,
    the item id in per-item results)."""

    bench: Benchmark
    path: Path
    items: list[Item]
    n_total: int
    indices: list[int]

    @property
    def shape(self) -> str:
        """The file's shape by its keys, e.g. "{query, choices, gold}"."""
        return SHAPES[self.bench.reader]


def load(name_or_path: str | dict | Benchmark, limit: int | None = None, data_dir: str | Path | None = None,
         seed: int = 0, offset: int = 0) -> LoadedBenchmark:
    """Read, validate and template a benchmark; `limit` keeps a fixed subset (first N from
    `offset` on by default). A limit above the set size is clamped with a note, not an error."""
    bench, path = resolve(name_or_path, data_dir)
    docs = read_docs(bench, path)
    if limit is not None and offset + limit > len(docs):
        start = f" from item {offset}" if offset else ""
        print(f"cftune eval: {bench.name}: --limit {limit}{start} is more than the {len(docs)} "
              f"items in {path}; using {max(len(docs) - offset, 0)}")
    try:
        indices = subset(len(docs), limit, seed, offset)
    except CftuneError as e:
        raise CftuneError(f"{bench.name} ({path}): {e}") from None
    items = [build_item(bench, docs[i]) for i in indices]
    return LoadedBenchmark(bench, path, items, len(docs), indices)
