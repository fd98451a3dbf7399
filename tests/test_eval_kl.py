"""KL(base ‖ model) from CF samples: 0 for the base, positive when perturbed, equal to the exact
KL (by enumeration on a 6-token model) within its error bar, and refusals for unusable samples.

Samples are drawn here with plain ancestral sampling, so these tests don't depend on `cftune
generate`; the manifest carries the fields that stage writes. The precision tests at the end
draw with `cftune generate`, whose stored `logp_base` are the sampler's own.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from cftune.cli import main as cli_main
from cftune.errors import CftuneError
from cftune.evaluate.kl import kl_to_base
from cftune.models import DTYPES, fingerprint, load_model, load_tokenizer
from cftune.scoring import score_continuations


@torch.no_grad()
def ancestral(model, prefix: list[int], eos: int, n: int, max_new: int, seed: int) -> list[dict]:
    """n samples at temperature 1 (no truncation), each stopped at EOS or after max_new tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prefix] * n)
    done = torch.zeros(n, dtype=torch.bool)
    tokens: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max_new):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].double(), -1)
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        for i in range(n):
            if not done[i]:
                tokens[i].append(int(nxt[i]))
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if done.all():
            break
    return [{"token_ids": t, "finished": t[-1] == eos} for t in tokens]


@torch.no_grad()
def forward_logprob(model, prefix: list[int], tokens: list[int]) -> float:
    """log p(tokens | prefix) from one plain forward pass of the transformers model, in float64
    after the logits: independent of cftune's batched scorer, which the KL uses."""
    logits = model(input_ids=torch.tensor([prefix + tokens])).logits[0].double()
    logp = torch.log_softmax(logits[len(prefix) - 1:-1], -1)
    return float(logp.gather(-1, torch.tensor(tokens)[:, None]).sum())


def write_sample_folder(folder: Path, base, base_spec: str | None, records: list[dict],
                        prefix: list[int], tokenizer=None, sampling: dict | None = None,
                        counts: dict | None = None) -> Path:
    """A finished CF sample folder as `cftune generate` writes it (logp_base scored here)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "samples.jsonl", "w") as f:
        for i, r in enumerate(records):
            text = tokenizer.decode(r["token_ids"]) if tokenizer else ""
            f.write(json.dumps({"id": i, "text": text, "token_ids": r["token_ids"],
                                "n_tokens": len(r["token_ids"]), "finished": r["finished"],
                                "logp_base": forward_logprob(base, prefix, r["token_ids"])}) + "\n")
    manifest = {
        "model": base_spec, "model_fingerprint": fingerprint(base_spec) if base_spec else None,
        "tokenizer": {"name_or_path": base_spec, "vocab_size": len(tokenizer),
                      "bos_token_id": tokenizer.bos_token_id,
                      "eos_token_ids": [tokenizer.eos_token_id]} if tokenizer else {},
        "prefix_ids": prefix, "prefix_source": "bos",
        "sampling": sampling or {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                 "max_new_tokens": 64, "seed": 0},
        "counts": counts or {"samples": len(records), "filtered_min_tokens": 0,
                             "filtered_duplicates": 0},
        "topk_logprobs": 0,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def perturb(src: Path, dst: Path, scale: float = 0.05, seed: int = 1) -> Path:
    """A copy of a model folder with Gaussian noise on every weight."""
    model = load_model(str(src), device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(dst)
    load_tokenizer(str(src)).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def cf_setup(tiny_model, tmp_path_factory):
    """(base spec, perturbed spec, sample folder of the base) on the byte-level tiny model."""
    tmp = tmp_path_factory.mktemp("kl")
    base = load_model(str(tiny_model), device="cpu")
    tok = load_tokenizer(str(tiny_model))
    prefix = [tok.bos_token_id]
    records = ancestral(base, prefix, tok.eos_token_id, n=48, max_new=24, seed=0)
    folder = write_sample_folder(tmp / "cfs", base, str(tiny_model), records, prefix, tok)
    return str(tiny_model), str(perturb(tiny_model, tmp / "perturbed")), folder


def test_kl_is_zero_for_base_and_positive_for_perturbed(cf_setup):
    base, perturbed, folder = cf_setup
    tok = load_tokenizer(base)
    fp = fingerprint(base)
    same = kl_to_base(load_model(base, device="cpu"), folder, base_fingerprint=fp, tokenizer=tok)
    # logp_base came from plain one-sample forward passes, the KL from cftune's batched, padded
    # scorer: every sample's log-ratio within 1e-4 nats (fp32 rounding) stands for "exactly 0"
    assert len(same["per_sample"]) == 48
    assert max(abs(d) for d in same["per_sample"]) < 1e-4 and same["stderr"] < 1e-4
    assert same["n"] == 48 and same["n_tokens"] > 48
    other = kl_to_base(load_model(perturbed, device="cpu"), folder, base_fingerprint=fp, tokenizer=tok)
    assert other["value"] > 3 * other["stderr"] > 0
    assert other["ci95"][0] < other["value"] < other["ci95"][1]
    per_token = other["per_token"]
    assert per_token["value"] == pytest.approx(other["value"] * other["n"] / other["n_tokens"])
    assert per_token["n"] == other["n_tokens"] and per_token["stderr"] > 0


def _tiny_vocab_model(seed: int):
    """A 6-token Llama (ids 0-3 text, 4 EOS, 5 BOS) whose sequences can be enumerated."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         tie_word_embeddings=False, bos_token_id=5, eos_token_id=4)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model


