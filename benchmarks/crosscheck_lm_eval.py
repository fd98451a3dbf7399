"""Cross-check cftune's multiple-choice scoring against lm-evaluation-harness on the same items.

Both score the first N items of local llm-foundry files (default: 200 ARC-Easy, 200 PIQA) with
the embedded default model. lm-eval runs its HF backend on the converted model folder, with a task
config that reads the same JSONL file and rebuilds the prompt of its own arc_easy / piqa task
("Question: {question}\\nAnswer:", " " + choice). Prints both accuracies, both speeds, the ratio.

Needs lm-eval in the venv, installed without moving any pinned version:
    .venv/bin/pip freeze | grep -v -e '^-e' -e '@ file' > /tmp/pins.txt
    .venv/bin/pip install -c /tmp/pins.txt lm-eval        # or: pip install -e '.[crosscheck]'
Run it alone on the CPU (it takes minutes):
    flock /tmp/cftune-cpu.lock .venv/bin/python benchmarks/crosscheck_lm_eval.py --limit 200
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import cftune.evaluate.benchmarks as benchmarks
from cftune.evaluate.multiple_choice import mc_metrics, score_items
from cftune.models import DEFAULT_MODEL, load_model, load_tokenizer, local_path

# the llm-foundry `query` already starts with "Question: "; strip() drops PIQA's trailing newline
LM_EVAL_TEXT = "{{query.strip()}}\nAnswer:"


def lm_eval_task(name: str, path: str) -> dict:
    """An lm-eval task config over a local llm-foundry JSONL file (`query`, `choices`, `gold`)."""
    return {
        "task": f"cftune_crosscheck_{name}", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": path}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": LM_EVAL_TEXT,
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }


def timed(fn) -> dict:
    """fn()'s result dict with its wall-clock and process CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    out.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu)
    return out


def score_lm_eval(lm, name: str, path: str, limit: int) -> dict:
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm, tasks=[lm_eval_task(name, path)], limit=limit,
                                  bootstrap_iters=0, log_samples=True)
    task = f"cftune_crosscheck_{name}"
    docs = sorted(res["samples"][task], key=lambda d: d["doc_id"])
    return {"acc": res["results"][task]["acc,none"], "acc_norm": res["results"][task]["acc_norm,none"],
            "lls": [[float(x[0]) for x in d["filtered_resps"]] for d in docs]}


def score_cftune(model, tokenizer, name: str, limit: int, batch_size: int, data_dir) -> dict:
    loaded = benchmarks.load(name, limit, data_dir)
    scored = score_items(model, tokenizer, loaded.items, batch_size, desc=name)
    return {**mc_metrics(loaded.items, scored), "lls": [[s.logprob for s in item] for item in scored]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--bench", default="arc_easy,piqa", help="registry names of llm-foundry MC files")
    p.add_argument("--limit", type=int, default=200, help="first N items of each")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir", default=None, help="default: $CFTUNE_DATA or ../shared/data")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="time each side this often, alternating; "
                   "report the fastest")
    args = p.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(args.threads)
    names = args.bench.split(",")
    model = load_model(args.model, device="cpu")
    tokenizer = load_tokenizer(args.model)
    lm = HFLM(pretrained=local_path(args.model), device="cpu", batch_size=args.batch_size,
              dtype="float32")
    ours, theirs = {}, {}
    for n in names:  # alternate the two sides so both see the same machine load
        path = str(benchmarks.resolve(n, args.data_dir)[1])
        for _ in range(args.repeats):
            o = timed(lambda n=n: score_cftune(model, tokenizer, n, args.limit, args.batch_size,
                                               args.data_dir))
            t = timed(lambda n=n, path=path: score_lm_eval(lm, n, path, args.limit))
            ours[n] = min(o, ours.get(n, o), key=lambda r: r["seconds"])
            theirs[n] = min(t, theirs.get(n, t), key=lambda r: r["seconds"])

    print(f"\nmodel {args.model}, first {args.limit} items, batch {args.batch_size}, "
          f"{args.threads} threads, fp32 CPU, fastest of {args.repeats} alternating run(s)")
    print(f"{'benchmark':10} {'acc cftune':>10} {'lm-eval':>8} {'acc_norm cftune':>15} {'lm-eval':>8}"
          f" {'items/s cftune':>14} {'lm-eval':>8} {'ratio':>6} {'CPU-s ratio':>11}")
    for n in names:
        o, t = ours[n], theirs[n]
        print(f"{n:10} {o['acc']:10.4f} {t['acc']:8.4f} {o['acc_norm']:15.4f} {t['acc_norm']:8.4f}"
              f" {o['n'] / o['seconds']:14.2f} {o['n'] / t['seconds']:8.2f}"
              f" {t['seconds'] / o['seconds']:5.2f}x {t['cpu_seconds'] / o['cpu_seconds']:10.2f}x")
    print("ratio = lm-eval seconds / cftune seconds (wall clock; CPU-s: process CPU time, less "
          "sensitive to other jobs on the machine)")
    for n in names:
        pairs = [(a, b) for x, y in zip(ours[n]["lls"], theirs[n]["lls"]) for a, b in zip(x, y)]
        argmax = [max(range(len(x)), key=x.__getitem__) for x in ours[n]["lls"]]
        their_argmax = [max(range(len(y)), key=y.__getitem__) for y in theirs[n]["lls"]]
        print(f"{n}: max |log-likelihood difference| over {len(pairs)} choices = "
              f"{max(abs(a - b) for a, b in pairs):.2e}; items with another prediction: "
              f"{sum(a != b for a, b in zip(argmax, their_argmax))}")


if __name__ == "__main__":
    main()
