"""Teacher-forced scoring: the log-probability a model gives each continuation token.

This is lm-evaluation-harness's `loglikelihood` primitive, shared by every stage that needs it:
checking the stored `logp_base` of CF samples, the KL estimate, multiple-choice benchmarks,
perplexity and FLOW's per-example weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cftune.models import autocast


@dataclass
class Scored:
    """Per-token log-probs of one continuation (float64, length = continuation length), and
    whether greedy decoding would have produced exactly that continuation."""

    token_logprobs: torch.Tensor
    is_greedy: bool

    @property
    def logprob(self) -> float:
        return float(self.token_logprobs.sum())


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
) -> list[Scored]:
    """Score `(context_ids, continuation_ids)` pairs with one forward pass per batch.

    Requests are sorted by length (longest first) so batches carry little padding and an
    out-of-memory error shows up on the first batch. A batch holds at most `batch_size` rows and
    `max_batch_tokens` padded tokens (default: `batch_size` × 256), so a few very long requests
    are scored a few at a time: 32 rows padded to one 1,600-token instruction took 165 s where
    the other 144 rows of the set took 50. Contexts are cut from the left when
    context + continuation exceeds `max_length` (the model's limit by default); the context must
    hold at least one token, since the first continuation token needs something to condition on.
    Where `cftune.head_loss` supports the model's output layer, logits are computed only at each
    row's continuation positions (never the batch's whole [rows × width × vocabulary] logits).
    """
    from cftune.head_loss import head_of, hidden_states

    device = next(model.parameters()).device
    head = head_of(model)
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    prepared = []
    for ctx, cont in requests:
        assert len(ctx) >= 1 and len(cont) >= 1, "need a non-empty context and continuation"
        ids = list(ctx) + list(cont)
        ids = ids[-(max_length + 1):]  # inputs are ids[:-1]: at most max_length positions
        prepared.append((ids, len(cont)))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    budget = max_batch_tokens or batch_size * 256
    results: list[Scored | None] = [None] * len(prepared)
    bar = tqdm(total=len(order), desc=desc or "scoring", unit="seq", disable=desc is None)
    for idx in token_batches([len(prepared[i][0]) - 1 for i in order], batch_size, budget):
        idx = [order[k] for k in idx]
        width = max(len(prepared[i][0]) for i in idx) - 1
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = prepared[i][0][:-1]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
        with autocast(device, dtype):
            if head is None:
                logits = model(**batch).logits
            else:
                hidden, _ = hidden_states(model, head, **batch)
        for row, i in enumerate(idx):
            ids, n_cont = prepared[i]
            n_in = len(ids) - 1
            positions = slice(n_in - n_cont, n_in)
            if head is None:
                row_logits = logits[row, positions]
            else:
                with autocast(device, dtype):
                    row_logits = head.logits(hidden[row, positions])
            logp = torch.log_softmax(row_logits.double(), dim=-1)
            target = torch.tensor(ids[-n_cont:], device=logp.device)
            token_lp = logp.gather(-1, target[:, None])[:, 0].cpu()
            greedy = bool((logp.argmax(-1) == target).all())
            results[i] = Scored(token_lp, greedy)
        bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]


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
