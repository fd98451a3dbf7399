"""The chunked output-layer loss (cftune.head_loss) equals the plain loss on full logits: values
and gradients, for NLL with row weights and for top-K KD, with tied and untied heads, LoRA,
Gemma-style soft-capping and bf16 autocast; and a training run gives the same losses either way."""

from __future__ import annotations

import pytest
import torch

from cftune import head_loss, objectives
from cftune.models import autocast


def _batch(vocab: int, rows: int = 3, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    k = 5
    topk_ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows * length)])
    topk_lp = torch.log_softmax(torch.randn(rows * length, k + 1, generator=g), -1)[:, :k]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "weight": torch.tensor([0.5, 1.0, 1.5]),
            "topk_ids": topk_ids.view(rows, length, k), "topk_logprobs": topk_lp.view(rows, length, k)}


def _both(model, batch, kind: str, dtype: str = "fp32") -> tuple[list, list]:
    """(value, grads) of the plain loss and of the chunked one."""
    head = head_loss.head_of(model)
    assert head is not None
    out = []
    for chunked in (False, True):
        model.zero_grad()
        with autocast(torch.device("cpu"), dtype):
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if chunked:
                x, _ = head_loss.hidden_states(model, head, **inputs)
                losses = head_loss.bound(head)
            else:
                x, losses = model(**inputs).logits, objectives
            if kind == "nll":
                total, n = losses.nll(x, batch["labels"], batch["weight"])
            else:
                total, n = losses.topk_kd(x, batch["labels"], batch["topk_ids"],
                                          batch["topk_logprobs"])
        total.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        out.append((float(total.detach()), int(n), grads))
    return out


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("kind", ["nll", "kd"])
@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_model_tied"])
def test_chunked_loss_equals_the_plain_loss(request, monkeypatch, fixture, kind):
    _several_chunks(monkeypatch)
    model = _load(request.getfixturevalue(fixture))
    (v0, n0, g0), (v1, n1, g1) = _both(model, _batch(model.config.vocab_size), kind)
    assert n0 == n1 == 27 and v1 == pytest.approx(v0, rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _several_chunks(monkeypatch) -> None:
    """16 positions a chunk (the tiny models' vocabulary is 64): a batch spans several."""
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * 16 * 64)
    monkeypatch.setattr(head_loss, "MIN_CHUNK", 16)


def test_chunked_head_gradient_under_bf16_autocast(monkeypatch, tiny_model):
    """The head's weight is cast to bf16 once and its chunk gradients summed in fp32: the same
    gradients as autocast's single product over all positions, to bf16 rounding."""
    _several_chunks(monkeypatch)
    model = _load(tiny_model)
    (v0, _, g0), (v1, _, g1) = _both(model, _batch(model.config.vocab_size), "nll", "bf16")
    assert v1 == pytest.approx(v0, rel=1e-3)
    assert all(g.dtype == torch.float32 for g in g1)
    for a, b in zip(g0, g1):  # elementwise, a bf16 partial sum may round either way
        assert float((b - a).norm() / a.norm()) < 1e-2


def test_chunked_loss_under_bf16_autocast_and_lora(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_load(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    (v0, _, g0), (v1, _, g1) = _both(model, _batch(model.config.vocab_size), "nll", "bf16")
    assert len(g0) == 8 and v1 == pytest.approx(v0, rel=1e-3)  # LoRA A/B of q, v in 2 layers
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-4)


def test_softcapped_head_as_gemma_computes_it():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8, final_logit_softcapping=3.0)
    model = Gemma3ForCausalLM(config)
    head = head_loss.head_of(model)
    assert head is not None and head.softcap == 3.0
    (v0, _, g0), (v1, _, g1) = _both(model, _batch(96), "nll")
    assert v1 == pytest.approx(v0, rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_unsupported_head_falls_back_to_full_logits(tiny_model):
    model = _load(tiny_model)
    model.config.logit_scale = 0.5  # a Cohere-style scaled head: not what the chunked loss computes
    assert head_loss.head_of(model) is None


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scoring_reads_logits_only_at_continuations_and_agrees(tiny_model_tied, dtype):
    """score_continuations through the output layer at continuation positions only gives the
    log-probs of the model's full logits."""
    from cftune.scoring import score_continuations

    model = _load(tiny_model_tied).eval()
    requests = [([5, 6, 7, 8], [9, 10]), ([5], [11, 12, 13, 14, 15]), ([7, 8, 9], [4])]
    scored = score_continuations(model, requests, batch_size=2, dtype=dtype)
    for (ctx, cont), s in zip(requests, scored):
        with torch.no_grad(), autocast(torch.device("cpu"), dtype):
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        expected = [float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)]
        assert s.token_logprobs.tolist() == pytest.approx(expected, abs=1e-4 if dtype == "fp32" else 2e-2)
