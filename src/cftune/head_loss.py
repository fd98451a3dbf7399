"""Token losses from the last hidden states, with the output layer applied chunk by chunk.

Why: the logits of a batch are [tokens × vocabulary]. For SmolLM2 (49k tokens) at 16 × 384 tokens
that is 300M numbers, for Gemma-3 (262k) 1.6G, and the loss keeps an fp32 copy, its softmax and
its gradient besides: the logits, not the model, set training's peak memory. Here the body runs
as usual (through the model's own forward, so DDP/FSDP wrappers and LoRA layers see a normal
call, with `logits_to_keep=1` so the model computes one position's logits), its last hidden
state is captured by a forward hook, and the loss is evaluated only at target positions, a chunk
of positions at a time. Each chunk's logits exist only while its loss and their gradient are
computed (in the forward pass, as Liger's fused linear cross-entropy does); backward scales the
stored gradients. The per-position loss is the very function the plain path uses
(`objectives.nll_at` / `objectives.topk_kd_at`), on the same fp32 logits, so both paths agree to
float rounding (tests/test_head_loss.py).

Supported: a plain `nn.Linear` output layer, optionally followed by tanh soft-capping
(`final_logit_softcapping`, Gemma 2/3), on a model whose forward takes `logits_to_keep` and whose
`get_decoder()` returns the body. Anything else (`head_of` returns None) uses the full logits.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from cftune import objectives

CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk: 256 MiB (1365 positions of SmolLM2)
# At least this many positions per chunk: each chunk also costs weight-sized work (its share of
# the head's gradient, [vocabulary × hidden], is added in fp32), which few positions don't repay.
# Gemma-3 (262k tokens): 1024 positions, 1 GiB of fp32 logits.
MIN_CHUNK = 1024


@dataclass
class Head:
    """The output layer of a causal LM: logits = softcap(hidden @ weight.T + bias)."""

    decoder: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states [N, H] → [N, V], computed as the model computes them."""
        out = F.linear(hidden, self.weight, self.bias)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out.float()

    @property
    def chunk(self) -> int:
        """Positions per chunk: CHUNK_BYTES of fp32 logits, at least MIN_CHUNK."""
        return max(MIN_CHUNK, CHUNK_BYTES // (4 * self.weight.shape[0]))


def head_of(model) -> Head | None:
    """The model's output layer when the chunked loss supports it, else None (plain logits)."""
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):  # DDP / accelerate wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PEFT: the transformers model, LoRA layers inside
        inner = inner.get_base_model()
    try:
        lm_head, decoder = inner.get_output_embeddings(), inner.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    config = inner.config.get_text_config()
    if (type(lm_head) is not torch.nn.Linear or decoder is None or decoder is inner
            or getattr(config, "logit_scale", None) is not None
            or "logits_to_keep" not in inspect.signature(inner.forward).parameters):
        return None
    return Head(decoder, lm_head.weight, lm_head.bias, getattr(config, "final_logit_softcapping", None))


def hidden_states(model, head: Head, **inputs) -> tuple[torch.Tensor, object]:
    """The body's last hidden state [B, T, H] for `inputs` and the model's outputs, from one
    normal forward call of `model` (logits for the last position only)."""
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = head.decoder.register_forward_hook(hook)
    try:
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0], outputs


class _ChunkedHeadLoss(torch.autograd.Function):
    """Σ loss_fn(head.logits(h[chunk]), *extras[chunk]) over chunks of positions; gradients for
    h and the head's weight and bias are computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, bias, head: Head, loss_fn: Callable, *extras):
        needs = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None, None, None]  # h, weight, bias
        if needs[0]:
            grads[0] = torch.empty_like(h)  # every row is written by its chunk
        # The weight in the precision autocast computes in, cast once per call and not once
        # per chunk: for Gemma-3's 262k × 640 head, per-chunk casts of the weight and of its
        # gradient cost more than the chunk's matrix products (2x slower than the full logits
        # on CPU). Its chunk gradients are then summed in fp32.
        device = h.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        params = [t.to(cast) if t is not None and cast is not None else t for t in (weight, bias)]
        with torch.enable_grad():
            params = [t.detach().requires_grad_(needs[i + 1]) if t is not None else None
                      for i, t in enumerate(params)]
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], head.chunk):
            with torch.enable_grad():
                leaves = [h[s:s + head.chunk].detach().requires_grad_(needs[0]), *params]
                chunk_head = Head(head.decoder, leaves[1], leaves[2], head.softcap)
                loss = loss_fn(chunk_head.logits(leaves[0]),
                               *(e[s:s + head.chunk] if e is not None else None for e in extras))
                wanted = [(i, t) for i, t in enumerate(leaves) if t is not None and needs[i]]
                if wanted:
                    for (i, _), g in zip(wanted, torch.autograd.grad(loss, [t for _, t in wanted])):
                        if i == 0:
                            grads[0][s:s + head.chunk] = g
                        elif grads[i] is None:  # the first chunk's, in the parameter's dtype
                            grads[i] = g.to((weight, bias)[i - 1].dtype, copy=True)
                        else:
                            grads[i] += g
            total += loss.detach().float()
        ctx.save_for_backward(*(g if g is not None else h.new_empty(0) for g in grads))
        ctx.present = [g is not None for g in grads]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [g * grad_out if present else None
                 for g, present in zip(ctx.saved_tensors, ctx.present)]
        return (*grads, None, None, *([None] * (len(ctx.needs_input_grad) - 5)))


def _at_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict a target [N, H] (causal shift), and the mask [B, T-1]."""
    mask = labels[:, 1:] != -100
    return hidden[:, :-1][mask], mask


def nll(hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, *,
        head: Head) -> tuple[torch.Tensor, torch.Tensor]:
    """`objectives.nll` from hidden states: (Σ w · −log p(y_t), number of target tokens)."""
    h, mask = _at_targets(hidden, labels)
    w = weights[:, None].expand_as(mask)[mask] if weights is not None else None
    total = _ChunkedHeadLoss.apply(h, head.weight, head.bias, head, objectives.nll_at,
                                   labels[:, 1:][mask], w)
    return total, mask.sum()


def topk_kd(hidden: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
            topk_logprobs: torch.Tensor, *, head: Head) -> tuple[torch.Tensor, torch.Tensor]:
    """`objectives.topk_kd` from hidden states: (Σ top-K + tail KL, number of target tokens)."""
    h, mask = _at_targets(hidden, labels)
    total = _ChunkedHeadLoss.apply(h, head.weight, head.bias, head, objectives.topk_kd_at,
                                   topk_ids[:, 1:][mask], topk_logprobs[:, 1:][mask])
    return total, mask.sum()


def bound(head: Head) -> SimpleNamespace:
    """`nll` and `topk_kd` with `head` bound: called like `objectives.nll` / `objectives.topk_kd`,
    with hidden states in place of logits."""
    return SimpleNamespace(nll=functools.partial(nll, head=head),
                           topk_kd=functools.partial(topk_kd, head=head))
