"""Kill -9 anywhere (issue 15, part 2): `cftune generate`, `train` and `run` are killed with
SIGKILL at seeded random points, the same command is rerun until it finishes, and the result must
equal an uninterrupted run: generate's samples file byte for byte, train's final weights within
float tolerance (same thread count), run's results table (timing columns aside).

Two kinds of kill point:
- named events, through the `CFTUNE_FAULT=<event>:<n>` hook of `cftune.samples.fault_point`:
  `append:samples.jsonl` (half a record written), `write:progress.json` / `write:manifest.json` /
  `write:result.json` (an atomic write, the temporary file written, not yet renamed), and
  `checkpoint` (a Trainer checkpoint half saved: weights, no optimizer or state); the n-th
  occurrence is drawn from the seed;
- random times: SIGKILL a seeded random delay after the process has started working.

Each test is one chain on one output folder (kill, check, rerun the same command, kill again, ...,
finish) against one uninterrupted run made in-process at the same thread count (1). After every
kill, nothing unfinished may look finished: a manifest is absent or complete, and without it the
folder is refused by what reads it. The lock a killed process leaves beside the folder
(`cftune.locking`) is taken over by the rerun, for real.

Replay a failure with the seed it printed: `CFTUNE_KILL_SEED=<seed> pytest tests/test_kill.py`
(random-time kills also depend on the machine's speed; the printed delays say where they landed).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_run import write_config

from cftune.cli import main
from cftune.errors import CftuneError
from cftune.generate.samples import iter_samples
from cftune.locking import lock_paths

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("CFTUNE_KILL_SEED") or random.SystemRandom().randrange(1_000_000))
TAKEOVER = "took over the lock"


@pytest.fixture()
def rng(request) -> random.Random:
    print(f"kill seed {SEED} (replay: CFTUNE_KILL_SEED={SEED} pytest {request.node.nodeid})")
    return random.Random(f"{SEED}-{request.node.name}")


@pytest.fixture()
def one_thread(tmp_path, monkeypatch):
    """In-process reference runs at the subprocesses' thread count, with their cache."""
    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CFTUNE_FAULT", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Chain:
    """One command, launched again and again on one output folder (`lock_of`) until it finishes;
    each launch may be killed at a named event or after a random delay."""

    def __init__(self, argv: list[str], tmp: Path, lock_of: Path, rng: random.Random):
        self.argv, self.tmp, self.rng = argv, tmp, rng
        self.pid_file = lock_paths(lock_of)[1]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false", "CFTUNE_CACHE": str(tmp / "cache")}
        self.env.pop("CFTUNE_FAULT", None)
        self.n = 0

    def _launch(self, fault: str | None = None) -> tuple[subprocess.Popen, Path]:
        self.n += 1
        log = self.tmp / f"launch-{self.n}.log"
        env = {**self.env, **({"CFTUNE_FAULT": fault} if fault else {})}
        with open(log, "wb") as f:  # the child holds its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "cftune", *self.argv], env=env,
                                    stdout=f, stderr=subprocess.STDOUT)
        return proc, log

    @staticmethod
    def _wait(proc: subprocess.Popen, log: Path, timeout: float = 180) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # only the process this test started
            proc.wait()
            raise AssertionError(f"{log}: still running after {timeout} s:\n{_tail(log)}") from None

    def kill_at(self, event: str, n: int) -> str:
        """Launch with `CFTUNE_FAULT=event:n`; it must die by SIGKILL there. Returns its output."""
        left = self.pid_file.exists()
        proc, log = self._launch(f"{event}:{n}")
        rc = self._wait(proc, log)
        print(f"launch {self.n}: killed at {event}:{n} (rc {rc})")
        assert rc == -signal.SIGKILL, f"not killed at {event}:{n} (rc {rc}):\n{_tail(log)}"
        out = log.read_text()
        assert not left or TAKEOVER in out, f"lock left by a killed run not taken over:\n{out}"
        return out

    def kill_after(self, started: Callable[[Path], bool], max_delay: float) -> None:
        """Launch, wait until `started(log)` says it is working, SIGKILL a random delay later."""
        delay = self.rng.uniform(0, max_delay)
        proc, log = self._launch()
        deadline = time.time() + 120
        while proc.poll() is None and not started(log) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # the pid this test started, nothing else
        rc = self._wait(proc, log)
        print(f"launch {self.n}: SIGKILL {delay:.3f} s after it started working "
              f"({'killed' if rc == -signal.SIGKILL else f'finished first, rc {rc}'})")
        assert rc in (0, -signal.SIGKILL), _tail(log)

    def finish(self) -> str:
        """The same command without a kill: it must finish, taking over a left lock."""
        left = self.pid_file.exists()
        proc, log = self._launch()
        rc = self._wait(proc, log)
        out = log.read_text()
        print(f"launch {self.n}: finished (rc {rc})")
        assert rc == 0, _tail(log)
        assert not left or TAKEOVER in out, f"lock left by a killed run not taken over:\n{out}"
        assert not self.pid_file.exists()  # released
        return out


