"""Training throughput: cftune `full` against the plain transformers `Trainer` a user would write,
the step time of `kd` against `mix` (issue 3, "Speed"), and the chunked output-layer loss against
the full logits (`before`), with gradient checkpointing on top, and with freed memory returned to
the system as well (`--mmap-threshold`, cftune.memory) (tokens/s and peak memory, each run in
its own process). Prints one JSON line.

Same model, examples (tokenised once by `cftune.train.data`), batch size, dtype and number of steps for
both engines; the plain run uses `DataCollatorForSeq2Seq` (padding to the longest row of randomly
drawn batches) and the model's own loss. Throughput is real (non-padding) tokens per second over
the steps after the first (warm-up excluded). Targets: cftune/plain >= 1.3, kd/mix <= 1.1.

    flock /tmp/cftune-cpu.lock .venv/bin/python benchmarks/train_throughput.py --only throughput
    flock /tmp/cftune-cpu.lock .venv/bin/python benchmarks/train_throughput.py --only kd
    flock /tmp/cftune-cpu.lock .venv/bin/python benchmarks/train_throughput.py --only chunked \
        --method cfs --batch-size 16

Task data: `--task FILE` (JSONL with question/answer), else GSM8K's train split from
../shared/data when present (varied lengths, as real task data has), else the built-in arithmetic
task. `--device cuda` measures on a GPU: peak memory is then the GPU's peak allocation
(`torch.cuda.max_memory_allocated`) beside the process's RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cftune import memory
from cftune.generate.config import GenerateConfig
from cftune.generate.stage import generate
from cftune.models import DEFAULT_MODEL, load_model, load_tokenizer
from cftune.tasks import resolve_task, write_jsonl
from cftune.train import data
from cftune.train.config import TrainConfig
from cftune.train.stage import train

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def task_file(folder: Path, rows: int, given: str | None = None) -> Path:
    source = Path(given) if given else GSM8K
    if source.is_file():
        lines = source.read_text().splitlines()[:rows]
        return write_jsonl([json.loads(x) for x in lines], folder / "task.jsonl")
    return write_jsonl(resolve_task("builtin:arithmetic", "train", rows), folder / "task.jsonl")


def plain_trainer(config: TrainConfig, examples: list[dict]) -> tuple[float, int]:
    """The obvious setup: Trainer + DataCollatorForSeq2Seq + the model's loss. (tokens/s, pad %)"""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    tok = load_tokenizer(config.model)
    model = load_model(config.model, device=config.device, dtype="fp32")
    model.train()
    rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
             "labels": e["labels"]} for e in examples]
    collate = DataCollatorForSeq2Seq(tok, padding="longest")
    seen = {"tokens": [], "padded": []}

    def counting(batch):
        out = collate(batch)
        seen["tokens"].append(int(out["attention_mask"].sum()))
        seen["padded"].append(out["attention_mask"].numel())
        return out

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
        bf16=config.dtype != "fp32", use_cpu=config.device == "cpu", report_to="none", save_strategy="no",
        logging_steps=1000, disable_tqdm=True, seed=config.seed)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=counting,
            callbacks=[Clock()]).train()
    tokens = sum(seen["tokens"][1:config.max_steps])
    padding = 1 - sum(seen["tokens"]) / sum(seen["padded"])
    return tokens / (times[-1] - times[1]), round(100 * padding, 1)


