"""The training losses, each a small pure function of logits, labels and batch fields.

Every token-level loss returns `(summed loss, token count)` rather than a mean: the trainer
divides by the token count of the whole optimizer step (all gradient-accumulation micro-batches,
all processes), so accumulating 4 micro-batches of 2 is exactly one batch of 8.

Shapes: logits [B, T, V]; labels [B, T] with -100 where there is no target; the prediction for
labels[:, t] is read at logits[:, t-1] (causal LM shift). Only target positions are gathered
before the softmax, so masked prompts and padding cost no softmax work.

Notation of the CFS paper: the objective is
    L(θ) = E_task[−log p_θ(y|x)] + λ · E_{x∼p_base}[−log p_θ(x)]          (Eq. 1)
whose second term is, up to the constant entropy of p_base, KL(p_base ‖ p_θ) estimated with
samples x drawn from the base model with no context ("context-free" samples).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def _targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at target positions [N, V] fp32, target ids [N], mask [B, T-1])."""
    mask = labels[:, 1:] != -100
    return logits[:, :-1][mask].float(), labels[:, 1:][mask], mask


def nll(logits: torch.Tensor, labels: torch.Tensor,
        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t w · (−log p_θ(y_t | y_<t)) over target tokens, and the number of target tokens.

    The task term of Eq. 1 on task rows, its CF term on CF rows (where every sampled token is a
    target, so the sum is −log p_θ(x) of the whole sample). `weights` [B] scales each row's
    tokens (FLOW); the count stays unweighted so weights of mean 1 keep the loss scale.
    """
    picked, target, mask = _targets(logits, labels)
    w = weights[:, None].expand_as(mask)[mask] if weights is not None else None
    return nll_at(picked, target, w), mask.sum()


def nll_at(picked: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Σ w · (−log p(target)) of logits at target positions [N, V] (fp32), targets [N], w [N]."""
    losses = F.cross_entropy(picked, target, reduction="none")
    return (losses * weights if weights is not None else losses).sum()


def topk_kd(logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
            topk_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t KL(p_base ‖ p_θ) over the K+1 buckets "each stored top-K token" + "everything else".

    The CF term of Eq. 1 is a one-sample Monte-Carlo estimate of KL(p_base ‖ p_θ) per position
    (cross-entropy at the sampled token). With the base's top-K log-probs stored at generation
    time, the KL at each position can be taken over the top-K tokens plus one tail bucket holding
    the remaining mass (1 − Σ_k p_k for the base, logsumexp of the other logits for the model):
    the same divergence, coarsened only in the tail, with far less variance and no base model in
    memory. Zero when p_θ equals p_base on those buckets; ≥ 0 always (KL of two distributions).

    topk_ids, topk_logprobs: [B, T, K], aligned with `labels` (the base distribution the token at
    labels[:, t] was drawn from).
    """
    picked, _, mask = _targets(logits, labels)
    return topk_kd_at(picked, topk_ids[:, 1:][mask], topk_logprobs[:, 1:][mask]), mask.sum()


def topk_kd_at(picked: torch.Tensor, ids: torch.Tensor, base_logprobs: torch.Tensor) -> torch.Tensor:
    """`topk_kd`'s sum from logits at target positions [N, V] (fp32) and the base's top-K ids
    and log-probs there [N, K]."""
    base_lp = base_logprobs.double()
    model_lp = torch.log_softmax(picked, dim=-1)
    model_top = model_lp.gather(-1, ids).double()
    # The stored tokens get a huge negative log-prob rather than −inf, and the tail mass a floor of
    # 1e-30, so the tail term stays finite (gradient defined) even when K covers the vocabulary
    # and rounding leaves the base a spurious tail of ~1e-7.
    model_tail = torch.logsumexp(model_lp.scatter(-1, ids, -1e30), dim=-1).clamp_min(-69.0).double()
    base_p = base_lp.exp()
    base_tail = (1.0 - base_p.sum(-1)).clamp_min(0.0)  # stored log-probs are rounded: Σp may top 1
    kl_top = (base_p * (base_lp - model_top)).sum(-1)
    kl_tail = torch.xlogy(base_tail, base_tail) - base_tail * model_tail
    return (kl_top + kl_tail).sum().to(picked.dtype)


def l2_to_init(params: Iterable[torch.Tensor], init: Iterable[torch.Tensor]) -> torch.Tensor:
    """‖θ − θ₀‖² summed over the trainable tensors (the `l2` baseline: loss + λ₂‖θ − θ₀‖²).

    A per-step penalty, not a per-token loss: its gradient is 2(θ − θ₀), whatever the batch.
    """
    total = None
    for p, p0 in zip(params, init):
        term = (p.float() - p0.float()).pow(2).sum()
        total = term if total is None else total + term
    assert total is not None, "no trainable parameters"
    return total


def flow_weights(losses: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """FLOW example weights (Sanyal et al. 2025, "Upweighting Easy Samples in Fine-Tuning
    Mitigates Forgetting"): w_i ∝ exp(−ℓ_i / τ), with ℓ_i the *base* model's loss on example i.

    Easy examples (low base loss) are up-weighted, so fine-tuning moves the model less on what
    it would have to unlearn most. τ = 0 picks the median of the ℓ_i (our reading of the paper's
    parameter-free default); the weights are rescaled to mean 1 so the learning rate keeps its
    meaning. Computed in float64 with the minimum loss subtracted first, so no weight underflows
    to 0 or overflows.
    """
    losses = losses.double()
    tau = float(losses.median()) if temperature <= 0 else float(temperature)
    tau = max(tau, 1e-6)
    w = torch.exp(-(losses - losses.min()) / tau)
    return (w / w.mean()).float()


def eq1(task_sum: torch.Tensor, cf_sum: torch.Tensor, n_task: torch.Tensor, n_cf: torch.Tensor,
        mode: str, lam: float) -> torch.Tensor:
    """Eq. 1 from the two streams' summed token losses and their target-token counts over the
    optimizer step: `mix` is one mean over every target token (the CF samples are more rows of
    data), `weighted` the task mean + λ × the CF mean (λ weighs the KL term by itself)."""
    if mode == "mix":
        return (task_sum + cf_sum) / (n_task + n_cf).clamp_min(1)
    return task_sum / n_task.clamp_min(1) + lam * cf_sum / n_cf.clamp_min(1)
