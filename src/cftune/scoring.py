"""Teacher-forced scoring: the log-probability a model gives each continuation token.

This is lm-evaluation-harness's `loglikelihood` primitive, shared by every stage that needs it:
checking the stored `logp_base` of CF samples, the KL estimate, multiple-choice benchmarks,
perplexity and FLOW's per-example weights.

Requests that share a context (a multiple-choice item's choices, an instruction's responses) are
scored with the context computed once, not once per continuation (issue 32). A packed row holds
the context, then the continuations' tokens but the last as a prefix tree: tokens that begin
several continuations alike (PIQA's two solutions often open with the same words) are stored and
computed once too. Short contexts with their continuations sit side by side in one row. Each
token has a parent (the token before it on its own path: its context's previous token, or the
tree node it follows); the attention mask lets a token see exactly its ancestors and itself, and
its position id is its depth, restarting at each context. Every token then attends to exactly
the keys, at exactly the positions, it has in a row of its own pair, so the log-probs are those
of one row per pair up to float rounding (at most 6e-5 nats on SmolLM2-135M and Gemma-3-270m in
fp32; tests/test_shared_prefix.py). This takes one forward pass, where reusing the context's key/value cache takes two and a copy of the cache per
continuation, and Gemma-3's sliding-window layers get their window from the position ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cftune.models import autocast

# Model types whose forward takes a prepared 4D attention mask and position ids as they are, and
# whether it takes one mask per layer type ({"full_attention", "sliding_attention"}: Gemma-3) or
# one for all layers (Llama). Other models score one row per pair: packing is exact only where
# the forward honours both, which needs checking per model type (ALiBi models derive positions
# from the padding mask). Add a type together with its case in tests/test_shared_prefix.py.
PACKED_MASKS = {"llama": False, "gemma3_text": True}
ATTENTION = ("sdpa", "eager")  # the implementations that read an arbitrary boolean/additive mask
READ_BYTES = 64 * 2**20  # logits per call of the output layer, sized at 8 bytes each (SmolLM2: 170)
# Width of packed rows holding several shares: every query of a packed row scores all its keys
# (masked or not), 256 of them: ~8% of SmolLM2's matrix products per token.
PACK_WIDTH = 256
# Tokens per forward pass on a CPU, unless `max_batch_tokens` says otherwise: a pass's activations
# ([tokens, 1,536] float32 in SmolLM2's MLP: 12 MB at 2,048 tokens, 50 MB at 8,192) then stay in
# cache. Measured on a 2-core AMD EPYC (docs/benchmarks.md): HellaSwag-shaped items 1.25x faster
# at 1,024-2,048 tokens than at 8,192, ARC-Easy and PIQA the same. A GPU wants large passes.
CPU_PASS_TOKENS = 2048


@dataclass
class Scored:
    """Per-token log-probs of one continuation (float64, length = continuation length), and
    whether greedy decoding would have produced exactly that continuation."""

    token_logprobs: torch.Tensor
    is_greedy: bool

    @property
    def logprob(self) -> float:
        return float(self.token_logprobs.sum())


@dataclass
class _Row:
    """One row of a batch: its input ids and, per request it scores, the row indices whose
    outputs predict that request's continuation tokens."""

    ids: list[int]
    reads: list[tuple[int, list[int]]]
    # Packed rows only, per token: its position id and its parent's index (-1: a context's first
    # token); a token sees its ancestors and itself.
    positions: list[int] | None = None
    parents: list[int] | None = None


