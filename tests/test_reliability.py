"""Promises of issue 15 beyond the bad-input catalogue: no pickles in a trained model folder or in
the code that loads files, and one writer per output folder (a lock that names its holder and is
taken over when its holder was killed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cftune.cli import main
from cftune.errors import CftuneError
from cftune.locking import lock_paths, output_lock

SRC = Path(__file__).resolve().parents[1] / "src" / "cftune"
# What a model folder may hold: weights as safetensors, JSON (config, settings, manifest, log)
# and tokenizer files (tokenizer.json, a sentencepiece .model, chat template, merges/vocab), the
# model card (README.md).
ALLOWED_SUFFIXES = {".safetensors", ".json", ".jsonl", ".jinja", ".txt", ".model", ".md"}


def test_trained_model_folder_holds_no_pickles(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{i}+1?", "response": str(i + 1)}) + "\n"
                            for i in range(4)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model), "--task", str(task), "--method", "full",
                 "--max-steps", "2", "--batch-size", "2", "--save-steps", "1", "--dtype", "fp32",
                 "--device", "cpu", "--out", str(out)]) == 0
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert not [f for f in files if f.suffix not in ALLOWED_SUFFIXES], files
    for f in files:  # nor a pickle under another name (torch.save: zip "PK" or protocol 0x80)
        assert (out / f).read_bytes()[:2] not in (b"PK", b"\x80\x02", b"\x80\x04"), f
    assert {"model.safetensors", "training_args.json", "manifest.json"} <= {f.name for f in files}
    assert json.loads((out / "training_args.json").read_text())["max_steps"] == 2


def test_source_never_unpickles_nor_trusts_remote_code_by_default():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "pickle" not in text.replace("pickles", ""), path
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        assert not re.search(r"trust_remote_code\s*:\s*bool\s*=\s*field\(\s*True", text), path


# ------------------------------------------------------------------------ one writer per folder
HOLD = textwrap.dedent("""
    import sys, time
    from cftune.locking import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


def hold_lock(folder: Path) -> subprocess.Popen:
    """A process holding `folder`'s lock (it says "held" once it has it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "RANK": "0"})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tiny_model, tmp_path, capsys):
    out = tmp_path / "evals"
    proc = hold_lock(out)
    try:
        doc = tmp_path / "doc.txt"
        doc.write_text("Some text.\n")
        assert main(["eval", "--base", str(tiny_model), "--perplexity", str(doc), "--device",
                     "cpu", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"pid {proc.pid}" in err and str(out) in err and len(err.splitlines()) == 1
        with pytest.raises(CftuneError, match=f"being written by pid {proc.pid}"):
            with output_lock(out):
                pass
        with output_lock(out, main=False):  # another rank of the holder's launch: passes
            pass
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "cfs"
    proc = hold_lock(out)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9: no chance to release anything
    proc.wait()
    lock_file, pid_file = lock_paths(out)
    assert pid_file.read_text().split()[0] == str(proc.pid)  # what it left behind
    with output_lock(out):
        assert pid_file.read_text().split()[0] == str(os.getpid())
    assert f"left by pid {proc.pid}" in capsys.readouterr().err
    assert not pid_file.exists() and not out.exists()  # released; nothing created in OUT
    with output_lock(out):  # and free again
        pass


def test_only_the_main_rank_takes_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    with output_lock(out):
        assert not lock_paths(out)[1].exists()
    monkeypatch.setenv("RANK", "0")
    with output_lock(out):
        assert lock_paths(out)[1].read_text().split()[0] == str(os.getpid())


def test_merge_renames_a_whole_folder_into_place(tiny_model, tmp_path):
    from conftest import make_tiny_model

    ft = make_tiny_model(tmp_path / "ft", seed=1)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.json").write_text("{}")  # an older merge's leftovers are replaced, not mixed in
    assert main(["merge", "--finetuned", str(ft), "--base", str(tiny_model), "--alpha", "0.5",
                 "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "stale.json").exists() and (out.stat().st_mode & 0o777) == 0o755
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