def _tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _modified_since(path: Path, t0: float) -> Callable[[Path], bool]:
    return lambda log: path.exists() and path.stat().st_mtime > t0


def _json_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path}: a partial last line in a finished file"
    return [json.loads(line) for line in data.splitlines()]


# ----------------------------------------------------------------------- what a kill may leave
def check_sample_folder(folder: Path) -> None:
    """Finished (a complete manifest, every record whole and counted) or refused as unfinished."""
    if (folder / "progress.json").exists():
        json.loads((folder / "progress.json").read_text())  # written atomically: never torn
    if (folder / "manifest.json").exists():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert len(_json_lines(folder / "samples.jsonl")) == manifest["counts"]["samples"]
    else:
        with pytest.raises(CftuneError, match="not a finished cftune sample folder"):
            list(iter_samples(folder))


def check_train_folder(folder: Path) -> None:
    """Finished (a complete manifest, loadable weights) or refused as a model: no half-written
    weights are ever taken for a trained model."""
    from safetensors.torch import load_file

    from cftune.models import resolve

    if (folder / "manifest.json").exists():
        assert json.loads((folder / "manifest.json").read_text())["stage"] == "train"
        load_file(folder / "model.safetensors")
        json.loads((folder / "train_config.json").read_text())
    elif (folder / "training_log.jsonl").exists():  # weights may be there, maybe half written
        with pytest.raises(CftuneError, match="unfinished"):
            resolve(folder)


def check_experiment(folder: Path) -> None:
    """Every stage folder finished or unfinished as above; results.json absent or complete."""
    if (folder / "results.json").exists():
        assert isinstance(json.loads((folder / "results.json").read_text()), list)
    for cf in (folder / "cf").glob("*"):
        if cf.is_dir():
            check_sample_folder(cf)
    for run in (folder / "runs").glob("*"):
        if (run / "training_log.jsonl").exists():  # a training run's folder (not a merge's)
            check_train_folder(run)
    for ev in (folder / "evals").glob("*/result.json"):
        json.loads(ev.read_text())


# ------------------------------------------------------------------------------------ generate
GEN = ["--num-samples", "400", "--max-new-tokens", "24", "--batch-size", "8", "--device", "cpu",
       "--seed", "3"]


def test_generate_killed_anywhere_resumes_to_the_same_bytes(tiny_model, tmp_path, rng, one_thread):
    clean = tmp_path / "clean"
    assert main(["generate", "--model", str(tiny_model), *GEN, "--out", str(clean)]) == 0
    wall = json.loads((clean / "manifest.json").read_text())["wall_time_s"]
    out = tmp_path / "killed"
    chain = Chain(["generate", "--model", str(tiny_model), *GEN, "--out", str(out)], tmp_path,
                  out, rng)
    samples = out / "samples.jsonl"
    chain.kill_after(lambda log: samples.exists(), 0.4 * wall)  # at most ~half the ids drawn
    check_sample_folder(out)
    if rng.random() < 0.5:
        chain.kill_at("append:samples.jsonl", rng.randint(1, 100))  # half a record on disk
        assert samples.read_bytes()[-1:] != b"\n", "the kill should leave a torn last line"
    else:
        chain.kill_at("write:progress.json", rng.randint(2, 4))  # between blocks
    check_sample_folder(out)
    chain.kill_at("write:manifest.json", 1)  # every sample written, the manifest not yet
    assert not (out / "manifest.json").exists()
    check_sample_folder(out)
    chain.finish()
    check_sample_folder(out)
    assert samples.read_bytes() == (clean / "samples.jsonl").read_bytes()
    m, c = (json.loads((f / "manifest.json").read_text()) for f in (out, clean))
    assert m["counts"] == {**c["counts"], "resumed_from": m["counts"]["resumed_from"]}
    assert m["counts"]["resumed_from"] == c["counts"]["samples"]  # the last kill left them all


# --------------------------------------------------------------------------------------- train
def train_argv(tiny_model: Path, task: Path, cfs: Path, out: Path) -> list[str]:
    return ["train", "--model", str(tiny_model), "--task", str(task), "--method", "cfs",
            "--cfs", str(cfs), "--max-steps", "30", "--save-steps", "3", "--batch-size", "2",
            "--learning-rate", "1e-3", "--dtype", "fp32", "--device", "cpu", "--resume",
            "--out", str(out)]


