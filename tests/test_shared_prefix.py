"""Shared-prefix scoring (issue 32): requests that share a context are packed into one row, and
score as they do with one row per pair (`shared_prefix=False`) to 1e-4 nats, on Llama and on
Gemma-3 with a sliding window shorter than the contexts, with SDPA and eager attention."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from cftune.scoring import Scored, score_continuations

VOCAB = 260  # the byte-level tokenizer of tests/conftest.py


def tiny_gemma3(attn: str = "sdpa"):
    """A tiny random Gemma-3: sliding (window 8), full, sliding layers; logit soft-capping."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=30.0, attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # peaked next-token distributions, as in tests/conftest.py
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "llama-eager", "gemma3", "gemma3-eager"])
def model(request, tiny_model):
    from transformers import AutoModelForCausalLM

    arch, _, attn = request.param.partition("-")
    if arch == "gemma3":
        return tiny_gemma3(attn or "sdpa")
    return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn or "sdpa").eval()


@contextlib.contextmanager
def forward_shapes(model):
    """The [rows, width] of every forward pass of `model` inside the block."""
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def choices(seed: int, n_items: int, n_choices: int, ctx: tuple[int, int], cont: tuple[int, int]):
    """Multiple-choice shaped requests: per item one context and `n_choices` continuations."""
    rng = random.Random(seed)
    items = []
    for _ in range(n_items):
        context = tokens(rng, rng.randint(*ctx))
        items.append([(context, tokens(rng, rng.randint(*cont))) for _ in range(n_choices)])
    return items


def packed_width(item) -> int:
    """Tokens of an item in a packed row: its context once, its continuations but the last."""
    return len(item[0][0]) + sum(len(cont) - 1 for _, cont in item)


def both_ways(model, requests, **kw) -> tuple[list[Scored], list[Scored], list[tuple[int, int]]]:
    """(shared-prefix results, one-row-per-pair results, shapes of the shared-prefix passes)."""
    with forward_shapes(model) as shapes:
        shared = score_continuations(model, requests, **kw)
    flat = score_continuations(model, requests, shared_prefix=False, **kw)
    return shared, flat, shapes


def assert_same(shared: list[Scored], flat: list[Scored], atol: float = 1e-4) -> None:
    assert len(shared) == len(flat)
    for a, b in zip(shared, flat):
        assert a.token_logprobs.shape == b.token_logprobs.shape
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, rtol=0, atol=atol)
        assert abs(a.logprob - b.logprob) < atol
        assert a.is_greedy == b.is_greedy


def test_choices_score_as_one_row_per_pair_with_each_context_run_once(model):
    items = choices(0, n_items=3, n_choices=4, ctx=(10, 40), cont=(1, 12))
    requests = [r for item in items for r in item]
    shared, flat, shapes = both_ways(model, requests, batch_size=8)
    assert_same(shared, flat)
    assert shapes == [(1, sum(packed_width(item) for item in items))]  # side by side in one row


def test_continuations_that_begin_alike_share_their_common_tokens(model):
    """PIQA's solutions often open with the same words: a prefix tree stores them once. Here
    each item's choices share a 5-token opening (one is that opening plus a single token, its
    own tokens all shared) and one choice repeats another: a row holds the context, the opening
    once and each choice's own tail."""
    rng = random.Random(3)
    items = []
    for _ in range(3):
        context, opening = tokens(rng, rng.randint(8, 30)), tokens(rng, 5)
        conts = [opening + tokens(rng, rng.randint(2, 9)) for _ in range(3)]
        items.append([(context, c) for c in [*conts, opening + tokens(rng, 1), conts[0]]])
    shared, flat, shapes = both_ways(model, [r for item in items for r in item], batch_size=8)
    assert_same(shared, flat)
    tails = [sum(len(c) - 1 - 5 for _, c in item[:3]) for item in items]  # the repeat adds none
    assert shapes == [(1, sum(len(item[0][0]) + 5 + t for item, t in zip(items, tails)))]
    assert shapes[0][1] < sum(packed_width(item) for item in items) - 30  # 3 items x (4 x 5 - 5)


def test_one_token_continuations_need_the_context_pass_only(model):
    items = choices(1, n_items=4, n_choices=2, ctx=(5, 30), cont=(1, 1))  # BoolQ's yes / no
    shared, flat, shapes = both_ways(model, [r for item in items for r in item])
    assert_same(shared, flat)
    assert shapes == [(1, sum(len(item[0][0]) for item in items))]


def test_one_token_context(model):
    """Short continuations after one token share it; long ones (context-free samples) gain
    nothing worth a packed row's dense attention, and get a row each."""
    rng = random.Random(2)
    short = [([7], tokens(rng, n)) for n in (1, 3, 2, 4)]
    shared, flat, shapes = both_ways(model, short)
    assert_same(shared, flat)
    assert shapes == [(1, 1 + 0 + 2 + 1 + 3)]
    long = [([7], tokens(rng, n)) for n in (60, 50, 55)]
    shared, flat, shapes = both_ways(model, long)
    assert_same(shared, flat)
    assert shapes == [(3, 60)]


def test_contexts_over_the_limit_are_cut_from_the_left_per_request(model):
    """Each request's context is cut to fit its own continuation, as per pair: equal contexts
    with continuations of different lengths are cut differently and share only when equal."""
    rng = random.Random(3)
    context = tokens(rng, 600)  # the models' limit is 512 positions
    conts = [tokens(rng, n) for n in (3, 3, 5, 2, 3)]
    shared, flat, shapes = both_ways(model, [(context, c) for c in conts], batch_size=8)
    assert_same(shared, flat)
    # the three 3-token continuations after 513 - 3 context tokens; the others a full row each
    assert sorted(shapes) == [(1, 510 + 3 * 2), (2, 512)]