@torch.no_grad()
def score_continuations(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    dtype: str = "fp32",
    max_length: int | None = None,
    pad_id: int = 0,
    desc: str | None = None,
    max_batch_tokens: int | None = None,
    shared_prefix: bool = True,
) -> list[Scored]:
    """Score `(context_ids, continuation_ids)` pairs, a batch of rows per forward pass.

    Rows are sorted by length (longest first) so batches carry little padding and an
    out-of-memory error shows up on the first batch. A batch holds at most `batch_size` rows and
    `max_batch_tokens` padded tokens (default: `batch_size` × 256, at most CPU_PASS_TOKENS on a
    CPU), so a few very long requests are scored a few at a time: 32 rows padded to one
    1,600-token instruction took 165 s where the other 144 rows of the set took 50. Contexts are
    cut from the left when context + continuation exceeds `max_length` (the model's limit by default); the context must
    hold at least one token, since the first continuation token needs something to condition on.
    With `shared_prefix` (and a model in `PACKED_MASKS`), requests whose cut contexts are equal
    are scored from one copy of it in a packed row (`_pack`; `batch_size` then counts packed
    rows) where `_shares` judges that cheaper; the others, and every request with
    `shared_prefix=False` (one row per pair, as before issue 32), get a row each. Where
    `cftune.head_loss` supports the model's output layer, logits are computed only at the
    positions that predict continuation tokens (never the batch's whole [rows × width ×
    vocabulary] logits), for a chunk of requests at a time.
    """
    from cftune.head_loss import head_of

    head = head_of(model)
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    prepared = []
    for ctx, cont in requests:
        assert len(ctx) >= 1 and len(cont) >= 1, "need a non-empty context and continuation"
        ids = list(ctx) + list(cont)
        ids = ids[-(max_length + 1):]  # inputs are ids[:-1]: at most max_length positions
        prepared.append((ids, len(cont)))
    budget = max_batch_tokens or batch_size * 256
    if max_batch_tokens is None and next(model.parameters()).device.type == "cpu":
        budget = min(budget, CPU_PASS_TOKENS)
    mask_types = _packed_layer_types(model) if shared_prefix else None
    packed = _pack(prepared, budget, _attention_span(model.config)) if mask_types else []
    in_packed = {i for row in packed for i, _ in row.reads}
    single = [_Row(ids[:-1], [(i, list(range(len(ids) - 1 - n, len(ids) - 1)))])
              for i, (ids, n) in enumerate(prepared) if i not in in_packed]
    results: list[Scored | None] = [None] * len(prepared)
    bar = tqdm(total=len(prepared), desc=desc or "scoring", unit="seq", disable=desc is None)
    kinds = sorted([(single, None), (packed, mask_types)],  # the widest row's batch first
                   key=lambda kind: -max((len(row.ids) for row in kind[0]), default=0))
    for rows, types in kinds:
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r].ids))
        for idx in token_batches([len(rows[r].ids) for r in order], batch_size, budget):
            batch = [rows[order[k]] for k in idx]
            _score_batch(model, head, batch, prepared, results, dtype, pad_id, types)
            bar.update(sum(len(row.reads) for row in batch))
    bar.close()
    return results  # type: ignore[return-value]