def test_kl_matches_exact_enumeration(tmp_path):
    eos, prefix, max_new = 4, [5], 4
    base = _tiny_vocab_model(0)
    model = _tiny_vocab_model(0)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.5)
    text_tokens = [0, 1, 2, 3, 5]
    seqs = [list(s) + [eos] for k in range(max_new) for s in itertools.product(text_tokens, repeat=k)]
    seqs += [list(s) for s in itertools.product(text_tokens, repeat=max_new)]  # cut at max_new
    reqs = [(prefix, s) for s in seqs]
    lp_base = [s.logprob for s in score_continuations(base, reqs, batch_size=256)]
    lp_model = [s.logprob for s in score_continuations(model, reqs, batch_size=256)]
    # enumeration complete (to float32 logsumexp's rounding: ~1e-7 per token)
    assert sum(math.exp(x) for x in lp_base) == pytest.approx(1.0, abs=1e-6)
    exact = sum(math.exp(b) * (b - m) for b, m in zip(lp_base, lp_model))

    records = ancestral(base, prefix, eos, n=3000, max_new=max_new, seed=0)
    folder = write_sample_folder(tmp_path / "cfs", base, None, records, prefix)
    est = kl_to_base(model, folder, batch_size=256)
    assert est["stderr"] < exact / 5  # a meaningful test: the error bar is tight
    assert abs(est["value"] - exact) < 3 * est["stderr"], (est, exact)


@pytest.mark.parametrize("key,value", [("temperature", 0.7), ("top_p", 0.9), ("top_k", 50),
                                       ("min_p", 0.05)])
def test_kl_refuses_biased_sampling(cf_setup, tmp_path, key, value):
    base, _, folder = cf_setup
    biased = tmp_path / "biased"
    shutil.copytree(folder, biased)
    manifest = json.loads((biased / "manifest.json").read_text())
    manifest["sampling"][key] = value
    (biased / "manifest.json").write_text(json.dumps(manifest))
    model = load_model(base, device="cpu")
    with pytest.raises(CftuneError, match=rf"manifest.json: samples were drawn with {key}="):
        kl_to_base(model, biased)
    assert kl_to_base(model, biased, force=True)["forced"] is True


def test_kl_refuses_filtered_samples(cf_setup, tmp_path):
    base, _, folder = cf_setup
    filtered = tmp_path / "filtered"
    shutil.copytree(folder, filtered)
    manifest = json.loads((filtered / "manifest.json").read_text())
    manifest["counts"]["filtered_duplicates"] = 3
    (filtered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CftuneError, match="filtered_duplicates=3.*--no-dedup"):
        kl_to_base(load_model(base, device="cpu"), filtered)


def test_kl_refuses_samples_of_another_base_or_tokenizer(cf_setup, tiny_model_no_bos):
    base, perturbed, folder = cf_setup
    model = load_model(base, device="cpu")
    with pytest.raises(CftuneError, match="not from the base given"):
        kl_to_base(model, folder, base_fingerprint=fingerprint(perturbed))
    with pytest.raises(CftuneError, match="not by the base's tokenizer"):
        kl_to_base(model, folder, tokenizer=load_tokenizer(str(tiny_model_no_bos)))


DTYPE_PAIRS = [(stored, score) for stored in DTYPES for score in DTYPES]


