"""Continuous-batching ancestral sampling with a KV cache, one random stream per sample.

Why not `model.generate`: it keeps a whole batch alive until its longest row ends, applies the
model's own `generation_config` (top-k 50, repetition penalties…) unless every knob is overridden,
and cannot tell us the *untempered* log-probability of what it sampled, which the KL estimate
needs. Here a finished row is refilled at once with the next sample, so the batch stays full.

How refilling works with a plain `DynamicCache`: all rows advance one token per step, so the
cache's columns are time steps. A new sample placed in a free row writes its prefix's keys and
values into the last columns of that row, masks that row's older columns out, and restarts its
position ids at 0; rotary embeddings only see position ids, so the row computes exactly what it
would alone. Columns no active row can see any more are dropped from the left, which bounds the
cache by prefix + max_new_tokens columns.

Determinism: sample `i` draws its uniforms from its own generator seeded by (seed, i) and picks
tokens by inverse-CDF, so its text does not depend on the batch size, on which row it lands in or
on interruptions (up to float rounding between batch shapes, which flips a token only when a
uniform lands within ~1e-6 of a CDF boundary).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from cftune.models import autocast


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs; the defaults are plain ancestral sampling (the distribution in the KL)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    max_new_tokens: int = 256


@dataclass
class Job:
    """One sample to draw: its id (also its seed index) and the token ids it is drawn after."""

    id: int
    prefix_ids: tuple[int, ...]


@dataclass
class Drawn:
    """A finished sample: ids (ending with EOS when `finished`), untempered log-probs per token."""

    id: int
    token_ids: list[int]
    token_logprobs: list[float]
    finished: bool
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit seed for sample `sample_id` of a run seeded with `seed` (stable across versions)."""
    digest = hashlib.sha256(f"cftune:{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def filter_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k, min-p and top-p (nucleus), rows normalised.

    logits: [n, V] float32 → [n, V] float64.
    """
    scores = logits.double() / p.temperature
    if p.top_k and p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, 0.0)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= p.top_p, 0.0)  # keeps at least the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs / probs.sum(-1, keepdim=True)


def pick(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative probability exceeds u. [n, V], [n] → [n]."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


@dataclass
class _Row:
    job: Job
    gen: torch.Generator
    start: int  # first cache column of this sample
    next_input: int
    position: int
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_lps: list[list[float]] = field(default_factory=list)


def _wrap_cache(layers: list[list[torch.Tensor]] | None):
    """A `DynamicCache` holding our per-layer tensors as they are (the constructor would copy)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for keys, values in layers or []:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


class ContinuousSampler:
    """Draws samples for a stream of jobs with a full batch at every step."""

    def __init__(
        self,
        model,
        params: SamplingParams,
        stop_ids: Iterable[int],
        seed: int,
        batch_size: int = 32,
        dtype: str = "fp32",
        topk_logprobs: int = 0,
    ):
        self.model = model
        self.params = params
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self.seed = seed
        self.batch_size = batch_size
        self.dtype = dtype
        self.topk = topk_logprobs
        self.device = next(model.parameters()).device
        self._prefix_kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.tokens_sampled = 0

    @torch.no_grad()
    def _prefill(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of all prefix tokens but the last (that one is fed as the first input)."""
        if prefix not in self._prefix_kv:
            if len(self._prefix_kv) > 64:  # contextual prompts are mostly distinct: keep few
                self._prefix_kv.clear()
            from transformers import DynamicCache

            ids = torch.tensor([prefix[:-1]], device=self.device)
            cache = DynamicCache()
            with autocast(self.device, self.dtype):
                self.model(input_ids=ids, cache=cache, use_cache=True)
            self._prefix_kv[prefix] = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix_kv[prefix]

    def run(self, jobs: Iterable[Job]) -> Iterator[Drawn]:
        """Yield each job's sample as soon as it finishes (not in job order)."""
        pending = iter(jobs)
        rows: list[_Row | None] = []
        layers: list[list[torch.Tensor]] | None = None  # per layer [keys, values]: [B, H, T, D]
        mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        exhausted = False

        while True:
            # 1. Put new jobs into free rows (growing the batch up to batch_size).
            free = [i for i, r in enumerate(rows) if r is None]
            while not exhausted and (free or len(rows) < self.batch_size):
                job = next(pending, None)
                if job is None:
                    exhausted = True
                    break
                if free:
                    i = free.pop(0)
                else:
                    i = len(rows)
                    rows.append(None)
                    mask = torch.cat([mask, torch.zeros((1, mask.shape[1]), dtype=mask.dtype,
                                                        device=self.device)])
                    if layers is not None:
                        for kv in layers:
                            for j in (0, 1):
                                kv[j] = torch.cat([kv[j], kv[j].new_zeros((1, *kv[j].shape[1:]))])
                layers, mask = self._place(i, job, rows, layers, mask)
            if exhausted:  # nothing left to refill with: drop idle rows so steps get cheaper
                keep = [i for i, r in enumerate(rows) if r is not None]
                if not keep:
                    return
                if len(keep) < len(rows):
                    rows = [rows[i] for i in keep]
                    mask = mask[keep]
                    if layers is not None:
                        idx = torch.tensor(keep, device=self.device)
                        layers = [[kv[0].index_select(0, idx), kv[1].index_select(0, idx)]
                                  for kv in layers]

            # 2. One decoding step for every row.
            inputs = torch.tensor([[r.next_input] for r in rows], device=self.device)
            positions = torch.tensor([[r.position] for r in rows], device=self.device)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], 1)
            cache = _wrap_cache(layers)
            with torch.no_grad(), autocast(self.device, self.dtype):
                out = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                                 cache=cache, use_cache=True)
            layers = [[layer.keys, layer.values] for layer in cache.layers]
            logits = out.logits[:, -1].float()
            tokens, logps, top = self._sample(logits, rows)
            self.tokens_sampled += len(rows)

            # 3. Book-keeping: emit finished samples, feed the others their new token.
            is_stop = torch.isin(tokens, self.stop_ids.to(tokens.device)).tolist()
            for i, row in enumerate(rows):
                tok = int(tokens[i])
                row.tokens.append(tok)
                row.logps.append(float(logps[i]))
                if top is not None:
                    row.topk_ids.append(top[1][i].tolist())
                    row.topk_lps.append([round(v, 5) for v in top[0][i].tolist()])
                done = is_stop[i]
                if done or len(row.tokens) >= self.params.max_new_tokens:
                    yield Drawn(row.job.id, row.tokens, row.logps, bool(done),
                                row.topk_ids if top is not None else None,
                                row.topk_lps if top is not None else None)
                    rows[i] = None
                else:
                    row.next_input, row.position = tok, row.position + 1

            # 4. Drop cache columns that no active row attends to any more.
            starts = [r.start for r in rows if r is not None]
            cut = min(starts) if starts else 0
            if cut > 0:
                mask = mask[:, cut:]
                layers = [[kv[0][:, :, cut:], kv[1][:, :, cut:]] for kv in layers]
                for r in rows:
                    if r is not None:
                        r.start -= cut

    def _place(self, i: int, job: Job, rows: list, layers, mask):
        """Put `job` in row `i`: write its prefix K/V into the row's last columns, mask the rest."""
        prefix = tuple(job.prefix_ids)
        n_ctx = len(prefix) - 1  # cached context; the last prefix token is the first input
        width = mask.shape[1]
        if n_ctx > width:  # too few columns: pad every row on the left
            pad = n_ctx - width
            mask = torch.cat([mask.new_zeros((mask.shape[0], pad)), mask], 1)
            if layers is not None:
                layers = [[torch.cat([kv[j].new_zeros((*kv[j].shape[:2], pad, kv[j].shape[3])), kv[j]], 2)
                           for j in (0, 1)] for kv in layers]
            for r in rows:
                if r is not None:
                    r.start += pad
            width = n_ctx
        mask[i] = 0
        if n_ctx > 0:
            kv_prefix = self._prefill(prefix)
            if layers is None:
                layers = [[k.new_zeros((len(rows), *k.shape[1:2], width, k.shape[3])),
                           v.new_zeros((len(rows), *v.shape[1:2], width, v.shape[3]))]
                          for k, v in kv_prefix]
            for kv, (k, v) in zip(layers, kv_prefix):
                kv[0][i, :, width - n_ctx:] = k[0].to(kv[0].dtype)
                kv[1][i, :, width - n_ctx:] = v[0].to(kv[1].dtype)
            mask[i, width - n_ctx:] = 1
        gen = torch.Generator().manual_seed(sample_seed(self.seed, job.id))
        rows[i] = _Row(job, gen, start=width - n_ctx, next_input=prefix[-1], position=n_ctx)
        return layers, mask

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Row]):
        """Draw one token per row; return tokens, their untempered log-probs, optional top-K."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=r.gen, dtype=torch.float64) for r in rows])
        if self.params == SamplingParams(max_new_tokens=self.params.max_new_tokens):
            probs = logp.exp()  # plain T=1 sampling: no filtering needed
        else:
            probs = filter_probs(logits, self.params)
        tokens = pick(probs.cpu(), uniforms).to(logits.device)
        token_logp = logp.gather(-1, tokens[:, None])[:, 0]
        top = None
        if self.topk:
            vals, idx = torch.topk(logp, self.topk, dim=-1)
            top = (vals.float().cpu(), idx.cpu())
        return tokens, token_logp.cpu(), top
