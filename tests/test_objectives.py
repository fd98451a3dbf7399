"""Identities of the losses: each is a pure function, checked against a direct computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cftune import objectives


def _batch(seed: int = 0, B: int = 3, T: int = 7, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a masked prompt
    labels[2, 5:] = -100  # padding
    return logits, labels


def test_nll_is_the_summed_cross_entropy_of_shifted_targets():
    logits, labels = _batch()
    total, count = objectives.nll(logits, labels)
    expect = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                             ignore_index=-100, reduction="sum")
    assert count == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(total, expect)


def test_nll_row_weights_scale_each_rows_tokens():
    logits, labels = _batch()
    w = torch.tensor([0.5, 2.0, 1.0])
    total, count = objectives.nll(logits, labels, w)
    rows = [objectives.nll(logits[i:i + 1], labels[i:i + 1])[0] for i in range(3)]
    torch.testing.assert_close(total, sum(wi * r for wi, r in zip(w, rows)))
    assert count == objectives.nll(logits, labels)[1]  # counts stay unweighted


def test_summed_losses_over_global_count_make_accumulation_exact():
    """Two micro-batches, each divided by the step's total token count, give the gradient of the
    whole batch's mean: what the trainer does with `num_items_in_batch`."""
    logits, labels = _batch(B=4)
    logits.requires_grad_(True)
    total, count = objectives.nll(logits, labels)
    (total / count).backward()
    whole = logits.grad.clone()
    logits.grad = None
    for part in (slice(0, 1), slice(1, 4)):  # unequal token counts per micro-batch
        s, _ = objectives.nll(logits[part], labels[part])
        (s / count).backward()
    torch.testing.assert_close(logits.grad, whole)


def _topk(logits: torch.Tensor, k: int):
    """Top-K of the distributions `logits` predicts, stored as the collator aligns them: at
    position t, the distribution the token at t was drawn from (read at logits[:, t-1])."""
    vals, ids = torch.log_softmax(logits[:, :-1].double(), -1).topk(k, -1)
    pad = (0, 0, 1, 0)  # one empty position in front
    return F.pad(ids, pad), F.pad(vals.float(), pad)


def test_kd_is_zero_for_the_base_and_positive_after_a_perturbation():
    logits, labels = _batch()
    ids, lps = _topk(logits, 4)
    total, count = objectives.topk_kd(logits, labels, ids, lps)
    assert count == (labels[:, 1:] != -100).sum()
    assert abs(float(total)) < 1e-5
    moved = logits + 0.5 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    assert float(objectives.topk_kd(moved, labels, ids, lps)[0]) > 1e-2


def test_kd_with_every_token_stored_is_the_exact_kl():
    logits, labels = _batch()
    moved = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    ids, lps = _topk(logits, logits.shape[-1])  # K = V: the tail bucket is empty
    total, _ = objectives.topk_kd(moved, labels, ids, lps)
    p = torch.log_softmax(logits[:, :-1].double(), -1)
    q = torch.log_softmax(moved[:, :-1].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)[labels[:, 1:] != -100].sum()
    torch.testing.assert_close(total.double(), kl, rtol=1e-5, atol=1e-5)


def test_kd_tail_bucket_keeps_the_kl_a_lower_bound_of_the_full_one():
    """Merging tokens into one bucket can only lower a KL (data processing inequality)."""
    logits, labels = _batch()
    moved = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    full = objectives.topk_kd(moved, labels, *_topk(logits, 11))[0]
    coarse = objectives.topk_kd(moved, labels, *_topk(logits, 3))[0]
    assert 0 < float(coarse) < float(full)


def test_l2_gradient_is_twice_lambda_times_the_displacement():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]
    init = [p.detach() + torch.randn(p.shape, generator=g) for p in params]
    lam = 0.3
    (lam * objectives.l2_to_init(params, init)).backward()
    for p, p0 in zip(params, init):
        torch.testing.assert_close(p.grad, 2 * lam * (p.detach() - p0))


def test_flow_weights_decrease_with_base_loss_and_average_one():
    losses = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    w = objectives.flow_weights(losses)
    assert torch.all(w[:-1] > w[1:])
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    # τ = median (2.0): w_i ∝ exp(−ℓ_i / 2)
    torch.testing.assert_close(w[0] / w[2], torch.tensor(float(torch.exp(torch.tensor(0.75)))))
    hot = objectives.flow_weights(losses, temperature=100.0)
    assert float(hot.max() - hot.min()) < 0.1  # a high temperature is nearly uniform