@pytest.fixture(scope="module")
def stored_in(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Sample folders of the tiny base drawn by `cftune generate` in each precision: their
    `logp_base` come from the sampler's incremental (KV-cached) passes, in that precision."""
    root = tmp_path_factory.mktemp("kl_dtypes")
    for dtype in DTYPES:
        assert cli_main(["generate", "--model", str(tiny_model), "--num-samples", "8",
                         "--max-new-tokens", "24", "--batch-size", "4", "--device", "cpu",
                         "--dtype", dtype, "--out", str(root / dtype)]) == 0
    return {dtype: root / dtype for dtype in DTYPES}


def assert_base_kl_is_zero(per_sample: list[float], score: str) -> None:
    """Scored in bf16/fp16, the base against its own re-scoring: exactly 0. In fp32 against the
    stored fp32 `logp_base`: the recomputation error (~1e-6 nats on the tiny model)."""
    bound = 1e-4 if score == "fp32" else 1e-12
    assert max(abs(d) for d in per_sample) < bound, per_sample


@pytest.mark.parametrize("stored, score", DTYPE_PAIRS, ids=[f"{a}-{b}" for a, b in DTYPE_PAIRS])
def test_base_kl_is_zero_in_every_precision(tiny_model, stored_in, tmp_path, capsys, stored,
                                            score):
    """Issue 32, item 5: `cftune eval --kl-samples S --score-dtype D` on the base. With bf16
    `logp_base` scored in bf16 the stored values were taken as the reference, and the
    sampler's cached passes round otherwise than the scorer's full pass (0.073 nats per sample
    for SmolLM2; up to 5e-3 per sample on the tiny model). Not fp32, the base is re-scored."""
    out = tmp_path / "ev"
    assert cli_main(["eval", "--base", str(tiny_model), "--kl-samples", str(stored_in[stored]),
                     "--score-dtype", score, "--batch-size", "8", "--device", "cpu",
                     "--no-cache", "--out", str(out)]) == 0
    capsys.readouterr()
    raw = json.loads((out / "eval.json").read_text())["raw"][str(tiny_model)]
    kl = next(r for r in raw if r["kind"] == "kl")
    assert (kl["score_dtype"], kl["logp_base_dtype"]) == (score, stored)
    assert ("reference_residual" in kl) == ((stored, score) != ("fp32", "fp32"))
    assert_base_kl_is_zero(json.loads((out / "items.json").read_text())[str(tiny_model)]["kl"],
                           score)


@pytest.mark.parametrize("dtype", DTYPES)
def test_runner_base_kl_is_zero_and_fp32_unchanged(tiny_model, stored_in, tmp_path, dtype):
    """The runner draws its held-out set in `eval.score_dtype` and evaluates each model as
    `cftune.experiment.execute.perform` does: `evaluate_model` re-scores the base, so KL(base ‖
    base) is 0 in bf16 and fp16 too; in fp32 the stored `logp_base` stays the reference, so
    every committed (fp32) evaluation keeps its numbers."""
    from cftune.evaluate.model import evaluate_model
    from cftune.experiment.config import Experiment
    from cftune.experiment.evaluation import measure

    config = {"model": str(tiny_model), "cf": {"heldout": 8},
              "task": {"train_rows": 4, "test_rows": 2},
              "eval": {"task_limit": 2, "batch_size": 8, "score_dtype": dtype, "task_acc": False,
                       "plot_y": "task_nll"},
              "runs": [{"name": "full", "method": "full"}]}
    (tmp_path / "exp.yaml").write_text(json.dumps(config))
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    base = str(tiny_model)
    held = stored_in[dtype]
    row = evaluate_model(base, measure(Experiment(tmp_path / "exp.yaml"), held, test_file),
                         fingerprint(base))
    assert_base_kl_is_zero(row["items"]["kl"], dtype)
    if dtype == "fp32":  # the stored logp_base minus the scorer's, as before the fix
        alone = kl_to_base(load_model(base, device="cpu"), held, batch_size=8, limit=8)
        assert row["items"]["kl"] == alone["per_sample"]


def test_the_base_is_rescored_once_for_every_model(tiny_model, stored_in, tmp_path, monkeypatch):
    """`evaluate_model` (`cftune eval` and the runner) re-scores the base for a bf16 KL, and with
    the cache on (`cftune eval`'s default) once: a second model (here the base again, under
    another name) does not load the base again."""
    import cftune.evaluate.model as model_module
    from cftune.evaluate.measure import Measure

    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = model_module.base_reference
    monkeypatch.setattr(model_module, "base_reference",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    m = Measure(kl_samples=stored_in["bf16"], score_dtype="bf16", batch_size=8, device="cpu",
                cache=True)
    base = str(tiny_model)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    for spec in (base, copy):
        row = model_module.evaluate_model(spec, m, fingerprint(base), fingerprint(spec))
        assert_base_kl_is_zero(row["items"]["kl"], "bf16")
    assert len(calls) == 1