def test_train_killed_anywhere_resumes_to_the_same_weights(tiny_model, tmp_path, rng, one_thread):
    from safetensors.torch import load_file
    from test_data import make_cf_folder

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i + 3}?",
                                        "response": f"{i}+{i + 3}={2 * i + 3}"}) + "\n"
                            for i in range(40)))
    cfs = make_cf_folder(tmp_path / "cfs", tiny_model, 80)
    clean = tmp_path / "clean"
    assert main(train_argv(tiny_model, task, cfs, clean)) == 0
    seconds = json.loads((clean / "manifest.json").read_text())["seconds"]
    out = tmp_path / "killed"
    chain = Chain(train_argv(tiny_model, task, cfs, out), tmp_path, out, rng)
    log = out / "training_log.jsonl"
    chain.kill_after(lambda _: log.exists(), 0.3 * seconds)  # some steps and checkpoints in
    check_train_folder(out)
    chain.kill_at("checkpoint", rng.randint(1, 2))  # weights saved, optimizer and state not
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    assert ckpts and not (ckpts[-1] / "trainer_state.json").exists(), "not a half-saved checkpoint"
    check_train_folder(out)
    chain.kill_at("write:manifest.json", 1)  # the model saved, the manifest not yet
    assert not (out / "manifest.json").exists() and (out / "model.safetensors").exists()
    check_train_folder(out)
    chain.finish()
    check_train_folder(out)
    a, b = load_file(out / "model.safetensors"), load_file(clean / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    m, c = (json.loads((f / "manifest.json").read_text()) for f in (out, clean))
    assert m["steps"] == c["steps"] == 30 and m["counts"] == c["counts"]
    steps = [r["step"] for r in _json_lines(out / "training_log.jsonl") if "loss" in r]
    assert steps == list(range(1, 31))  # each step logged once, whatever was redone
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------------------- run
TIMING = ("wall_time_s", "tokens")  # columns that measure the machine, not the result


def write_experiment(tmp_path: Path, model: Path) -> Path:
    """test_run's tiny experiment, with a checkpoint every 2 of 6 steps to kill around."""
    return write_config(tmp_path, model,
                        train={"max_steps": 6, "batch_size": 2, "learning_rate": 1e-2,
                               "dtype": "fp32", "device": "cpu", "save_steps": 2},
                        runs=[{"name": "cfs", "method": "cfs", "cfs_ratio": 1.0},
                              {"name": "wise", "method": "wise-ft", "of": "cfs", "alphas": [0.5]}])


def results_without_timing(folder: Path) -> dict[str, object]:
    """results.json flattened to {"row.key.subkey": value}, without the timing columns."""
    flat: dict[str, object] = {}

    def walk(obj: object, key: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{key}[{i}]")
        else:
            flat[key] = obj

    for row in json.loads((folder / "results.json").read_text()):
        walk({k: v for k, v in row.items() if k not in TIMING}, row["run"])
    return flat


def test_run_killed_anywhere_resumes_to_the_same_results(tiny_model, tmp_path, rng, one_thread):
    exp = write_experiment(tmp_path, tiny_model)
    clean = tmp_path / "clean"
    assert main(["run", str(exp), "--out", str(clean)]) == 0
    out = tmp_path / "killed"
    chain = Chain(["run", str(exp), "--out", str(out)], tmp_path, out, rng)
    # In a fresh run: manifests 1 CF pool, 2 held-out CF set, 3 training run (checkpoints at
    # steps 2 and 4 left), 4 merge; results 1-3 the evaluations of base, cfs, wise-a0.5.
    event, n = rng.choice([("checkpoint", 1), ("checkpoint", 2), ("write:manifest.json", 2),
                           ("write:manifest.json", 3), ("write:result.json", 1),
                           ("write:result.json", 2)])
    chain.kill_at(event, n)
    check_experiment(out)
    chain.kill_after(lambda log: "== [" in log.read_text(errors="replace"), 1.5)
    check_experiment(out)
    chain.finish()
    check_experiment(out)
    got, want = results_without_timing(out), results_without_timing(clean)
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        else:
            assert got[k] == v, k


def test_fault_hook_is_inert_unless_its_event_comes(tmp_path, monkeypatch):
    from cftune.io import JsonlAppender, atomic_write_text

    monkeypatch.delenv("CFTUNE_FAULT", raising=False)
    atomic_write_text(tmp_path / "a.json", "{}\n")
    monkeypatch.setenv("CFTUNE_FAULT", "write:other.json:1")  # another file's event
    atomic_write_text(tmp_path / "a.json", "[]\n")
    with JsonlAppender(tmp_path / "s.jsonl") as f:  # split in two writes, whole on disk
        f.write({"a": 1})
    assert (tmp_path / "a.json").read_text() == "[]\n"
    assert (tmp_path / "s.jsonl").read_text() == '{"a":1}\n'