def test_mixed_shared_and_unshared_contexts_in_one_call(model):
    rng = random.Random(4)
    items = choices(5, n_items=3, n_choices=3, ctx=(8, 30), cont=(1, 9))
    requests = [r for item in items for r in item]
    requests += [(tokens(rng, rng.randint(1, 30)), tokens(rng, rng.randint(1, 9))) for _ in range(5)]
    requests.append((list(items[0][0][0]), tokens(rng, 4)))  # joins an item's context late
    rng.shuffle(requests)
    shared, flat, shapes = both_ways(model, requests, batch_size=4)
    assert_same(shared, flat)
    assert sum(rows for rows, _ in shapes) == 5 + 1  # a row per unshared request, one packed


def test_a_context_whose_continuations_span_batches(model):
    """A row stays within the token budget, so a context with many continuations is packed into
    several rows, each in its own batch here (and none has room for another's)."""
    rng = random.Random(6)
    context = tokens(rng, 30)
    requests = [(context, tokens(rng, rng.randint(2, 6))) for _ in range(10)]
    shared, flat, shapes = both_ways(model, requests, batch_size=1, max_batch_tokens=48)
    assert_same(shared, flat)
    assert all(rows == 1 and width <= 48 for rows, width in shapes)
    assert len([w for _, w in shapes if w > 30 + 5]) >= 2  # wider than any row of one pair
    assert len(shapes) < len(requests)


def test_a_cpu_pass_holds_at_most_cpu_pass_tokens_unless_told(tiny_model):
    """On a CPU the default batch is capped at CPU_PASS_TOKENS tokens (activations in cache),
    whatever `batch_size` allows; an explicit `max_batch_tokens` is obeyed as given."""
    from transformers import AutoModelForCausalLM

    from cftune.scoring import CPU_PASS_TOKENS

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rng = random.Random(9)
    width = 200
    requests = [([1], tokens(rng, width)) for _ in range(30)]  # unshared: a row each
    with forward_shapes(model) as shapes:
        default = score_continuations(model, requests, batch_size=64)
    assert all(rows * cols <= CPU_PASS_TOKENS for rows, cols in shapes)
    assert [rows for rows, _ in shapes][0] == CPU_PASS_TOKENS // width  # as many as fit
    with forward_shapes(model) as shapes:
        told = score_continuations(model, requests, batch_size=64, max_batch_tokens=64 * 256)
    assert shapes == [(30, width)]
    assert_same(default, told)


def test_models_without_a_chunked_head_read_the_full_logits(model, monkeypatch):
    import cftune.head_loss

    monkeypatch.setattr(cftune.head_loss, "head_of", lambda _model: None)
    items = choices(7, n_items=2, n_choices=4, ctx=(5, 20), cont=(1, 6))
    shared, flat, shapes = both_ways(model, [r for item in items for r in item])
    assert_same(shared, flat)
    assert shapes == [(1, sum(packed_width(item) for item in items))]


def test_bf16_runs_and_stays_close(model):
    items = choices(8, n_items=3, n_choices=4, ctx=(10, 40), cont=(1, 12))
    shared, flat, shapes = both_ways(model, [r for item in items for r in item], dtype="bf16")
    assert shapes == [(1, sum(packed_width(item) for item in items))]
    assert all(torch.isfinite(s.token_logprobs).all() for s in shared)
    for a, b in zip(shared, flat):  # bf16 rounds differently per row shape; a wrong mask: ~0.5
        assert abs(a.logprob - b.logprob) < 0.05


def test_other_models_and_shared_prefix_false_score_one_row_per_pair(tiny_model):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=512, n_embd=32, n_layer=2,
                                      n_head=4)).eval()  # learned positions: not in PACKED_MASKS
    llama = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    items = choices(9, n_items=2, n_choices=4, ctx=(5, 20), cont=(1, 6))
    requests = [r for item in items for r in item]
    for model, shared_prefix in ((gpt2, True), (llama, False)):
        with forward_shapes(model) as shapes:
            score_continuations(model, requests, batch_size=8, shared_prefix=shared_prefix)
        assert shapes == [(8, max(len(c) + len(k) - 1 for c, k in requests))]


@pytest.mark.integration
@pytest.mark.parametrize("bench", ["arc_easy", "piqa"])
def test_real_model_benchmarks_score_the_same(embedded_model, shared_data, bench):
    """The embedded default on the first 50 items: the same acc and acc_norm, and every choice's
    log-likelihood within 1e-4 nats, with and without shared prefixes."""
    from cftune.evaluate.benchmarks import load
    from cftune.evaluate.multiple_choice import encode_pair, mc_metrics
    from cftune.models import load_model, load_tokenizer

    model, tok = load_model(embedded_model, device="cpu"), load_tokenizer(embedded_model)
    items = load(bench, limit=50, data_dir=shared_data).items
    requests = [encode_pair(tok, c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    shared, flat, _ = both_ways(model, requests, batch_size=16, pad_id=pad)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(shared, flat)) < 1e-4

    def per_item(scored):
        it = iter(scored)
        return [[next(it) for _ in item.contexts] for item in items]

    metrics = [mc_metrics(items, per_item(s)) for s in (shared, flat)]
    assert metrics[0]["acc"] == metrics[1]["acc"] and metrics[0]["acc_norm"] == metrics[1]["acc_norm"]
