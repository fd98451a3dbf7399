"""A thin stand-in for the `vllm` package (LLM, SamplingParams, RequestOutput, Logprob) that
mirrors the parts of vLLM's API `cftune.vllm_sampler` uses, sampling with a transformers model.

vLLM itself does not install next to this project's transformers (see the README), so the engine
code is tested against this: it records what it was asked (to check that nothing is left to
vLLM's or the model's defaults) and answers as vLLM does: stop tokens kept in `token_ids`,
`finish_reason` "stop" or "length", per position a dict of the top-`logprobs` tokens plus the
sampled one, from the raw (untempered) distribution. `noise` shifts every returned log-prob, as
another engine's kernels would.
"""

from __future__ import annotations

import importlib.machinery
import types
from dataclasses import dataclass, field

import torch

__version__ = "0.0-fake"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    detokenize: bool = True
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class LLM:
    """`vllm.LLM` over a transformers model; `calls` keeps every request it was given."""

    instances: list[LLM] = []
    noise: float = 0.0

    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kwargs = {"model": model, **kwargs}
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)  # for stop strings
        self.calls: list[tuple[list[int], SamplingParams]] = []
        LLM.instances.append(self)

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else \
            [sampling_params] * len(prompts)
        return [self._one(i, p["prompt_token_ids"], sp)
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]

    def _one(self, i: int, prompt: list[int], sp: SamplingParams) -> RequestOutput:
        self.calls.append((list(prompt), sp))
        gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else 0)
        ids, out_ids, positions, reason = list(prompt), [], [], "length"
        for _ in range(sp.max_tokens):
            raw = torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].float(), -1)
            token = int(raw.argmax()) if sp.temperature == 0 else int(torch.multinomial(
                torch.softmax(raw / sp.temperature, -1), 1, generator=gen))
            top = torch.topk(raw, sp.logprobs or 1)
            entry = {int(t): Logprob(float(v) + self.noise, rank=r + 1)
                     for r, (v, t) in enumerate(zip(top.values, top.indices))}
            entry.setdefault(token, Logprob(float(raw[token]) + self.noise))
            ids.append(token)
            out_ids.append(token)
            positions.append(entry)
            if token in sp.stop_token_ids or (sp.stop and any(
                    t in self.tokenizer.decode(out_ids) for t in sp.stop)):
                reason = "stop"
                break
        return RequestOutput(str(i), list(prompt), [CompletionOutput(
            0, "", out_ids, None, positions if sp.logprobs is not None else None, reason,
            out_ids[-1] if reason == "stop" else None)])


def module() -> types.ModuleType:
    """This fake as the `vllm` module (for `sys.modules`)."""
    m = types.ModuleType("vllm")
    m.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # "installed", for find_spec
    for name in ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
                 "__version__"):
        setattr(m, name, globals()[name])
    return m
