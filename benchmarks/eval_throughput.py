"""Throughput of shared-prefix scoring against one row per (context, continuation) pair (issue 32).

The same items are scored both ways by `cftune.scoring.score_continuations` (`shared_prefix=True`
and `False`), in one process, in slices of `--slice` items taken in turn (per-pair then shared,
then shared then per-pair, ...), so that a background load slows both alike. Per benchmark it
prints items/s both ways and their ratio (and the ratio of process CPU seconds, steadier than
wall time when other jobs share the CPU), the largest per-choice log-likelihood difference, and
peak memory: the process's resident set size sampled with psutil every 5 ms while a way scores
(the highest sample, and its rise over the RSS at the slice's start; the model itself is in both).
The last line is `speedup X.XXx`: items/s of shared-prefix scoring over per-pair scoring, all
benchmarks together (per-pair seconds / shared seconds).

Benchmarks: ARC-Easy, ARC-Challenge and PIQA from ../shared/data, and `hellaswag`, a file of
HellaSwag's shape ({context, choices, gold}: a long context, four endings): ../shared/data has no
HellaSwag, so it is built from real text, LAMBADA passages cut before their last 20 words (the
gold ending), with the endings of the next three passages as the wrong choices.

    .venv/bin/python benchmarks/eval_throughput.py --limit 40 --threads 1

On a 2-core machine busy with another job, 2 torch threads ran several times slower than 1
(threads wait for each other at every operation), so measure with `--threads 1` there.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from cftune.evaluate.benchmarks import load
from cftune.evaluate.multiple_choice import encode_pair
from cftune.models import DEFAULT_MODEL, load_model, load_tokenizer
from cftune.scoring import score_continuations

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ENDING_WORDS = 20


def hellaswag_shaped(data_dir: Path, n: int, out: Path) -> Path:
    """Write `n` HellaSwag-shaped items from LAMBADA passages to `out` (see the module doc)."""
    lines = (data_dir / "lambada" / "lambada_openai_test.llmfoundry.jsonl").read_text().splitlines()
    passages = []
    for line in lines[: n + 3]:
        rec = json.loads(line)
        words = (rec["context"] + " " + rec["continuation"] + ".").split()
        passages.append((" ".join(words[:-ENDING_WORDS]), " ".join(words[-ENDING_WORDS:])))
    with out.open("w") as f:
        for k in range(n):
            endings = [passages[k + j][1] for j in range(4)]
            gold = k % 4
            endings[0], endings[gold] = endings[gold], endings[0]
            f.write(json.dumps({"context": passages[k][0], "choices": endings, "gold": gold}) + "\n")
    return out


class PeakRSS:
    """Highest RSS of this process (bytes), sampled every 5 ms in a thread while inside."""

    def __enter__(self) -> PeakRSS:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def time_both(model, requests: list, per_item: list[int], args, pad_id: int) -> dict:
    """Wall and CPU seconds, peak RSS and its rise (MiB), and the scores of both ways, slice by
    slice in turn."""
    out = {way: {"seconds": 0.0, "cpu": 0.0, "peak": 0.0, "rise": 0.0, "scored": []}
           for way in ("per-pair", "shared")}
    starts = [sum(per_item[:k]) for k in range(0, len(per_item) + 1, args.slice)]
    if starts[-1] != len(requests):
        starts.append(len(requests))
    for s, (a, b) in enumerate(zip(starts, starts[1:])):
        ways = ("per-pair", "shared") if s % 2 == 0 else ("shared", "per-pair")
        for way in ways:
            t, cpu = time.perf_counter(), time.process_time()
            with PeakRSS() as rss:
                scored = score_continuations(model, requests[a:b], args.batch_size, args.dtype,
                                             pad_id=pad_id, shared_prefix=way == "shared")
            r = out[way]
            r["seconds"] += time.perf_counter() - t
            r["cpu"] += time.process_time() - cpu
            r["peak"] = max(r["peak"], rss.peak / 2**20)
            r["rise"] = max(r["rise"], (rss.peak - rss.start) / 2**20)
            r["scored"] += scored
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--limit", type=int, default=40, help="items per benchmark (the first N)")
    ap.add_argument("--slice", type=int, default=10, help="items scored one way before the other")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward (as cftune eval)")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a busy machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, "cpu", args.dtype, inference=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    totals = {"per-pair": 0.0, "shared": 0.0}
    for shared_prefix in (False, True):  # warm-up: first-call set-up is in neither way's time
        score_continuations(model, [([1, 2, 3], [4, 5])] * 2, shared_prefix=shared_prefix)
    with tempfile.TemporaryDirectory() as tmp:
        hellaswag = hellaswag_shaped(args.data_dir, args.limit, Path(tmp) / "hellaswag.jsonl")
        for name in ("arc_easy", "arc_challenge", "piqa", str(hellaswag)):
            items = load(name, args.limit, args.data_dir).items
            requests = [encode_pair(tokenizer, c, k) for it in items
                        for c, k in zip(it.contexts, it.continuations)]
            out = time_both(model, requests, [len(it.contexts) for it in items], args, pad_id)
            diff = max(abs(a.logprob - b.logprob)
                       for a, b in zip(out["per-pair"]["scored"], out["shared"]["scored"]))
            tokens = sum(len(c) + len(k) for c, k in requests) / len(items)
            line = [f"{Path(name).stem:13s} {len(items)} items, {tokens:.0f} tokens/item:"]
            for way, r in out.items():
                totals[way] += r["seconds"]
                line.append(f"{way} {len(items) / r['seconds']:6.2f} items/s "
                            f"(peak RSS {r['peak']:.0f} MiB, +{r['rise']:.0f})")
            ratio = out["per-pair"]["seconds"] / out["shared"]["seconds"]
            cpu_ratio = out["per-pair"]["cpu"] / out["shared"]["cpu"]
            print(" ".join(line) + f" ratio {ratio:.2f}x (CPU time {cpu_ratio:.2f}x), "
                  f"max |dLL| {diff:.1e}", flush=True)
    print(f"(model {args.model}, dtype {args.dtype}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}, per-pair {totals['per-pair']:.0f} s, "
          f"shared {totals['shared']:.0f} s)")
    print(f"speedup {totals['per-pair'] / totals['shared']:.2f}x")


if __name__ == "__main__":
    main()
