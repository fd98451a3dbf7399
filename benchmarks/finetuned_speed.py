"""Does a fine-tuned model score slower than its base? (issue 32, item 2)

An earlier session measured evaluations of fine-tuned folders 20-28% slower than the base's on the
same items in fp32 on one machine (not on an AMD EPYC). This scores the same multiple-choice items
with the base and with fine-tuned folders, in slices taken in turn (base, fine-tuned, then the
other order, ...) in one process, so a background load slows all alike, and prints per model:
items/s, CPU seconds, and the facts each suspected cause would show: the weights' dtypes, whether
every weight is contiguous, whether the output layer is tied to the input embedding, how many
weights are subnormal (denormal floats slow some CPUs' arithmetic) and where the weights live
(memory-mapped from the safetensors file, as transformers loads them, or anonymous memory).
`--copy` adds each fine-tuned model again with its weights copied into anonymous memory.

    .venv/bin/python benchmarks/finetuned_speed.py RUN_FOLDER [RUN_FOLDER ...] --limit 100

The last line is `ratio X.XXx`: the slowest fine-tuned model's seconds over the base's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cftune.evaluate.benchmarks import load
from cftune.evaluate.multiple_choice import encode_pair
from cftune.models import DEFAULT_MODEL, load_model, load_tokenizer
from cftune.scoring import score_continuations

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def facts(model) -> str:
    """dtypes, contiguity, tying, subnormal weights and the weights' memory (file-backed or not)."""
    params = dict(model.named_parameters())
    tiny = torch.finfo(torch.float32).tiny
    subnormal = sum(int(((p != 0) & (p.abs() < tiny)).sum()) for p in params.values())
    mapped = _file_backed_bytes(params.values())
    total = sum(p.numel() * p.element_size() for p in params.values())
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return (f"dtypes {sorted({str(p.dtype) for p in params.values()})}, "
            f"contiguous {all(p.is_contiguous() for p in params.values())}, "
            f"tied {out.weight.data_ptr() == emb.weight.data_ptr()}, subnormal weights {subnormal}, "
            f"file-backed {mapped / total:.0%}")


def _file_backed_bytes(params) -> int:
    """Bytes of the weights that lie in a file mapping (/proc/self/maps; Linux only)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("/"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            spans.append((lo, hi))
    return sum(p.numel() * p.element_size() for p in params
               if any(lo <= p.data_ptr() < hi for lo, hi in spans))


def anonymous_copy(model):
    """The model with every weight copied into freshly allocated (anonymous) memory."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    model.tie_weights()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="fine-tuned model folders of the base")
    ap.add_argument("--base", default=DEFAULT_MODEL)
    ap.add_argument("--bench", default="arc_easy")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--slice", type=int, default=10, help="items scored by one model in a turn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--copy", action="store_true", help="also each run with anonymous weights")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    models = {"base": load_model(args.base, "cpu", args.dtype, inference=True)}
    for run in args.runs:
        models[Path(run).name] = load_model(run, "cpu", args.dtype, inference=True)
        if args.copy:
            models[Path(run).name + " (copied)"] = anonymous_copy(
                load_model(run, "cpu", args.dtype, inference=True))
    items = load(args.bench, args.limit, args.data_dir).items
    per_item = [len(it.contexts) for it in items]
    requests = [encode_pair(tokenizer, c, k) for it in items
                for c, k in zip(it.contexts, it.continuations)]
    for model in models.values():  # warm-up: every weight page touched before timing
        score_continuations(model, requests[:per_item[0]], args.batch_size, args.dtype, pad_id=pad_id)
    seconds = dict.fromkeys(models, 0.0)
    cpu = dict.fromkeys(models, 0.0)
    starts = [sum(per_item[:k]) for k in range(0, len(per_item), args.slice)] + [len(requests)]
    for s, (a, b) in enumerate(zip(starts, starts[1:])):
        names = list(models) if s % 2 == 0 else list(reversed(models))
        for name in names:
            t, c = time.perf_counter(), time.process_time()
            score_continuations(models[name], requests[a:b], args.batch_size, args.dtype, pad_id=pad_id)
            seconds[name] += time.perf_counter() - t
            cpu[name] += time.process_time() - c
    for name, model in models.items():
        print(f"{name:40s} {len(items) / seconds[name]:6.2f} items/s, {cpu[name]:6.1f} CPU s "
              f"({seconds[name] / seconds['base']:.3f}x base); {facts(model)}")
    print(f"({args.bench} x {len(items)}, dtype {args.dtype}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()})")
    slowest = max(seconds[n] for n in models if n != "base")
    print(f"ratio {slowest / seconds['base']:.2f}x")


if __name__ == "__main__":
    main()
