"""The runner's data stages: the task split and the replay corpus, written as the JSONL files
training and evaluation read (every other stage is a library call: generate, train, merge,
evaluate)."""

from __future__ import annotations

from pathlib import Path

from cftune.errors import CftuneError
from cftune.experiment.config import Experiment, ReplaySpec
from cftune.io import iter_jsonl
from cftune.tasks import is_builtin, resolve_task, write_jsonl


def write_task_data(exp: Experiment, train_file: Path, test_file: Path) -> None:
    """The task's train and test rows as JSONL files: a builtin task generated, a file's first
    `train_rows` / `test_rows` rows (0: all) copied."""
    t = exp.task
    for spec, split, n, path in ((t.train, "train", t.train_rows, train_file),
                                 (t.test, "test", t.test_rows, test_file)):
        if is_builtin(spec):
            write_jsonl(resolve_task(spec, split, n, t.seed), path)
        else:
            src = Path(spec)
            if not src.is_file():
                raise CftuneError(f"{exp.path}: task.{split} file {src} not found")
            rows = list(iter_jsonl(src)) if src.suffix == ".jsonl" else None
            if rows is None:
                raise CftuneError(f"{exp.path}: task.{split}: the runner reads JSONL "
                                  f"task files (got {src.suffix})")
            write_jsonl(rows[: n or None], path)


def write_replay(spec: ReplaySpec, replay_file: Path) -> None:
    """The replay baseline's corpus: each row's `fields` joined into one `text` row."""
    rows = []
    for n, row in enumerate(iter_jsonl(Path(spec.file)), 1):
        missing = [f for f in spec.fields if f not in row]
        if missing:
            raise CftuneError(f"{spec.file} line {n}: no field(s) {', '.join(missing)} "
                              "(set replay.fields)")
        rows.append({"text": spec.join.join(str(row[f]) for f in spec.fields)})
        if spec.rows and len(rows) >= spec.rows:
            break
    write_jsonl(rows, replay_file)
