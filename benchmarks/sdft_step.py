"""The cost of an SDFT step (`method: sdft`, TRL's SDFTTrainer) against a plain fine-tuning step
(`full`): seconds per optimizer step of each, run one after the other in this process on the same
GSM8K rows, model and settings (configs/comparison.yaml's: chat prompts, 8 task prompts per step,
max_length 384, bf16, completions of up to 160 tokens). An SDFT step samples a completion per
prompt, runs the teacher (the base shown the reference) and the student over it; a `full` step
is one forward and backward pass over prompt + reference.

Seconds per step are the training log's wall time per step, averaged over the steps after the
first (the first holds set-up); with `--steps 1`, the one step. The last line is the ratio.

    flock /tmp/cftune-cpu.lock .venv/bin/python benchmarks/sdft_step.py --steps 5

Task data: `--task FILE` (JSONL with question/answer), else GSM8K's train split from
../shared/data when present, else the built-in arithmetic task. Needs TRL (`make install-trl`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from train_throughput import GSM8K, task_file  # the same rows as the training benchmark

from cftune.models import DEFAULT_MODEL
from cftune.train.config import LOG, TrainConfig
from cftune.train.stage import train


def seconds_per_step(config: TrainConfig) -> float:
    """Mean wall seconds of the logged steps after the first (the only one if there is one)."""
    log = [json.loads(x) for x in (train(config) / LOG).read_text().splitlines()]
    seconds = [r["seconds"] for r in log if "loss" in r]
    return statistics.mean(seconds[1:] or seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--completion-length", type=int, default=160,
                   help="sdft_max_completion_length (the comparison's)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--task", help="task JSONL (question/answer); default GSM8K from ../shared")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cftune-bench-sdft-"))
    task = task_file(root, a.rows, a.task)
    common = dict(model=a.model, task=str(task), prompt_field="question", response_field="answer",
                  prompt_format="chat", max_steps=a.steps, batch_size=a.batch_size,
                  max_length=a.max_length, dtype=a.dtype, device=a.device, learning_rate=5e-4,
                  warmup=0.05, save_steps=10_000)
    full = seconds_per_step(TrainConfig(out=str(root / "full"), method="full", **common))
    sdft = seconds_per_step(TrainConfig(out=str(root / "sdft"), method="sdft",
                                        sdft_max_completion_length=a.completion_length, **common))
    print(json.dumps({"task": a.task or ("gsm8k" if GSM8K.is_file() else "arithmetic"),
                      "model": a.model, "steps": a.steps, "batch_size": a.batch_size,
                      "dtype": a.dtype, "device": a.device,
                      "completion_length": a.completion_length,
                      "full_s_per_step": round(full, 3), "sdft_s_per_step": round(sdft, 3)}))
    print(f"full {full:.2f} s/step, sdft {sdft:.2f} s/step: sdft/full = {sdft / full:.2f}")


if __name__ == "__main__":
    main()
