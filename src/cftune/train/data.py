"""Training data: task rows and CF samples turned into masked token examples.

An *example* is a dict `{"input_ids", "labels", "source", "weight"}` (plus `topk_ids` /
`topk_logprobs` for the KD objective): `labels` is -100 wherever the model must not be trained to
predict the token (prompts, CF prefixes), so "prompt tokens carry no loss and CF tokens all do" is a
property of the example, not of the loss. `source` says which stream an example came from:

- `TASK` (0): task data, loss on the response only, EOS appended (issue 3, "Data");
- `CF` (1): context-free samples (or their contextual/replay stand-ins), loss on every sampled token,
  the prefix (or the record's `prompt_ids`) as context only. `token_ids` already ends with EOS when
  the sample finished, so EOS is a target exactly when it was sampled.

Tokenised examples are cached by content (`cached`); mixing the streams is the batch sampler's
job (`cftune.train.batches`), not done by copying rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cftune.errors import CftuneError
from cftune.generate.samples import iter_samples
from cftune.io import BOM, iter_jsonl, note_bom, read_manifest
from cftune.prompts import PromptSpec, document_ids, prompt_ids, response_ids
from cftune.train.formats import TaskFormat

TASK, CF = 0, 1
SOURCES = ("task", "cf")
CACHE_VERSION = 2  # bump when the tokenisation below changes, to invalidate cached examples


# ---------------------------------------------------------------------------- reading task files
def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL, CSV or Parquet file, or of a `datasets` folder (`save_to_disk`).

    A folder holding a `DatasetDict` gives its `train` split (or its only split).
    """
    path = Path(path)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise CftuneError(f"{path}: not a saved `datasets` folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
            if split is None:
                raise CftuneError(f"{path}: no `train` split among {', '.join(ds)}")
            ds = ds[split]
        return ds.to_list()
    if not path.is_file():
        raise CftuneError(f"{path}: task file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return list(iter_jsonl(path))
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise CftuneError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    raise CftuneError(f"{path}: unknown file type '{suffix}'; use .jsonl, .csv, .parquet or a "
                      f"`datasets` folder")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header line; bad bytes and bad quoting name their line. A short
    row's missing cells are None, which the row checks then refuse by field."""
    raw = path.read_bytes()
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
        note_bom(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise CftuneError(f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); save "
                          f"the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        return list(reader)
    except csv.Error as e:
        raise CftuneError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None


# ------------------------------------------------------------------------ task rows -> examples
def detect_shape(row: dict[str, Any], fmt: TaskFormat, where: str) -> str:
    """The row shape: the configured one, or the first whose fields the row has."""
    if fmt.shape != "auto":
        return fmt.shape
    if fmt.messages_field in row:
        return "messages"
    if fmt.prompt_field in row and fmt.response_field in row:
        return "prompt-response"
    if fmt.text_field in row:
        return "text"
    raise CftuneError(
        f"{where}: row has fields {', '.join(sorted(row)) or '(none)'} but none of the expected "
        f"shapes: `{fmt.prompt_field}`+`{fmt.response_field}` (set --prompt-field/--response-field, "
        f"e.g. question/answer for GSM8K), `{fmt.messages_field}` or `{fmt.text_field}`"
    )


def prompt_spec(fmt: TaskFormat) -> PromptSpec:
    return PromptSpec(fmt.prompt_format, fmt.prompt_template, fmt.doc_start)


def format_prompt(tokenizer, prompt: str, fmt: TaskFormat) -> list[int]:
    """Token ids of a task prompt, ready for the response to follow (`cftune.prompts`, the same
    function the evaluation and the contextual baseline use)."""
    return prompt_ids(tokenizer, prompt, prompt_spec(fmt))


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise CftuneError(f"tokenizer {tokenizer.name_or_path} has no EOS token to end responses with")
    return tokenizer.eos_token_id


def row_text(row: dict[str, Any], name: str, where: str, empty_ok: bool = False) -> str:
    """The text of `row[name]`. A number, null, boolean, list or object there is an error naming
    file, row and field, never a silent `str()` (issue 15: `1` would train as "1", null as
    "None"); so is empty text, unless `empty_ok`."""
    value = row.get(name)
    if not isinstance(value, str):
        kind = ("null" if value is None else "a boolean" if isinstance(value, bool) else
                "a number" if isinstance(value, (int, float)) else
                "a list" if isinstance(value, (list, tuple)) else
                "an object" if isinstance(value, dict) else type(value).__name__)
        shown = "" if value is None else f" ({json.dumps(value, default=str)[:40]})"
        raise CftuneError(f"{where}: `{name}` is {kind}{shown}, not text; fix the row (quote "
                          f"numbers) or point the field setting at a text field")
    if not empty_ok and not value.strip():
        raise CftuneError(f"{where}: `{name}` is empty; fill it in or remove the row")
    return value


def _messages_example(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[list, list]:
    """Render a chat with the model's template; only assistant turns are targets.

    Each assistant turn's tokens are what the template adds between the conversation up to it
    (with the assistant turn opened) and the conversation including it, end-of-turn included.
    """
    if not isinstance(messages, list) or not messages:
        raise CftuneError(f"{where}: `messages` must be a non-empty list of {{role, content}} "
                          f"turns, not {json.dumps(messages, default=str)[:40]}")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise CftuneError(f"{where}: `messages` has no assistant turn to train on; add one or "
                          f"remove the row")
    if not getattr(tokenizer, "chat_template", None):
        raise CftuneError(f"{where}: `messages` rows need a tokenizer with a chat template")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CftuneError(f"{where}: message {i} needs `role` and `content`")
        row_text(m, "content", f"{where}: message {i}", empty_ok=m["role"] != "assistant")
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and before.startswith(rendered)):
            raise CftuneError(f"{where}: the chat template does not render turns as prefixes; "
                              f"use prompt/response rows instead")
        context = _text_ids(tokenizer, before[len(rendered):])
        turn = _text_ids(tokenizer, upto[len(before):])
        ids += context + turn
        labels += [-100] * len(context) + turn
        rendered = upto
    return ids, labels


def task_example(row: dict[str, Any], tokenizer, fmt: TaskFormat, where: str) -> tuple[list, list]:
    """(input_ids, labels) of one task row; labels are -100 on the prompt."""
    shape = detect_shape(row, fmt, where)
    if shape == "messages":
        return _messages_example(tokenizer, row[fmt.messages_field], where)
    if shape == "prompt-response":
        missing = [f for f in (fmt.prompt_field, fmt.response_field) if f not in row]
        if missing:
            raise CftuneError(f"{where}: no field `{missing[0]}` (fields: {', '.join(sorted(row))})")
        spec = prompt_spec(fmt)
        prompt = prompt_ids(tokenizer, row_text(row, fmt.prompt_field, where), spec)
        response = response_ids(tokenizer, row_text(row, fmt.response_field, where), spec) + [
            _eos(tokenizer)]
        return prompt + response, [-100] * len(prompt) + response
    if fmt.text_field not in row:
        raise CftuneError(f"{where}: no field `{fmt.text_field}` (fields: {', '.join(sorted(row))})")
    # A generic document starts where the model's pretraining documents start (`doc_start_ids`),
    # never at the CF start token: replay would otherwise teach "prose follows <|im_start|>".
    ids = document_ids(tokenizer, row_text(row, fmt.text_field, where), fmt.doc_start) + [
        _eos(tokenizer)]
    return ids, [-100] + ids[1:]  # the first token has no context: never a target


def fit_length(ids: list, labels: list, max_length: int, overlong: str) -> tuple[list, list] | None:
    """Cut an example to `max_length` (keeping its start) or drop it (None).

    An example left with no target after cutting is dropped either way: it would cost compute and
    teach nothing.
    """
    if len(ids) > max_length:
        if overlong == "drop":
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    if not any(t != -100 for t in labels[1:]):
        return None
    return ids, labels


@dataclass
class Counts:
    """What happened to the rows of one source (reported in the log and the manifest)."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    target_tokens: int = 0
    bom_skipped: int = 0  # files whose UTF-8 byte-order mark was skipped (accepted, with a note)
    unused: int = 0  # CF samples past what the run draws (`cftune.train.streams.first_draws`)


def starts_with_bom(path: str | Path) -> bool:
    """Whether a file starts with a UTF-8 byte-order mark (False for a folder or `builtin:`)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(BOM)) == BOM
    except OSError:
        return False


def task_examples(path: str | Path, tokenizer, fmt: TaskFormat,
                  rows: Sequence[dict] | None = None) -> tuple[list[dict], Counts]:
    """Every usable row of a task file as an example, with the counts of cut and dropped rows."""
    bom = rows is None and starts_with_bom(path)
    rows = read_rows(path) if rows is None else rows
    if not rows:
        raise CftuneError(f"{path}: no rows")
    counts, out = Counts(rows=len(rows), bom_skipped=int(bom)), []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        if not isinstance(row, dict):
            raise CftuneError(f"{where}: expected an object with fields, got {type(row).__name__}")
        ids, labels = task_example(row, tokenizer, fmt, where)
        _keep(out, counts, ids, labels, fmt, TASK)
    if not out:
        raise CftuneError(f"{path}: no usable rows ({counts.rows} rows, all dropped: too long for "
                          f"--max-length {fmt.max_length} with --overlong {fmt.overlong}, or nothing "
                          f"left to train on)")
    return out, counts


def _keep(out: list, counts: Counts, ids: list, labels: list, fmt: TaskFormat, source: int,
          extra: dict | None = None) -> None:
    fitted = fit_length(ids, labels, fmt.max_length, fmt.overlong)
    if fitted is None:
        counts.dropped += 1
        return
    counts.truncated += len(fitted[0]) < len(ids)
    counts.kept += 1
    counts.target_tokens += sum(t != -100 for t in fitted[1][1:])
    example = {"input_ids": fitted[0], "labels": fitted[1], "source": source, "weight": 1.0}
    if extra:
        n_targets = sum(t != -100 for t in fitted[1])
        example.update({k: v[:n_targets] for k, v in extra.items()})
    out.append(example)


# ------------------------------------------------------------------------ CF samples -> examples
def cf_examples(folder: str | Path, fmt: TaskFormat, kd: bool = False,
                require_prompts: bool = False) -> tuple[list[dict], Counts]:
    """CF sample records as examples: the context is masked, every sampled token is a target.

    The context is the record's `prompt_ids` when present (contextual synthetic data from
    `cftune generate --task-prompts`), else the manifest's `prefix_ids`. With `kd`, the records'
    stored top-K base log-probs ride along, one list of K per target token.
    """
    manifest = read_manifest(folder)
    prefix = list(manifest.get("prefix_ids") or [])
    if kd and not manifest.get("topk_logprobs"):
        raise CftuneError(f"{folder}: samples carry no top-K log-probs (manifest topk_logprobs = 0); "
                          f"regenerate with `cftune generate --topk-logprobs 20` or use --method cfs")
    out: list[dict] = []
    counts = Counts()
    for record in iter_samples(folder):
        counts.rows += 1
        if require_prompts and "prompt_ids" not in record:
            raise CftuneError(f"{folder}: record {record.get('id')} has no `prompt_ids`; contextual "
                              f"data comes from `cftune generate --task-prompts FILE`")
        context = list(record.get("prompt_ids") or prefix)
        tokens = list(record["token_ids"])
        if not tokens:
            counts.dropped += 1
            continue
        extra = {"topk_ids": record["topk_ids"], "topk_logprobs": record["topk_logprobs"]} if kd else None
        _keep(out, counts, context + tokens, [-100] * len(context) + tokens, fmt, CF, extra)
    stated = (manifest.get("counts") or {}).get("samples")
    if stated is not None and stated != counts.rows:
        raise CftuneError(f"{folder}: its manifest says {stated} samples but the samples file holds "
                          f"{counts.rows}: the folder was edited or damaged; regenerate it")
    if not out:
        raise CftuneError(f"{folder}: no usable CF samples ({counts.rows} records, all dropped)")
    return out, counts


def text_examples(path: str | Path, tokenizer, fmt: TaskFormat) -> tuple[list[dict], Counts]:
    """A generic text corpus (the `replay` baseline) as CF-stream examples: every token a target."""
    text_fmt = TaskFormat(**{**asdict(fmt), "shape": "text"})
    examples, counts = task_examples(path, tokenizer, text_fmt)
    for e in examples:
        e["source"] = CF
    return examples, counts


# ------------------------------------------------------------------------------------- caching
def tokenizer_key(tokenizer) -> str:
    """A content hash of a tokenizer (vocab, merges, specials, chat template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    extra = json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id,
                        tokenizer.eos_token_id, getattr(tokenizer, "add_bos_token", None)])
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def file_key(path: str | Path) -> str:
    """A content hash of a file, or of every file in a folder."""
    from cftune.models import file_sha256

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


def cached(parts: dict[str, Any], build) -> tuple[list[dict], Counts]:
    """`build()`'s examples, tokenised once and kept under the cftune cache, keyed by `parts`.

    The key holds content hashes of the inputs and every setting that changes the tokens, so a
    changed file or setting misses the cache rather than reusing stale examples. An entry is
    written to a private folder and renamed into place, so processes filling the same entry at
    once (DDP ranks) never see a half-written one.
    """
    import datasets

    from cftune.io import atomic_write_json, read_json
    from cftune.models import cache_dir

    blob = json.dumps({**parts, "v": CACHE_VERSION}, sort_keys=True).encode()
    folder = cache_dir() / "tokenized" / hashlib.sha256(blob).hexdigest()[:20]
    if (folder / "counts.json").is_file():
        return datasets.load_from_disk(str(folder / "examples")).to_list(), Counts(
            **read_json(folder / "counts.json"))
    examples, counts = build()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    except OSError:
        return examples, counts  # a read-only cache only costs re-tokenising next time
    try:
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        datasets.Dataset.from_list(examples).save_to_disk(str(tmp / "examples"))
        if bars:
            datasets.enable_progress_bars()
        atomic_write_json(tmp / "counts.json", asdict(counts))
        os.rename(tmp, folder)
    except OSError:
        pass  # another process filled this entry first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return examples, counts
