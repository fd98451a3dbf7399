"""Files every stage writes and reads: atomic writes, crash-safe JSONL appends, manifests.

A stage's output is finished when its `manifest.json` exists, so it is written last and every
write is atomic (a temp file renamed into place): a killed job leaves either the old file or the
new one, never half of one, and rerunning the same command resumes. `fault_point` lets the
reliability tests kill a process at a named moment (env `CFTUNE_FAULT=event:N`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cftune.errors import CftuneError

PROGRESS = "progress.json"

_FAULT_SEEN: dict[str, int] = {}


MANIFEST = "manifest.json"


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
