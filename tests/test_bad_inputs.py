"""A catalogue of bad inputs (issue 15): every case runs in-process through `cftune.cli.main` on
tiny models, and a refused case must give exit code 2, exactly one line on stderr naming the
file/line/field/setting, no traceback, and leave nothing behind in the output folder.

Cases are rows of `CASES`: (id, builder, expected substrings). A builder gets an `Env` (the tiny
model, a good task file, a CF sample folder, a scratch folder) and returns the argv; it may write
bad files into the scratch folder first. `INJECTED` cases fail one write with ENOSPC (a full disk,
simulated: CI runs as root, so permissions alone would not block the write).
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_tiny_model

from cftune.cli import main


@dataclass
class Env:
    root: Path  # scratch folder of this case
    model: str
    ft: str  # a second tiny model of the same architecture (a "fine-tuned" one)
    cfs: str
    task: str

    @property
    def out(self) -> str:
        return str(self.root / "out")

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, *rows: object) -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def copy_cfs(self) -> Path:
        dest = self.root / "cfs"
        shutil.copytree(self.cfs, dest)
        return dest

    def model_without(self, suffix: str) -> str:
        """A copy of the tiny model folder without its weights or its tokenizer files."""
        dest = self.root / f"model-no-{suffix}"
        shutil.copytree(self.model, dest)
        for p in dest.iterdir():
            if (suffix == "weights" and p.suffix == ".safetensors") or \
                    (suffix == "tokenizer" and p.name.startswith(("tokenizer", "special_tokens",
                                                                   "chat_template"))):
                p.unlink()
        return str(dest)


# ------------------------------------------------------------------------ command lines
def train(e: Env, task: str | None = None, *flags: str) -> list[str]:
    return ["train", "--model", e.model, "--task", task or e.task, "--method", "full",
            "--max-steps", "1", "--batch-size", "2", "--dtype", "fp32", "--device", "cpu",
            "--save-steps", "100", "--out", e.out, *flags]


def train_cfs(e: Env, cfs: str | Path) -> list[str]:
    return train(e, None, "--method", "cfs", "--cfs", str(cfs))


def generate(e: Env, *flags: str) -> list[str]:
    return ["generate", "--model", e.model, "--num-samples", "2", "--max-new-tokens", "4",
            "--batch-size", "2", "--device", "cpu", "--out", e.out, *flags]


def evaluate(e: Env, *flags: str) -> list[str]:
    text = e.file("doc.txt", "Some text to score.\n")
    return ["eval", "--base", e.model, "--perplexity", text, "--device", "cpu", "--no-cache",
            "--out", e.out, *flags]


def merge(e: Env, *flags: str) -> list[str]:
    return ["merge", "--finetuned", e.ft, "--base", e.model, "--out", e.out, *flags]


def experiment(e: Env, **changes: object) -> str:
    """A tiny experiment config; a section given in `changes` (task, cf, eval, ...) is merged
    into the default one key by key, as `extends:` does, any other key replaced."""
    config: dict[str, object] = {
        "model": e.model,
        "task": {"train": "builtin:arithmetic", "test": "builtin:arithmetic", "train_rows": 4,
                 "test_rows": 2},
        "cf": {"max_new_tokens": 4, "heldout": 2, "batch_size": 2, "device": "cpu"},
        "train": {"max_steps": 1, "batch_size": 2, "dtype": "fp32", "device": "cpu"},
        "eval": {"task_limit": 2, "max_new_tokens": 4, "batch_size": 2},
        "runs": [{"name": "full", "method": "full"}],
    }
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = {**config[key], **value} if both else value  # type: ignore[dict-item]
    return e.file("exp.yaml", json.dumps(config))  # JSON is YAML


def run(e: Env, yaml_file: str) -> list[str]:
    return ["run", yaml_file, "--out", e.out]


def plan(e: Env, **changes: object) -> list[str]:
    """`cftune run --dry-run` of `experiment(e, **changes)`: a config the runner would plan
    without a word must be refused when it is read."""
    return [*run(e, experiment(e, **changes)), "--dry-run"]


def bench(e: Env, *rows: object) -> list[str]:
    """`cftune eval --bench mine=PATH` on a benchmark file of your own holding `rows`."""
    return evaluate(e, "--bench", "mine=" + e.jsonl("mine.jsonl", *rows))


def cut_last_line(folder: Path) -> Path:
    path = folder / "samples.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # a torn last record
    return folder


def edit_manifest(folder: Path, **counts: int) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["counts"].update(counts)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def other_tokenizer(folder: Path) -> Path:
    """A CF folder as if drawn from a model with another tokenizer (GPT-2's vocabulary)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 50257
    manifest["model_fingerprint"] = "sha256:" + "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def an_output_file(e: Env) -> None:
    (e.root / "out").write_text("precious\n")


PR = "prompt", "response"

# (id, argv builder, substrings the one error line must contain)
CASES: list[tuple[str, Callable[[Env], list[str]], tuple[str, ...]]] = [
    # --- malformed, empty and mis-encoded task files (train)
    ("jsonl-malformed", lambda e: train(e, e.file("t.jsonl", '{"prompt": "a", "response": "b"}\n'
                                                  '{"prompt": "a",\n')), ("t.jsonl line 2", "JSON")),
    ("jsonl-empty", lambda e: train(e, e.file("t.jsonl", "")), ("t.jsonl", "no rows")),
    ("jsonl-blank-lines", lambda e: train(e, e.file("t.jsonl", "\n  \n")), ("t.jsonl", "no rows")),
    ("jsonl-not-utf8", lambda e: train(e, e.file("t.jsonl", b"\xff\xfe\x00bad\n")),
     ("t.jsonl line 1", "UTF-8")),
    ("jsonl-not-utf8-line-3", lambda e: train(e, e.file("t.jsonl", (
        '{"prompt": "a", "response": "b"}\n' * 2).encode() + b'{"prompt": "\xe9", "response": "b"}\n')),
     ("t.jsonl line 3", "UTF-8")),
    ("json-malformed", lambda e: train(e, e.file("t.json", '{"prompt": ')), ("t.json line 1", "JSON")),
    ("csv-short-row", lambda e: train(e, e.file("t.csv", "prompt,response\nonly a prompt\n")),
     ("t.csv row 1", "`response`")),
    ("csv-unclosed-quote", lambda e: train(e, e.file("t.csv", 'prompt,response\n"a,b\n')),
     ("t.csv line", "CSV")),
    ("csv-empty", lambda e: train(e, e.file("t.csv", "")), ("t.csv", "no rows")),
    ("csv-not-utf8", lambda e: train(e, e.file("t.csv", b"prompt,response\n\xff,b\n")),
     ("t.csv", "UTF-8")),
    ("parquet-malformed", lambda e: train(e, e.file("t.parquet", b"not a parquet file")),
     ("t.parquet", "Parquet")),
    ("parquet-empty", lambda e: train(e, e.file("t.parquet", b"")), ("t.parquet", "Parquet")),
    ("unknown-suffix", lambda e: train(e, e.file("t.txt", "x")), ("t.txt", "unknown file type")),
    # --- wrong field names and types
    ("wrong-field-names", lambda e: train(e, e.jsonl("t.jsonl", {"question": "q", "answer": "a"})),
     ("t.jsonl row 1", "--prompt-field")),
    ("number-and-null", lambda e: train(e, e.jsonl("t.jsonl", {"prompt": 1, "response": None})),
     ("t.jsonl row 1", "`prompt`", "number")),
    ("null-response", lambda e: train(e, e.jsonl("t.jsonl", {"prompt": "a", "response": "b"},
                                                  {"prompt": "a", "response": None})),
     ("t.jsonl row 2", "`response`", "null")),
    ("list-response", lambda e: train(e, e.jsonl("t.jsonl", {"prompt": "a", "response": ["b"]})),
     ("t.jsonl row 1", "`response`", "list")),
    ("object-prompt", lambda e: train(e, e.jsonl("t.jsonl", {"prompt": {"text": "a"}, "response": "b"})),
     ("t.jsonl row 1", "`prompt`", "object")),
    ("bool-text", lambda e: train(e, e.jsonl("t.jsonl", {"text": True})), ("t.jsonl row 1", "`text`")),
    ("empty-response", lambda e: train(e, e.jsonl("t.jsonl", {"prompt": "a", "response": ""})),
     ("t.jsonl row 1", "`response`", "empty")),
    ("blank-prompt", lambda e: train(e, e.jsonl("t.jsonl", {"prompt": "  ", "response": "b"})),
     ("t.jsonl row 1", "`prompt`", "empty")),
    ("row-not-object", lambda e: train(e, e.file("t.jsonl", "[1, 2]\n")), ("t.jsonl row 1", "object")),
    ("messages-no-assistant", lambda e: train(e, e.jsonl("t.jsonl", {"messages": [
        {"role": "user", "content": "hi"}]})), ("t.jsonl row 1", "assistant")),
    ("messages-not-a-list", lambda e: train(e, e.jsonl("t.jsonl", {"messages": "hi"})),
     ("t.jsonl row 1", "`messages`")),
    ("messages-null-content", lambda e: train(e, e.jsonl("t.jsonl", {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]})),
     ("t.jsonl row 1", "content")),
    # --- CF sample folders
    ("cf-truncated-last-line", lambda e: train_cfs(e, cut_last_line(e.copy_cfs())),
     ("samples.jsonl line 8", "JSON")),
    ("cf-manifest-disagrees", lambda e: train_cfs(e, edit_manifest(e.copy_cfs(), samples=99)),
     ("manifest", "99", "8")),
    ("cf-manifest-malformed", lambda e: train_cfs(e, Path(e.file("cfs/manifest.json", "{")).parent),
     ("manifest.json line 1", "JSON")),
    ("cf-unfinished", lambda e: train_cfs(e, Path(e.file("cfs/progress.json", "{}")).parent),
     ("no manifest.json", "rerun")),
    ("cf-from-another-model", lambda e: [*train_cfs(e, e.cfs), "--model", e.ft],
     ("cfs/manifest.json", "another model", "cftune generate --model")),
    ("cf-from-another-tokenizer", lambda e: train_cfs(e, other_tokenizer(e.copy_cfs())),
     ("cfs/manifest.json", "another tokenizer (vocab 50257", "260")),
    # --- models
    ("model-without-weights", lambda e: train(e, None, "--model", e.model_without("weights")),
     ("model-no-weights",)),
    ("model-without-tokenizer", lambda e: generate(e, "--model", e.model_without("tokenizer")),
     ("model-no-tokenizer", "tokenizer")),
    ("gguf-not-gguf", lambda e: evaluate(e, "--base", e.file("fake.gguf", "not a gguf file\n")),
     ("fake.gguf", "GGUF")),
    ("model-missing", lambda e: merge(e, "--base", str(e.root / "nowhere")), ("nowhere",)),
    # --- numeric settings
    ("generate-negative", lambda e: generate(e, "--num-samples", "-1"), ("num_samples",)),
    ("generate-nan", lambda e: generate(e, "--temperature", "nan"), ("temperature", "nan")),
    ("generate-inf", lambda e: generate(e, "--top-p", "inf"), ("top_p", "inf")),
    ("generate-not-a-number", lambda e: generate(e, "--max-new-tokens", "lots"),
     ("max_new_tokens", "lots")),
    ("train-zero", lambda e: train(e, None, "--batch-size", "0"), ("batch_size", ">= 1")),
    ("train-nan", lambda e: train(e, None, "--learning-rate", "nan"), ("learning_rate", "nan")),
    ("train-inf", lambda e: train(e, None, "--cfs-ratio", "inf"), ("cfs_ratio", "inf")),
    ("train-fraction-for-int", lambda e: train(e, None, "--max-steps", "1.5"), ("max_steps", "1.5")),
    ("eval-zero", lambda e: evaluate(e, "--batch-size", "0"), ("batch_size", "> 0")),
    ("eval-negative", lambda e: evaluate(e, "--limit", "-2"), ("limit", "-2")),
    ("merge-out-of-range", lambda e: merge(e, "--alpha", "1.5"), ("alpha", "1.5")),
    ("train-negative-eval-steps", lambda e: train(e, None, "--eval-steps", "-1"),
     ("`eval_steps` = -1 must be >= 0",)),
    ("train-negative-save-total-limit", lambda e: train(e, None, "--save-total-limit", "-1"),
     ("`save_total_limit` = -1 must be >= 0",)),
    ("train-negative-mmap-threshold", lambda e: train(e, None, "--mmap-threshold", "-1"),
     ("`mmap_threshold` = -1 must be >= 0",)),
    ("generate-negative-min-tokens", lambda e: generate(e, "--min-tokens", "-1"),
     ("min_tokens must be >= 0 (got -1)",)),
    # --- negative counts in a runner config (issue 32, item 4): `rows[:-5]` would keep all but
    # the last 5 rows, `limit: -10` all but the last 10 items, `instruction_limit: -1` one less
    ("run-negative-train-rows", lambda e: plan(e, task={"train": e.task, "train_rows": -5}),
     ("exp.yaml: task: task.train_rows must be >= 0 (got -5)", "0 = all")),
    ("run-negative-test-rows", lambda e: plan(e, task={"test_rows": -2}),
     ("exp.yaml: task: task.test_rows must be >= 0 (got -2)",)),
    ("run-zero-builtin-rows", lambda e: plan(e, task={"train_rows": 0}),
     ("exp.yaml: task: task.train_rows must be >= 1 for builtin:arithmetic (got 0)",)),
    ("run-negative-limit", lambda e: plan(e, eval={"limit": -10}),
     ("exp.yaml: eval: eval.limit must be >= 1 (got -10)", "items per benchmark")),
    ("run-negative-instruction-limit", lambda e: plan(e, eval={"instruction_limit": -1}),
     ("exp.yaml: eval: eval.instruction_limit must be >= 1 (got -1)",)),
    ("run-counts-listed-at-once", lambda e: plan(e, eval={"task_limit": 0, "batch_size": -1,
                                                          "max_new_tokens": 0}),
     ("eval.task_limit must be >= 1 (got 0)", "eval.max_new_tokens must be >= 1 (got 0)",
      "eval.batch_size must be >= 1 (got -1)")),
    ("run-zero-instruction-samples", lambda e: plan(e, eval={"instruction_samples": 0}),
     ("exp.yaml: eval: eval.instruction_samples must be >= 1 (got 0)",)),
    ("run-negative-instruction-tokens", lambda e: plan(e, eval={"instruction_max_new_tokens": -8}),
     ("eval.instruction_max_new_tokens must be >= 1 (got -8)",)),
    ("run-negative-replay-rows", lambda e: plan(e, replay={"rows": -3}),
     ("exp.yaml: replay: replay.rows must be >= 0 (got -3)",)),
    ("run-negative-contextual-tokens", lambda e: plan(e, contextual={"max_new_tokens": -1}),
     ("exp.yaml: contextual: contextual.max_new_tokens must be >= 1 (got -1)",)),
    ("run-one-heldout-sample", lambda e: plan(e, cf={"heldout": 1}),
     ("exp.yaml: cf.heldout must be an integer >= 2 (got 1)",)),
    ("run-heldout-not-a-number", lambda e: plan(e, cf={"heldout": "lots"}),
     ("exp.yaml: cf.heldout must be an integer >= 2 (got 'lots')",)),
    ("run-seed-not-a-number", lambda e: plan(e, seed="one"),
     ("exp.yaml: seed must be an integer (got 'one')",)),
    ("run-negative-cf-batch", lambda e: plan(e, cf={"batch_size": -4}),
     ("exp.yaml: cf: batch_size must be > 0 (got -4)",)),
    ("run-negative-train-batch", lambda e: plan(e, train={"batch_size": -2}),
     ("exp.yaml: run 'full'", "`batch_size` = -2 must be >= 1")),
    # --- a benchmark file of your own (issue 32, item 4): an item with one choice is always
    # right, repeated choices always tie (the first wins)
    ("bench-one-choice", lambda e: bench(e, {"context": "2+2=", "choices": ["4", "5"], "gold": 0},
                                         {"context": "3+3=", "choices": ["6"], "gold": 0}),
     ("mine.jsonl line 2", "`choices` holds one choice", "give at least two choices")),
    ("bench-repeated-choices", lambda e: bench(e, {"context": "2+2=", "choices": ["4", "5", "4"],
                                                   "gold": 0}),
     ("mine.jsonl line 1", "`choices` repeats '4' (choices 0 and 2)", "make the choices distinct")),
    ("bench-repeated-options", lambda e: bench(e, {"sentence": "The _ fell.", "option1": "cup",
                                                   "option2": "cup", "answer": "1"}),
     ("mine.jsonl line 1", "`option1/option2` repeats 'cup'")),
    ("merge-nan", lambda e: merge(e, "--alpha", "nan"), ("alpha", "nan")),
    # --- unknown names (with a suggestion) and malformed YAML
    ("unknown-method", lambda e: train(e, None, "--method", "cfz"), ("`method`", "did you mean cfs")),
    ("unknown-flag", lambda e: train(e, None, "--learnig-rate", "0.1"),
     ("--learnig-rate", "did you mean --learning-rate")),
    ("unknown-yaml-key", lambda e: train(e, None, "--config", e.file("c.yaml", "learning_rat: 0.1\n")),
     ("c.yaml", "learning_rat", "did you mean learning_rate")),
    ("yaml-malformed", lambda e: merge(e, "--config", e.file("c.yaml", "alpha: [0.5,\n")),
     ("c.yaml line", "YAML")),
    ("yaml-not-a-mapping", lambda e: merge(e, "--config", e.file("c.yaml", "- 0.5\n")),
     ("c.yaml", "mapping")),
    ("yaml-wrong-type", lambda e: merge(e, "--config", e.file("c.yaml", "alpha: [0.5]\n")),
     ("alpha", "float")),
    ("unknown-benchmark", lambda e: evaluate(e, "--bench", "arc_esy"),
     ("arc_esy", "did you mean arc_easy")),
    ("run-unknown-key", lambda e: run(e, experiment(e, trian={"max_steps": 1})),
     ("exp.yaml", "trian", "did you mean train")),
    ("run-unknown-method", lambda e: run(e, experiment(e, runs=[{"name": "a", "method": "ful"}])),
     ("exp.yaml", "ful", "did you mean full")),
    ("run-yaml-malformed", lambda e: run(e, e.file("exp.yaml", "model: [\n")), ("exp.yaml", "YAML")),
    ("run-empty-yaml", lambda e: run(e, e.file("exp.yaml", "")), ("exp.yaml", "runs")),
    # --- output paths that are files
    ("train-out-is-file", lambda e: an_output_file(e) or train(e), ("out", "is a file")),
    ("generate-out-is-file", lambda e: an_output_file(e) or generate(e), ("out", "file")),
    ("eval-out-is-file", lambda e: an_output_file(e) or evaluate(e), ("out", "is a file")),
    ("merge-out-is-file", lambda e: an_output_file(e) or merge(e), ("out", "is a file")),
    ("run-out-is-file", lambda e: an_output_file(e) or run(e, experiment(e)), ("out", "is a file")),
]

