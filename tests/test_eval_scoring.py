"""Multiple-choice scoring against a by-hand log-likelihood, the shared-context scorer against
plain per-pair scoring, LAMBADA and perplexity on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from cftune.evaluate.benchmarks import Item
from cftune.evaluate.multiple_choice import (
    binomial_stderr,
    encode_pair,
    last_word_metrics,
    mc_metrics,
    score_items,
)
from cftune.evaluate.perplexity import perplexity
from cftune.models import load_model, load_tokenizer
from cftune.scoring import score_continuations


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(str(tiny_model), device="cpu"), load_tokenizer(str(tiny_model))


@torch.no_grad()
def by_hand(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): one forward over the whole text, summed token log-probs."""
    ctx = tokenizer(context).input_ids
    cont = tokenizer(context + continuation).input_ids[len(ctx):]
    logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_mc_scoring_equals_by_hand_loglikelihood(tiny):
    model, tok = tiny
    item = Item(["Question: What is two plus two?\nAnswer:"] * 3, [" 4", " four", " twenty-two"],
                gold=1, choices=["4", "four", "twenty-two"])
    scored = score_items(model, tok, [item], batch_size=2)[0]
    lls = [by_hand(model, tok, item.contexts[0], c) for c in item.continuations]
    assert [s.logprob for s in scored] == pytest.approx(lls, abs=1e-5)
    metrics = mc_metrics([item], [scored])
    assert metrics["acc"] == float(max(range(3), key=lls.__getitem__) == 1)
    normed = [ll / len(c.encode()) for ll, c in zip(lls, item.choices)]
    assert metrics["acc_norm"] == float(max(range(3), key=normed.__getitem__) == 1)


def test_benchmark_items_score_as_one_row_per_pair(tiny):
    """`score_items` (shared contexts packed) gives each choice the log-likelihood of its own
    (context, choice) row."""
    model, tok = tiny
    texts = [("Question: a?\nAnswer:", " yes"), ("Question: a?\nAnswer:", " no, never"),
             ("Question: a?\nAnswer:", " n"), ("Short", " continuation of some length"),
             ("x" * 700, " beyond the 512-token limit"), ("x" * 700, " y"), ("Other\n", " z")]
    items = [Item(contexts=[c for c, _ in part], continuations=[k for _, k in part], gold=0,
                  choices=[k for _, k in part]) for part in (texts[:3], texts[3:])]
    packed = [s for item in score_items(model, tok, items, batch_size=3) for s in item]
    flat = score_continuations(model, [encode_pair(tok, c, k) for c, k in texts], batch_size=3,
                               shared_prefix=False)
    for a, b in zip(packed, flat, strict=True):
        assert a.token_logprobs.tolist() == pytest.approx(b.token_logprobs.tolist(), abs=1e-5)
        assert a.is_greedy == b.is_greedy


def test_encode_pair_moves_trailing_space_to_continuation(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx).endswith("Answer:") and tok.decode(cont) == " yes"
    assert ctx == tok("Answer:").input_ids  # the tokenizer's own special-token default, as lm-eval


def test_binomial_stderr_matches_lm_eval():
    outcomes = [1, 0, 1, 1, 0]
    mean = sum(outcomes) / 5
    sample_std = math.sqrt(sum((x - mean) ** 2 for x in outcomes) / 4)
    assert binomial_stderr(mean, 5) == pytest.approx(sample_std / math.sqrt(5))


def test_partial_scoring_has_no_acc_norm(tiny):
    model, tok = tiny
    item = Item(["The cup is on the table", "The cup is on the floor"], [" now."] * 2, 0,
                ["table", "floor"])
    scored = score_items(model, tok, [item, item])
    out = mc_metrics([item, item], scored, partial=True)
    assert "acc_norm" not in out and out["n"] == 2
    lls = [by_hand(model, tok, c, " now.") for c in item.contexts]
    assert [s.logprob for s in scored[0]] == pytest.approx(lls, abs=1e-5)


def test_last_word_accuracy_is_greedy_match(tiny):
    model, tok = tiny
    for context in ("Hello", "Hi", "A", "The", "x", "Once", "We", "It", "1", "Go"):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(context).input_ids])).logits
        word = tok.decode([int(logits[0, -1].argmax())])
        if word.isascii() and word.isprintable() and word.strip():  # a whole byte, not a fragment
            break
    else:
        pytest.fail("no context whose greedy next token is a printable character")
    other = "q" if word != "q" else "r"
    items = [Item([context], [word], 0, [word]), Item([context], [other], 0, [other])]
    scored = score_items(model, tok, items)
    out = last_word_metrics(scored)
    assert out["acc"] == 0.5
    mean_ll = (scored[0][0].logprob + scored[1][0].logprob) / 2
    assert out["perplexity"] == pytest.approx(math.exp(-mean_ll))


def test_perplexity_equals_by_hand(tiny, tmp_path):
    model, tok = tiny
    text = "The quick brown fox jumps over the lazy dog."
    (tmp_path / "t.txt").write_text(text)
    out = perplexity(model, tok, tmp_path / "t.txt", window=64)
    assert perplexity(model, tok, tmp_path / "t.txt", window=16)["n_tokens"] == out["n_tokens"]
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    total = sum(float(logp[i, t]) for i, t in enumerate(ids[1:]))
    assert out["n_tokens"] == len(ids) - 1
    assert out["perplexity"] == pytest.approx(math.exp(-total / (len(ids) - 1)), rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(-total / len(text.encode()) / math.log(2), rel=1e-5)


@pytest.mark.integration
def test_real_model_arc_easy(embedded_model, shared_data):
    """The embedded model: shared-context scoring equals plain scoring on real prompts, and ARC-Easy
    accuracy is well above chance (0.25) on the first 20 items."""
    from cftune.evaluate.benchmarks import load

    model, tok = load_model(embedded_model, device="cpu"), load_tokenizer(embedded_model)
    loaded = load("arc_easy", limit=20, data_dir=shared_data)
    scored = score_items(model, tok, loaded.items, batch_size=16)
    requests = [encode_pair(tok, c, k) for it in loaded.items for c, k in zip(it.contexts, it.continuations)]
    flat = score_continuations(model, requests, batch_size=16)
    shared = [s for item in scored for s in item]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(shared, flat)) < 1e-3
    assert mc_metrics(loaded.items, scored)["acc"] >= 0.5


def test_token_budget_batches_long_requests_few_at_a_time(tiny):
    from cftune.scoring import token_batches

    assert token_batches([100, 90, 20, 20, 20, 10], batch_size=4, max_tokens=150) == \
        [[0], [1], [2, 3, 4, 5]]
    assert token_batches([5] * 5, batch_size=2, max_tokens=1000) == [[0, 1], [2, 3], [4]]
    assert token_batches([500, 3], batch_size=8, max_tokens=100) == [[0], [1]]
    model, _ = tiny
    requests = [([5, 6], list(range(7, 7 + n))) for n in (40, 3, 25, 3, 9, 1)]
    one = score_continuations(model, requests, batch_size=8, max_batch_tokens=10_000)
    budgeted = score_continuations(model, requests, batch_size=8, max_batch_tokens=60)
    for a, b in zip(one, budgeted):
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-5)
