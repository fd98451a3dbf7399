"""`cftune generate --engine vllm`: the same samples' law and record format, drawn by vLLM.

Why: cftune's `ContinuousSampler` is built for CPUs and tests; on a GPU, tens of thousands of
1k-token CF samples are vLLM's job. `VLLMSampler.run(jobs)` yields `sampler.Drawn` records like
the torch sampler, so `cftune.generate` keeps its blocks of ids, resume, extension, filters and
manifest unchanged. What vLLM is told, and why:

- prompts are token ids (`prompt_token_ids`): the BOS is never added a second time;
- every sampling knob is set (T, top-p, top-k, min-p; off by default) and the LLM is built with
  `generation_config="vllm"`: the model's own `generation_config` (a top-p of 0.9, say) must not
  leak into the samples' law;
- each sample has its own seed (`sample_seed(seed, id)`, as the torch sampler's stream);
- log-probs are the raw model's (`logprobs_mode="raw_logprobs"`): log p_base of the sampled
  token under the untempered, unfiltered distribution, which is what the KL needs; top-K for `kd`.

What vLLM does not guarantee is recorded in the manifest (`engine.guarantees`): its samples
depend on the batch it ran in (a resumed run continues with different, equally valid draws), and
its kernels' log-probs differ from a torch forward by float rounding; `--rescore` recomputes
`logp_base` with the torch model in one teacher-forced pass (top-K log-probs stay vLLM's).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence

from cftune.errors import CftuneError
from cftune.generate.sampling import Drawn, Job, SamplingParams, sample_seed
from cftune.prompts import cut_at_stop

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GUARANTEES = {
    "same_samples_any_batch_size": False,
    "byte_identical_resume": False,
    "logp_base": "vLLM's raw log-probs (float rounding of its kernels); --rescore: torch's",
}


def load_vllm():
    """The vllm module, or a one-line error saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise CftuneError("--engine vllm needs vLLM: pip install -e '.[vllm]' (GPUs) or see the "
                          "README for the CPU build") from None
    return vllm


@functools.lru_cache(maxsize=1)
def engine(model_path: str, dtype: str, max_logprobs: int):
    """The vLLM `LLM` for a model, kept for the next pool drawn from it in this process: the
    runner draws several pools (seeds, held-out set) from one base, and an engine start costs
    minutes (153 s on a 2-core CPU). Samples do not depend on the engine's own seed (each
    request has its own). `release_engine()` frees it (GPU memory, in a notebook)."""
    return load_vllm().LLM(
        model=model_path, tokenizer=model_path, dtype=VLLM_DTYPES[dtype], seed=0,
        generation_config="vllm", logprobs_mode="raw_logprobs", max_logprobs=max_logprobs)


def release_engine() -> None:
    """Drop the kept vLLM engine (it is rebuilt on the next `--engine vllm` draw)."""
    engine.cache_clear()


class VLLMSampler:
    """Draws `Job`s with a vLLM `LLM`; the interface of `sampler.ContinuousSampler`."""

    def __init__(self, model_path: str, params: SamplingParams, stop_ids: Iterable[int],
                 seed: int, dtype: str, topk_logprobs: int = 0):
        self.vllm = load_vllm()
        self.params, self.seed, self.topk = params, seed, topk_logprobs
        self.stop_ids = sorted(set(stop_ids))
        self.tokens_sampled = 0
        self.llm = engine(model_path, dtype, max(20, topk_logprobs))

    def sampling_params(self, job_id: int):
        """vLLM's `SamplingParams` for sample `job_id`: every knob set, nothing left to defaults."""
        p = self.params
        return self.vllm.SamplingParams(
            n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else -1,
            min_p=p.min_p, max_tokens=p.max_new_tokens, seed=sample_seed(self.seed, job_id),
            stop_token_ids=self.stop_ids, logprobs=max(1, self.topk), detokenize=False,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)

    def run(self, jobs: Iterable[Job]) -> Iterator[Drawn]:
        """Yield each job's sample (one `generate` call per block of jobs)."""
        jobs = list(jobs)
        if not jobs:
            return
        prompts = [{"prompt_token_ids": list(j.prefix_ids)} for j in jobs]
        outputs = self.llm.generate(prompts, [self.sampling_params(j.id) for j in jobs],
                                    use_tqdm=False)
        for job, out in zip(jobs, outputs, strict=True):
            yield self._drawn(job, out.outputs[0])

    def _drawn(self, job: Job, completion) -> Drawn:
        ids = list(completion.token_ids)
        finished = completion.finish_reason == "stop"
        if finished and (not ids or ids[-1] not in self.stop_ids):
            raise CftuneError(f"vLLM ended sample {job.id} without a stop token in its ids "
                              f"(stop_reason {completion.stop_reason!r}); this vLLM version "
                              "drops stop tokens, which cftune's records need")
        if completion.logprobs is None or len(completion.logprobs) != len(ids):
            raise CftuneError(f"vLLM returned no log-prob per token for sample {job.id}")
        logps = [float(pos[t].logprob) for pos, t in zip(completion.logprobs, ids)]
        top_ids = top_lps = None
        if self.topk:
            ranked = [sorted(pos.items(), key=lambda kv: -kv[1].logprob)[:self.topk]
                      for pos in completion.logprobs]
            top_ids = [[t for t, _ in r] for r in ranked]
            top_lps = [[round(float(lp.logprob), 5) for _, lp in r] for r in ranked]
        self.tokens_sampled += len(ids)
        return Drawn(job.id, ids, logps, finished, top_ids, top_lps)


def greedy_texts(model_path: str, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                 stop: Sequence[str], stop_ids: Iterable[int], dtype: str) -> list[str]:
    """Greedy answers to prompt ids, decoded by vLLM (`cftune eval`'s task accuracy on GPUs).

    vLLM stops at a stop string or token; the text is then decoded from the token ids with the
    tokenizer and cut at the first stop string, as the torch loop does, so the two engines give
    the same answers wherever their argmax agrees."""
    vllm = load_vllm()
    params = vllm.SamplingParams(
        n=1, temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, max_tokens=max_new_tokens,
        stop=list(stop), stop_token_ids=sorted(set(stop_ids)), repetition_penalty=1.0,
        presence_penalty=0.0, frequency_penalty=0.0)
    outputs = engine(model_path, dtype, 20).generate(
        [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [cut_at_stop(tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True),
                        stop) for o in outputs]
