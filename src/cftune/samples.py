"""The context-free sample file format: records, manifest, crash-safe appends, loading and export.

A sample folder holds `samples.jsonl` (or `samples.parquet`) and `manifest.json`. The manifest is
written last, so its presence means generation finished (STYLE.md §5). While a run is in progress,
`progress.json` holds its settings so a restarted run can check it is continuing the same job.

Record contract (DESIGN.md): `id` (the sample's seed index), `text`, `token_ids` (the sampled ids,
ending with the EOS id when `finished`; the prefix is never included), `n_tokens`, `finished`,
`logp_base` (sum of the base model's untempered log-probs of `token_ids` given the prefix), and
optionally `topk_ids` / `topk_logprobs` (one list of K per position of `token_ids`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cftune.errors import CftuneError

SAMPLES_JSONL = "samples.jsonl"
SAMPLES_PARQUET = "samples.parquet"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
EXPORTS = ("trl", "axolotl", "text")
_FAULT_SEEN: dict[str, int] = {}


def fault_point(event: str) -> None:
    """Fault injection for tests/test_kill.py; does nothing unless `CFTUNE_FAULT` is set.

    `CFTUNE_FAULT=<event>:<n>` kills this process with SIGKILL (no cleanup, as `kill -9`) the n-th
    time it reaches `event`. Events: `write:<file name>` (an atomic write, its temporary file
    written, not yet renamed), `append:<file name>` (a JSONL append, half the line written),
    `checkpoint` (a Trainer checkpoint, weights saved, optimizer and state not yet).
    """
    spec = os.environ.get("CFTUNE_FAULT")
    if not spec or spec.rpartition(":")[0] != event:
        return
    _FAULT_SEEN[event] = _FAULT_SEEN.get(event, 0) + 1
    if _FAULT_SEEN[event] == int(spec.rpartition(":")[2]):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CftuneError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CftuneError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished sample folder (an error if generation never finished)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        hint = " (generation did not finish: rerun the same `cftune generate` command to resume)" \
            if (folder / PROGRESS).is_file() else ""
        raise CftuneError(f"{folder}: no {MANIFEST}; not a finished cftune sample folder{hint}")
    return read_json(folder / MANIFEST)


class JsonlAppender:
    """Append whole JSON lines, flushed at once; on open, drop a torn last line left by a kill.

    Truncating to the last newline on start makes every visible line a complete record whatever
    moment the previous process died at (issue 2, "Resume, never lose data").
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        truncate_to_last_newline(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        if os.environ.get("CFTUNE_FAULT"):  # tests/test_kill.py: die with half the line written
            self._f.write(line[:len(line) // 2])
            self._f.flush()
            fault_point(f"append:{self.path.name}")
            line = line[len(line) // 2:]
        self._f.write(line)
        self._f.flush()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def truncate_to_last_newline(path: Path) -> None:
    """Cut a file back to its last complete line (no-op when it ends with a newline or is absent)."""
    if not path.exists():
        return
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                end = start + idx + 1
                if end != size:
                    f.truncate(end)
                return
            pos = start
        f.truncate(0)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file; a malformed or non-UTF-8 line is an error naming file and line.

    Lines are decoded one by one, so a bad byte is reported at its line; a UTF-8 byte-order mark
    (Windows editors write one) is skipped with a note."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
                note_bom(path)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CftuneError(f"{path} line {lineno}: not UTF-8 text (byte {raw[e.start]:#04x} "
                                  f"at column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise CftuneError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None


BOM = b"\xef\xbb\xbf"


def note_bom(path: Path) -> None:
    """Say, in one line, that a file's UTF-8 byte-order mark was skipped (accepted input)."""
    print(f"cftune: note: {path} starts with a UTF-8 byte-order mark; skipped it", file=sys.stderr)


def samples_file(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    for name in (SAMPLES_PARQUET, SAMPLES_JSONL):
        if (folder / name).is_file():
            return folder / name
    raise CftuneError(f"{folder}: no {SAMPLES_JSONL} or {SAMPLES_PARQUET} found")


def iter_samples(folder: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every record of a finished sample folder, in id order."""
    read_manifest(folder)
    path = samples_file(folder)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    else:
        yield from iter_jsonl(path)


def load_samples(folder: str | os.PathLike):
    """A finished sample folder as a `datasets.Dataset` (one row per record)."""
    import datasets

    path = samples_file(folder)
    read_manifest(folder)
    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def write_parquet(records: Iterable[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(records))
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def export(folder: str | os.PathLike, kind: str, prefix_ids: list[int], prefix_text: str) -> Path:
    """Write a file another trainer loads unchanged.

    - `trl`: `trl.jsonl` with pre-tokenised `input_ids` (prefix + sample), `completion_mask`
      (1 on sample tokens) and `labels` (-100 on the prefix): TRL's SFTTrainer takes it as a
      tokenised dataset; a plain `Trainer` uses `labels` directly.
    - `axolotl`: `axolotl.jsonl` with `{"text"}` (prefix text + sample text) for `type: completion`.
    - `text`: `text.jsonl` with the sample text alone as `{"text"}`.
    """
    if kind not in EXPORTS:
        raise CftuneError(f"--export '{kind}' is not one of {', '.join(EXPORTS)}")
    folder = Path(folder)
    out = folder / f"{kind}.jsonl"
    lines = []
    for r in iter_samples(folder):
        if kind == "trl":
            ids = list(prefix_ids) + list(r["token_ids"])
            row = {
                "input_ids": ids,
                "completion_mask": [0] * len(prefix_ids) + [1] * len(r["token_ids"]),
                "labels": [-100] * len(prefix_ids) + list(r["token_ids"]),
            }
        elif kind == "axolotl":
            row = {"text": prefix_text + r["text"]}
        else:
            row = {"text": r["text"]}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + ("\n" if lines else ""))
    return out
