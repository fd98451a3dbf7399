"""Built-in task generators, named by a spec string such as `builtin:arithmetic`.

A spec string can stand wherever a task file path is accepted: callers check `is_builtin(spec)`
and call `resolve_task` instead of reading a file. Rows are GSM8K-format `{"question", "answer"}`
dicts, the final answer after `#### `, so the rest of cftune treats them like any GSM8K file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from cftune.errors import CftuneError
from cftune.io import atomic_write_text
from cftune.tasks import arithmetic

PREFIX = "builtin:"

# name -> generator(split, n, seed) -> rows
TASKS: dict[str, Callable[[str, int, int], list[dict[str, str]]]] = {
    "arithmetic": arithmetic.generate,
}


def is_builtin(spec: str | os.PathLike) -> bool:
    """True for a `builtin:NAME` spec (known or not: `resolve_task` reports unknown names)."""
    return str(spec).startswith(PREFIX)


def resolve_task(spec: str, split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows of the built-in task `spec` (e.g. "builtin:arithmetic"), split "train" | "test".

    Same (spec, split, n, seed) -> same rows; train and test never share a problem.
    """
    name = str(spec)[len(PREFIX):] if is_builtin(spec) else None
    if name not in TASKS:
        raise CftuneError(
            f"task '{spec}' is not a built-in task; allowed: "
            f"{', '.join(PREFIX + t for t in TASKS)} (or give a JSONL file path)"
        )
    return TASKS[name](split, n, seed)


def write_jsonl(rows: list[dict[str, str]], path: str | os.PathLike) -> Path:
    """Write rows as JSONL (one GSM8K row per line), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def export_task(spec: str, path: str | os.PathLike, split: str, n: int, seed: int = 0) -> Path:
    """Export `n` rows of a built-in task's `split` to a JSONL file (GSM8K format)."""
    return write_jsonl(resolve_task(spec, split, n, seed), path)
