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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from cftune.generate.sampling import Drawn, Job, SamplingParams, sample_seed
from cftune.models import autocast


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


def pick(probs: torch.Tensor, uniforms: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative probability exceeds u. [n, V], [n] → [n].

    Two levels, so only one block of `block` tokens per row is cumulated: block sums locate the
    block holding u, then a float64 cumulative sum inside it locates the token. This reads the
    probabilities once; a full-vocabulary float64 cumsum was the costliest part of a step.
    """
    n, vocab = probs.shape
    whole = vocab - vocab % block
    sums = [probs[:, :whole].reshape(n, -1, block).sum(-1)]
    if whole < vocab:
        sums.append(probs[:, whole:].sum(-1, keepdim=True))
    block_cdf = torch.cat(sums, -1).double().cumsum(-1)
    target = uniforms.double() * block_cdf[:, -1]
    b = torch.searchsorted(block_cdf, target[:, None]).squeeze(-1).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    start = b * block
    cols = start[:, None] + torch.arange(block)
    inner = probs.gather(-1, cols.clamp(max=vocab - 1)).double()
    inner[cols >= vocab] = 0  # the last block may be short
    j = torch.searchsorted(inner.cumsum(-1), (target - before)[:, None]).squeeze(-1)
    return (start + j.clamp_(max=block - 1)).clamp_(max=vocab - 1)


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


class _KVStore:
    """Preallocated keys/values [rows, heads, capacity, head_dim] per layer plus the row mask.

    All rows share the column axis (time steps); `length` columns are in use. Decoding writes one
    column in place per step, instead of `DynamicCache`'s concatenation that copies the whole
    cache every step.
    """

    def __init__(self, rows: int, capacity: int, device: torch.device):
        self.rows, self.capacity, self.length = rows, capacity, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((rows, capacity), dtype=torch.long, device=device)

    def ensure_layer(self, idx: int, like: torch.Tensor) -> None:
        while len(self.keys) <= idx:
            shape = (self.rows, like.shape[1], self.capacity, like.shape[3])
            self.keys.append(like.new_zeros(shape))
            self.values.append(like.new_zeros(shape))

    def shift(self, offset: int, capacity: int | None = None) -> None:
        """Move the used columns by `offset` (negative: drop old columns on the left), resizing."""
        capacity = capacity or self.capacity
        lo, hi = max(0, -offset), self.length
        new_len = hi - lo + max(0, offset)
        dst = slice(max(0, offset), new_len)

        def moved(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((*t.shape[:-2], capacity, t.shape[-1])) if t.dim() == 4 else \
                t.new_zeros((t.shape[0], capacity))
            if t.dim() == 4:
                out[:, :, dst] = t[:, :, lo:hi]
            else:
                out[:, dst] = t[:, lo:hi]
            return out

        self.keys = [moved(k) for k in self.keys]
        self.values = [moved(v) for v in self.values]
        self.mask = moved(self.mask)
        self.capacity, self.length = capacity, new_len

    def select_rows(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.mask.device)
        self.keys = [k.index_select(0, idx) for k in self.keys]
        self.values = [v.index_select(0, idx) for v in self.values]
        self.mask = self.mask.index_select(0, idx)
        self.rows = len(keep)


def _slot_cache(store: _KVStore, n_layers: int):
    """A transformers `DynamicCache` whose layers read and write `store` in place.

    The layers exist before the first forward: the attention mask is sized from the first
    layer's length before any layer is updated.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self.idx = len(cache.layers)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            store.ensure_layer(self.idx, key_states)
            t, n = store.length, key_states.shape[-2]
            store.keys[self.idx][:, :, t:t + n] = key_states
            store.values[self.idx][:, :, t:t + n] = value_states
            self.keys = store.keys[self.idx][:, :, :t + n]
            self.values = store.values[self.idx][:, :, :t + n]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return store.length

    cache = DynamicCache()
    cache.layer_class_to_replicate = SlotLayer
    for _ in range(n_layers):
        cache.layers.append(SlotLayer())
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
            from transformers import DynamicCache

            if len(self._prefix_kv) > 64:  # contextual prompts are mostly distinct: keep few
                self._prefix_kv.clear()
            ids = torch.tensor([prefix[:-1]], device=self.device)
            cache = DynamicCache()
            with autocast(self.device, self.dtype):
                self.model(input_ids=ids, cache=cache, use_cache=True)
            self._prefix_kv[prefix] = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix_kv[prefix]

    @torch.no_grad()
    def run(self, jobs: Iterable[Job]) -> Iterator[Drawn]:
        """Yield each job's sample as soon as it finishes (not in job order)."""
        pending = iter(jobs)
        rows: list[_Row | None] = [None] * self.batch_size
        store = _KVStore(self.batch_size, 2 * (self.params.max_new_tokens + 16), self.device)
        cache = _slot_cache(store, self.model.config.get_text_config().num_hidden_layers)
        exhausted = False
        while True:
            # 1. Refill free rows; once the jobs run out, drop idle rows so steps get cheaper.
            for i in range(len(rows)):
                if rows[i] is None and not exhausted:
                    job = next(pending, None)
                    if job is None:
                        exhausted = True
                    else:
                        self._place(i, job, rows, store)
            if exhausted:
                keep = [i for i, r in enumerate(rows) if r is not None]
                if not keep:
                    return
                if len(keep) < len(rows):
                    rows = [rows[i] for i in keep]
                    store.select_rows(keep)
            if store.length == store.capacity:  # no column left: drop unseen ones, or grow
                cut = min(r.start for r in rows if r is not None)
                store.shift(-cut, None if cut else 2 * store.capacity)
                for r in rows:
                    if r is not None:
                        r.start -= cut

            # 2. One decoding step for every row.
            inputs = torch.tensor([[r.next_input if r else 0] for r in rows], device=self.device)
            positions = torch.tensor([[r.position if r else 0] for r in rows], device=self.device)
            store.mask[:, store.length] = 1
            with autocast(self.device, self.dtype):
                out = self.model(input_ids=inputs, attention_mask=store.mask[:, :store.length + 1],
                                 position_ids=positions, cache=cache, use_cache=True)
            store.length += 1
            live = [i for i, r in enumerate(rows) if r is not None]
            tokens, logps, top = self._sample(out.logits[live, -1].float(), [rows[i] for i in live])
            self.tokens_sampled += len(live)

            # 3. Book-keeping: emit finished samples, feed the others their new token.
            is_stop = torch.isin(tokens, self.stop_ids).tolist()
            for j, i in enumerate(live):
                row, tok = rows[i], int(tokens[j])
                row.tokens.append(tok)
                row.logps.append(float(logps[j]))
                if top is not None:
                    row.topk_ids.append(top[1][j].tolist())
                    row.topk_lps.append([round(v, 5) for v in top[0][j].tolist()])
                if is_stop[j] or len(row.tokens) >= self.params.max_new_tokens:
                    yield Drawn(row.job.id, row.tokens, row.logps, bool(is_stop[j]),
                                row.topk_ids if top is not None else None,
                                row.topk_lps if top is not None else None)
                    rows[i] = None
                else:
                    row.next_input, row.position = tok, row.position + 1

    def _place(self, i: int, job: Job, rows: list, store: _KVStore) -> None:
        """Put `job` in row `i`: write its prefix K/V into the row's last columns, mask the rest."""
        prefix = tuple(job.prefix_ids)
        n_ctx = len(prefix) - 1  # cached context; the last prefix token is the first input
        if n_ctx > store.length:  # too few columns: move every row right
            pad = n_ctx - store.length
            store.shift(pad, max(store.capacity, 2 * (n_ctx + self.params.max_new_tokens)))
            for r in rows:
                if r is not None:
                    r.start += pad
        store.mask[i] = 0
        width = store.length
        if n_ctx > 0:
            kv_prefix = self._prefill(prefix)
            for idx, (k, v) in enumerate(kv_prefix):
                store.ensure_layer(idx, k)
                store.keys[idx][i, :, width - n_ctx:width] = k[0]
                store.values[idx][i, :, width - n_ctx:width] = v[0]
            store.mask[i, width - n_ctx:width] = 1
        gen = torch.Generator().manual_seed(sample_seed(self.seed, job.id))
        rows[i] = _Row(job, gen, start=width - n_ctx, next_input=prefix[-1], position=n_ctx)

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Row]):
        """Draw one token per row; return tokens, their untempered log-probs, optional top-K."""
        # Untempered log-probs (the distribution in the KL) as logits - logsumexp: fewer passes
        # over the vocabulary than a full log_softmax.
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        uniforms = torch.cat([torch.rand(1, generator=r.gen, dtype=torch.float64) for r in rows])
        if self.params == SamplingParams(max_new_tokens=self.params.max_new_tokens):
            probs = torch.exp(logits - lse)  # plain T=1 sampling: no filtering needed
        else:
            probs = filter_probs(logits, self.params)
        tokens = pick(probs.cpu(), uniforms)
        token_logp = (logits.cpu().gather(-1, tokens[:, None]) - lse.cpu())[:, 0]
        top = None
        if self.topk:
            vals, idx = torch.topk(logits, self.topk, dim=-1)
            top = ((vals - lse).cpu(), idx.cpu())
        return tokens, token_logp, top