# (id, argv builder, name of the write that fails with ENOSPC, expected substrings)
INJECTED: list[tuple[str, Callable[[Env], list[str]], str, tuple[str, ...]]] = [
    ("generate-disk-full", generate, "manifest.json", ("manifest.json", "No space left")),
    ("train-disk-full", train, "manifest.json", ("manifest.json", "No space left")),
    ("eval-disk-full", evaluate, "eval.json", ("eval.json", "No space left")),
    ("merge-disk-full", merge, "manifest.json", ("manifest.json", "No space left")),
    ("run-disk-full", lambda e: run(e, experiment(e)), "train.jsonl", ("train.jsonl", "No space left")),
]


@pytest.fixture(scope="module")
def shared(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{i}+1?", "response": f"{i + 1}"}) + "\n"
                            for i in range(4)))
    assert main(["generate", "--model", str(tiny_model), "--num-samples", "8", "--max-new-tokens",
                 "6", "--batch-size", "4", "--device", "cpu", "--out", str(root / "cfs")]) == 0
    ft = make_tiny_model(root / "ft", seed=1)
    return {"model": str(tiny_model), "ft": str(ft), "cfs": str(root / "cfs"), "task": str(task)}


@pytest.fixture
def env(shared, tmp_path, monkeypatch) -> Env:
    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "case").mkdir()
    return Env(root=tmp_path / "case", **shared)