def cftune_run(config: TrainConfig) -> tuple[float, float]:
    """(tokens/s, mean step seconds) of a cftune run, first step excluded."""
    log = [json.loads(x) for x in (train(config) / "training_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r][1:]
    seconds = sum(r["seconds"] for r in steps)
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in steps)
    return tokens / seconds, statistics.mean(r["seconds"] for r in steps)


def _measure_child(config: dict, queue) -> None:
    import resource

    tokens_per_s, step_s = cftune_run(TrainConfig(**config))
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    queue.put((tokens_per_s, step_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               gpu))


def isolated_run(config: TrainConfig) -> tuple[float, float, float, float | None]:
    """(tokens/s, mean step seconds, peak RSS GiB, peak GPU allocation GiB or None) of a cftune
    run in a fresh process, so the peak memory is this run's alone."""
    import dataclasses
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure_child, args=(dataclasses.asdict(config), queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--only", choices=("throughput", "kd", "chunked"),
                   help="run one comparison (default: throughput and kd)")
    p.add_argument("--method", default="full", choices=("full", "cfs"),
                   help="method of the chunked-loss comparison (cfs: batch_size CF rows on top)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--task", help="task JSONL (question/answer); default GSM8K from ../shared")
    a = p.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="cftune-bench-"))
    task = task_file(root, a.rows, a.task)
    fields = {"prompt_field": "question", "response_field": "answer"}
    common = dict(model=a.model, task=str(task), max_steps=a.steps, batch_size=a.batch_size,
                  max_length=a.max_length, dtype=a.dtype, device=a.device, learning_rate=1e-5,
                  save_steps=10_000, **fields)
    full = TrainConfig(out=str(root / "full"), method="full", **common)
    examples, _ = data.task_examples(task, load_tokenizer(a.model), full.task_format())
    figures: dict[str, float | int | str | None] = {
        "task": a.task or ("gsm8k" if GSM8K.is_file() else "arithmetic"), "steps": a.steps,
        "batch_size": a.batch_size, "dtype": a.dtype, "device": a.device}
    if a.only == "chunked":
        cf = {}
        if a.method == "cfs":
            cf = {"cfs": str(generate(GenerateConfig(
                model=a.model, out=str(root / "cf"), device=a.device,
                num_samples=a.steps * a.batch_size, max_new_tokens=a.max_length, dtype=a.dtype)))}
        # `before`: the full logits, as training ran before issue 13; `_mmap`: with freed
        # memory returned to the system (`--mmap-threshold 1048576`, cftune.memory).
        ckpt = {"chunked_loss": True, "gradient_checkpointing": True}
        variants = {"before": {"chunked_loss": False}, "chunked": {"chunked_loss": True},
                    "chunked_ckpt": ckpt,
                    "chunked_ckpt_mmap": {**ckpt, "mmap_threshold": memory.DEFAULT_THRESHOLD}}
        for tag, switches in variants.items():
            tps, step_s, peak, gpu = isolated_run(TrainConfig(
                out=str(root / tag), method=a.method, **switches, **cf, **common))
            figures.update({f"{tag}_tokens_per_s": round(tps, 1), f"{tag}_step_s": round(step_s, 3),
                            f"{tag}_peak_gib": round(peak, 2),
                            f"{tag}_gpu_peak_gib": None if gpu is None else round(gpu, 2)})
            print(json.dumps({k: v for k, v in figures.items() if k.startswith(tag)}), flush=True)
        mem_key = "gpu_peak_gib" if figures["chunked_gpu_peak_gib"] is not None else "peak_gib"
        figures.update(method=a.method, memory=mem_key)
        for tag in list(variants)[1:]:  # each against `before`, measured in this run
            figures[f"{tag}_speed_ratio"] = round(
                figures[f"{tag}_tokens_per_s"] / figures["before_tokens_per_s"], 3)
            figures[f"{tag}_memory_ratio"] = round(
                figures[f"{tag}_{mem_key}"] / figures[f"before_{mem_key}"], 3)
        print(json.dumps(figures))
        return
    if a.only != "kd":
        figures["plain_tokens_per_s"], figures["plain_padding_pct"] = plain_trainer(full, examples)
        figures["cftune_tokens_per_s"], _ = cftune_run(full)
        figures["speedup"] = round(figures["cftune_tokens_per_s"] / figures["plain_tokens_per_s"], 3)
        for k in ("plain_tokens_per_s", "cftune_tokens_per_s"):
            figures[k] = round(figures[k], 1)
    if a.only != "throughput":
        cfs = generate(GenerateConfig(model=a.model, out=str(root / "cf"), device=a.device,
                                      num_samples=a.steps * a.batch_size, max_new_tokens=128,
                                      topk_logprobs=a.topk, dtype=a.dtype))
        _, mix_s = cftune_run(TrainConfig(out=str(root / "mix"), method="cfs", cfs=str(cfs), **common))
        _, kd_s = cftune_run(TrainConfig(out=str(root / "kd"), method="kd", cfs=str(cfs), **common))
        figures.update(mix_step_s=round(mix_s, 3), kd_step_s=round(kd_s, 3),
                       kd_over_mix=round(kd_s / mix_s, 3))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