def _score_batch(model, head, rows: list[_Row], prepared, results, dtype: str, pad_id: int,
                 mask_types: tuple[str, ...] | None) -> None:
    """One forward pass over `rows`; writes the `Scored` of every request they read."""
    from cftune.head_loss import hidden_states

    device = next(model.parameters()).device
    if mask_types is None:
        batch = _padded(rows, pad_id)
    else:
        batch = _packed(rows, pad_id, model.config, mask_types, next(model.parameters()).dtype)
    batch = {k: ({t: m.to(device) for t, m in v.items()} if isinstance(v, dict) else
                 v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    with autocast(device, dtype):
        if head is None:
            out = model(**batch).logits
        else:
            out, _ = hidden_states(model, head, **batch)
    reads = [(r, i, positions) for r, row in enumerate(rows) for i, positions in row.reads]
    if head is None:
        for r, i, positions in reads:
            results[i] = _scored(out[r, positions], prepared[i])
        return
    # The output layer once per chunk of requests, not once per request: its weight (SmolLM2:
    # 49k × 576, 113 MB) is read per call, which costs as much as ~5 positions' products.
    per_chunk = max(1, READ_BYTES // (8 * head.weight.shape[0]))
    start = 0
    while start < len(reads):
        end, n = start + 1, len(reads[start][2])
        while end < len(reads) and n + len(reads[end][2]) <= per_chunk:
            n += len(reads[end][2])
            end += 1
        chunk = reads[start:end]
        with autocast(device, dtype):
            logits = head.logits(torch.cat([out[r, positions] for r, _, positions in chunk]))
        for (_, i, _), part in zip(chunk, logits.split([len(p) for _, _, p in chunk])):
            results[i] = _scored(part, prepared[i])
        start = end


def _scored(logits: torch.Tensor, request: tuple[list[int], int]) -> Scored:
    """The `Scored` of a request from the logits [continuation length, vocabulary] that predict
    its continuation tokens: log p(token) = logit − logsumexp(logits). Not a float64
    log_softmax: that wrote a float64 copy of every position's vocabulary twice (13% of PIQA's
    scoring time); logsumexp reduces in float32 (|error| ~1e-7 nats per token against float64)
    and only the results are taken to float64."""
    ids, n_cont = request
    logits = logits.float()
    target = torch.tensor(ids[-n_cont:], device=logits.device)
    picked = logits.gather(-1, target[:, None])[:, 0]
    token_lp = (picked.double() - torch.logsumexp(logits, -1).double()).cpu()
    return Scored(token_lp, bool((logits.argmax(-1) == target).all()))


def _padded(rows: list[_Row], pad_id: int) -> dict:
    """Inputs of one row per pair: right-padded ids and a 2D padding mask."""
    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row.ids)] = torch.tensor(row.ids)
        mask[r, : len(row.ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _packed(rows: list[_Row], pad_id: int, config, mask_types: tuple[str, ...],
            weight_dtype: torch.dtype) -> dict:
    """Inputs of packed rows: ids, position ids, and the [rows, 1, width, width] mask in which a
    query sees its ancestors and itself (padding sees itself: no softmax row is empty); sliding
    layers further need position(q) − position(k) < window, as transformers' sliding mask
    (`kv_idx > q_idx - sliding_window`) demands of the same tokens in a row of their own."""
    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    visible = np.zeros((len(rows), width, width), dtype=bool)
    for r, row in enumerate(rows):
        input_ids[r, : len(row.ids)] = torch.tensor(row.ids)
        positions[r, : len(row.ids)] = torch.tensor(row.positions)
        seen = visible[r]
        seen[np.arange(width), np.arange(width)] = True
        for q, parent in enumerate(row.parents):  # a parent comes before its children
            if parent >= 0:
                seen[q] |= seen[parent]
    visible = torch.from_numpy(visible)
    masks = {"full_attention": visible}
    if "sliding_attention" in mask_types:
        distance = positions[:, :, None] - positions[:, None, :]
        masks["sliding_attention"] = visible & (distance < config.sliding_window)
    if config._attn_implementation == "eager":  # additive, as transformers' `eager_mask`
        zero = torch.zeros((), dtype=weight_dtype)
        masks = {t: torch.where(m, zero, torch.finfo(weight_dtype).min) for t, m in masks.items()}
    masks = {t: m[:, None] for t, m in masks.items()}
    mask = masks if PACKED_MASKS[config.model_type] else masks["full_attention"]
    return {"input_ids": input_ids, "position_ids": positions, "attention_mask": mask,
            "use_cache": False}


def _packed_layer_types(model) -> tuple[str, ...] | None:
    """The layer types whose masks a packed row needs, or None where packing would not be exact
    (see `PACKED_MASKS`)."""
    config = getattr(model, "config", None)
    if (config is None or getattr(config, "model_type", None) not in PACKED_MASKS
            or getattr(config, "_attn_implementation", None) not in ATTENTION
            or getattr(config, "use_bidirectional_attention", False)):
        return None
    types = tuple(sorted(set(getattr(config, "layer_types", None) or ["full_attention"])))
    if not set(types) <= {"full_attention", "sliding_attention"}:
        return None
    if "sliding_attention" in types and not getattr(config, "sliding_window", None):
        return None
    return types


def _attention_span(config) -> float:
    """Keys per query at which attention costs a token as much as its layer's matrix products:
    (attention and MLP weights of one layer, 2 FLOPs each) / (4 × heads × head size: QKᵀ and AV).
    About 3,000 for SmolLM2-135M and Gemma-3-270m."""
    d, ff = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    weights = d * head_dim * (2 * heads + 2 * kv) + 3 * d * ff
    return 2 * weights / (4 * heads * head_dim)


def _pack(prepared: list[tuple[list[int], int]], budget: int, span: float) -> list[_Row]:
    """Packed rows of the requests that share their (cut) context with another, where sharing
    pays (`_shares`). Shares narrower than PACK_WIDTH are laid side by side in rows of that width
    (first fit, widest first), so rows are not padded to the widest of their batch: PIQA's
    shares, 20 to 150 tokens wide, padded one per row to 16-row batches, were 2x their tokens."""
    bins: list[list] = []  # [capacity, width, shares]
    for share in sorted(_shares(prepared, budget, span), key=lambda s: -_width(s)):
        fit = next((b for b in bins if b[1] + _width(share) <= b[0]), None)
        if fit is None:
            fit = [max(_width(share), min(PACK_WIDTH, budget)), 0, []]
            bins.append(fit)
        fit[1] += _width(share)
        fit[2].append(share)
    return [_row(shares) for _, _, shares in bins]


def _width(share: tuple[list[int], list[tuple[int, list[int]]]]) -> int:
    """Tokens of a share in a packed row: its context, and its continuations' own tokens with
    the prefixes they have in common counted once (the prefix tree's nodes)."""
    context, conts = share
    return len(context) + len({tuple(own[:k]) for _, own in conts for k in range(1, len(own) + 1)})


def _row(shares: list[tuple[list[int], list[tuple[int, list[int]]]]]) -> _Row:
    """One packed row: each share's context, then its continuations' own tokens as a prefix
    tree, each token's position its depth; the context's last output predicts every first
    token, a tree node's output the next token of every continuation through it."""
    row = _Row([], [], [], [])
    for context, conts in shares:
        start = len(row.ids)
        row.ids += context
        row.positions += range(len(context))
        row.parents += [-1, *range(start, start + len(context) - 1)]
        node: dict[tuple[int, int], int] = {}  # (parent index, token) → index
        for i, own in conts:
            at = start + len(context) - 1
            reads = [at]
            for token in own:
                if (at, token) not in node:
                    node[at, token] = len(row.ids)
                    row.ids.append(token)
                    row.positions.append(row.positions[at] + 1)
                    row.parents.append(at)
                at = node[at, token]
                reads.append(at)
            row.reads.append((i, reads))
    return row


def _shares(prepared: list[tuple[list[int], int]], budget: int,
            span: float) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
    """(context, [(request, its continuation but the last token)]) for the requests whose (cut)
    contexts are equal, where sharing pays: attention over a packed row is dense (each query
    scores every key, masked or not, where a row of its own skips the future), so a continuation
    joins its context's share only when the share's added cost, width × (1 + width / span), is
    below that of a row of its own, width × (1 + width / 2·span). A 1-token context (context-free
    samples) shares nothing worth that; an item's choices share all. Shares stay within `budget`
    tokens; a share left with one continuation is dropped (that request gets a row of its own)."""

    def cost(width: int, dense: bool) -> float:
        return width * (1 + width / (span if dense else 2 * span))

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, n_cont) in enumerate(prepared):
        if len(ids) > n_cont:  # a context token is left after the cut
            groups.setdefault(tuple(ids[:-n_cont]), []).append(i)
    shares: list[tuple[list[int], list[tuple[int, list[int]]]]] = []
    for context, members in groups.items():
        if len(members) < 2:
            continue
        first = len(shares)
        for i in members:
            ids, n_cont = prepared[i]
            own = ids[-n_cont:-1]  # the last token is only ever a target
            if len(shares) > first:
                width = _width(shares[-1])
                grown = _width((shares[-1][0], [*shares[-1][1], (i, own)]))
            if len(shares) == first or grown > budget or \
                    cost(grown, True) - cost(width, True) >= cost(len(ids) - 1, False):
                shares.append((list(context), []))
            shares[-1][1].append((i, own))
    return [share for share in shares if len(share[1]) > 1]


def token_batches(widths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Consecutive batches of positions into `widths` (sorted longest first): each at most
    `batch_size` rows and `max_tokens` padded tokens (rows × its first, widest row), and at
    least one row."""
    batches: list[list[int]] = []
    for k in range(len(widths)):
        if batches and len(batches[-1]) < batch_size and \
                (len(batches[-1]) + 1) * widths[batches[-1][0]] <= max_tokens:
            batches[-1].append(k)
        else:
            batches.append([k])
    return batches