def call(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return int(e.code)


def check_refused(capsys, code: int, expect: tuple[str, ...], after_work: bool = False) -> str:
    """Exit code 2 and one error line. A refusal comes before any work, so stderr is that line
    alone; a failure `after_work` (a full disk at the end) may follow progress bars."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, f"exit code {code}; stderr: {err[-3000:]}"
    assert "Traceback" not in captured.err + captured.out
    if after_work:
        assert [ln for ln in err.splitlines() if "error" in ln.lower()] == [err.splitlines()[-1]], err
        err = err.splitlines()[-1]
    assert len(err.splitlines()) == 1, err
    for part in expect:
        assert part in err, f"{part!r} not in: {err}"
    return err


@pytest.mark.parametrize("case_id, build, expect", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line_and_nothing_left(env, capsys, case_id, build, expect):
    argv = build(env)
    out = Path(env.out)
    before = out.read_bytes() if out.is_file() else None
    check_refused(capsys, call(argv), expect)
    if before is not None:  # an output path that is a file: left as it was
        assert out.read_bytes() == before
    else:
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("case_id, build, target, expect", INJECTED, ids=[c[0] for c in INJECTED])
def test_full_disk_is_one_line_and_nothing_reads_as_finished(env, capsys, monkeypatch, case_id,
                                                            build, target, expect):
    import importlib
    import pkgutil

    import cftune
    import cftune.io

    real = cftune.io.atomic_write_text

    def full_disk(path, text):
        if Path(path).name == target:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    for info in pkgutil.walk_packages(cftune.__path__, "cftune."):  # lazily imported ones too
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name, module in list(sys.modules.items()):  # every module that imported the writer
        if name.startswith("cftune") and getattr(module, "atomic_write_text", None) is real:
            monkeypatch.setattr(module, "atomic_write_text", full_disk)
    check_refused(capsys, call(build(env)), expect, after_work=True)
    out = Path(env.out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert not {"manifest.json", "eval.json", "results.json"} & set(left), left
    assert not [p for p in left if Path(p).name.startswith(".")], left  # no temp files


def test_utf8_bom_is_accepted_with_a_note(env, capsys):
    task = env.file("t.jsonl", "\ufeff" + json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert call(train(env, task)) == 0
    err = capsys.readouterr().err
    assert "t.jsonl" in err and "byte-order mark" in err
    assert json.loads((Path(env.out) / "manifest.json").read_text())["counts"]["task"][
        "bom_skipped"] == 1  # and in the manifest's counts
    csv_task = env.file("t.csv", "\ufeffprompt,response\na,b\n")
    assert call(train(env, csv_task, "--out", str(env.root / "out2"))) == 0
    assert "byte-order mark" in capsys.readouterr().err
    assert json.loads((env.root / "out2" / "manifest.json").read_text())["counts"]["task"][
        "bom_skipped"] == 1


def test_over_long_rows_are_cut_with_a_note_and_counted(env, capsys):
    """A 50,000-word response is cut to --max-length (its start kept); a 50,000-word prompt leaves
    no response to learn once cut, so that row is dropped: both said in one line and counted."""
    words = "word " * 50_000
    task = env.jsonl("t.jsonl", {"prompt": "a", "response": "b"},
                     {"prompt": "Say it.", "response": words}, {"prompt": words, "response": "b"})
    assert call(train(env, task, "--max-length", "64")) == 0
    out = capsys.readouterr().out
    assert "task data: 2 examples of 3 rows (1 truncated, 1 dropped)" in out, out
    counts = json.loads((Path(env.out) / "manifest.json").read_text())["counts"]["task"]
    assert (counts["rows"], counts["kept"], counts["truncated"], counts["dropped"]) == (3, 2, 1, 1)


def test_a_library_that_fails_to_load_is_named_with_its_fix(monkeypatch, capsys, tmp_path):
    """An OSError without errno is a library that failed to load (a package built for another
    torch), not the file system: the line says to reinstall it, not to free space."""
    import cftune.generate.stage
    from cftune.cli import main

    def broken(config):
        raise OSError("Could not load this library: /x/lib/_torchaudio.so")

    monkeypatch.setattr(cftune.generate.stage, "generate", broken)
    assert main(["generate", "--out", str(tmp_path / "o"), "--num-samples", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "_torchaudio.so" in err
    assert "reinstall the package it names" in err and "free space" not in err
