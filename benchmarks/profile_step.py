"""Where a training step's time goes: torch.profiler over a few steps of a cftune run, with the
chunked output-layer loss and with the full logits, the top operators of each side by side.

Why: on an H200 the chunked loss ran Gemma-3-270m 5-7x slower per step than the full logits
while the head loss alone, timed apart, was as fast (docs/benchmarks.md); the cause lies in the
step around it. This prints, per variant, the mean step time and the operators with the most
self time (device time on a GPU, CPU time otherwise), so one run on a GPU names the culprit.

    .venv/bin/python benchmarks/profile_step.py --model /tmp/gemma --device cuda --task gsm8k.jsonl
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from train_throughput import task_file
from transformers import TrainerCallback

from cftune.models import DEFAULT_MODEL
from cftune.train.config import TrainConfig
from cftune.train.stage import train


class Profile(TrainerCallback):
    """Profiles optimizer steps [start, start + steps) (the first ones warm up kernels/caches)."""

    def __init__(self, start: int, steps: int, device: str):
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.start, self.steps = start, steps
        self.prof = torch.profiler.profile(activities=acts)
        self.events = None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.start:
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.start + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self.events = self.prof.key_averages()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--task", help="task JSONL (question/answer); default GSM8K from ../shared")
    p.add_argument("--warmup", type=int, default=2, help="steps before profiling")
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cftune-profile-"))
    task = task_file(root, a.batch_size * (a.warmup + a.steps), a.task)
    sort = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
    for tag, chunked in (("full_logits", False), ("chunked", True)):
        prof = Profile(a.warmup, a.steps, a.device)
        train(TrainConfig(model=a.model, task=str(task), out=str(root / tag), method="full",
                          max_steps=a.warmup + a.steps, batch_size=a.batch_size,
                          max_length=a.max_length, dtype=a.dtype, device=a.device,
                          learning_rate=1e-5, save_steps=10_000, chunked_loss=chunked,
                          prompt_field="question", response_field="answer"), callbacks=[prof])
        print(f"== {tag}: {a.steps} steps after {a.warmup}, by {sort}")
        print(prof.events.table(sort_by=sort, row_limit=a.top), flush=True)


if __name__ == "__main__":
    main()
