"""Throughput of `cftune generate`'s sampler against a plain `model.generate` loop.

Same model, batch size, number of samples, max new tokens and plain T=1 sampling, in one process;
prints useful tokens/s of both (tokens up to and including EOS) and the ratio.

    .venv/bin/python benchmarks/generate_throughput.py --num-samples 128 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import time

import torch

from cftune.generate.config import stop_ids
from cftune.generate.sampler import ContinuousSampler
from cftune.generate.sampling import Job, SamplingParams
from cftune.models import DEFAULT_MODEL, autocast, load_model, load_tokenizer


def plain_generate(model, tokenizer, n: int, batch: int, max_new: int, dtype: str) -> int:
    """The loop a user would write: batches of BOS prompts through `model.generate`."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = set(stop_ids(tokenizer, model.generation_config))
    useful = 0
    torch.manual_seed(0)
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        ids = torch.full((rows, 1), bos, dtype=torch.long, device=model.device)
        with autocast(model.device, dtype):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
                                 pad_token_id=tokenizer.pad_token_id or min(eos))
        for row in out[:, 1:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            useful += len(row) if stop is None else stop + 1
    return useful


def cftune_sample(model, tokenizer, n: int, batch: int, max_new: int, dtype: str) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sampler = ContinuousSampler(model, SamplingParams(max_new_tokens=max_new),
                                stop_ids(tokenizer, model.generation_config), seed=0, batch_size=batch, dtype=dtype)
    return sum(len(d.token_ids) for d in sampler.run(Job(i, (bos,)) for i in range(n)))


def vllm_sample(spec: str, tokenizer, stops: list[int], n: int, max_new: int,
                dtype: str) -> tuple[int, float, float]:
    """(useful tokens, seconds, engine start seconds) of `--engine vllm` on the same jobs; its
    start (model load, warm-up compilation) is timed apart, as a long run amortises it."""
    from cftune.generate.vllm_engine import VLLMSampler
    from cftune.models import local_path

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    t = time.perf_counter()
    sampler = VLLMSampler(local_path(spec), SamplingParams(max_new_tokens=max_new), stops, 0, dtype)
    start = time.perf_counter() - t
    t = time.perf_counter()
    tokens = sum(len(d.token_ids) for d in sampler.run(Job(i, (bos,)) for i in range(n)))
    return tokens, time.perf_counter() - t, start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    ap.add_argument("--vllm", action="store_true", help="also time `--engine vllm` (needs vllm)")
    args = ap.parse_args()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.device, args.dtype, inference=True)
    shape = (model, tokenizer, args.num_samples, args.batch_size, args.max_new_tokens, args.dtype)
    results = {}
    for name, fn in (("model.generate", plain_generate), ("cftune", cftune_sample)):
        t = time.perf_counter()
        tokens = fn(*shape)
        wall = time.perf_counter() - t
        results[name] = tokens / wall
        print(f"{name:15s} {tokens:7d} tokens in {wall:7.1f} s = {tokens / wall:7.1f} tokens/s")
    if args.vllm:
        tokens, wall, start = vllm_sample(args.model, tokenizer, stop_ids(tokenizer, model.generation_config),
                                          args.num_samples, args.max_new_tokens, args.dtype)
        results["vllm"] = tokens / wall
        print(f"{'vllm':15s} {tokens:7d} tokens in {wall:7.1f} s = {tokens / wall:7.1f} tokens/s "
              f"(+ {start:.0f} s engine start); ratio vllm / model.generate: "
              f"{results['vllm'] / results['model.generate']:.2f}x")
    print(f"ratio cftune / model.generate: {results['cftune'] / results['model.generate']:.2f}x "
          f"(N={args.num_samples}, max_new_tokens={args.max_new_tokens}, "
          f"batch={args.batch_size}, dtype={args.dtype}, device={model.device}, "
          f"threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
