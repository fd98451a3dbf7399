"""`cftune generate --engine vllm` against a stand-in for vLLM (tests/fake_vllm.py): the records
and manifest of the torch engine, every sampling knob set explicitly, per-sample seeds, raw
log-probs, top-K, extension without duplicates, and `--rescore`."""

from __future__ import annotations

import sys

import fake_vllm
import pytest

from cftune.errors import CftuneError
from cftune.generate.config import GenerateConfig, auto_engine
from cftune.generate.samples import iter_samples
from cftune.generate.sampling import sample_seed
from cftune.generate.stage import generate
from cftune.generate.vllm_engine import release_engine
from cftune.io import read_manifest
from cftune.models import load_model, load_tokenizer
from cftune.scoring import score_continuations


@pytest.fixture
def vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm.module())
    monkeypatch.setattr(fake_vllm.LLM, "instances", [])
    monkeypatch.setattr(fake_vllm.LLM, "noise", 0.0)
    release_engine()  # each test starts its own engine (the kept one is another test's fake)
    yield fake_vllm
    release_engine()


def run(model, out, **kw):
    settings = dict(model=str(model), out=str(out), num_samples=6, max_new_tokens=8,
                    batch_size=4, device="cpu", dtype="fp32", engine="vllm", seed=5)
    return generate(GenerateConfig(**{**settings, **kw}))


def torch_logps(model_dir, out) -> list[list[float]]:
    model = load_model(model_dir, "cpu", "fp32", inference=True)
    prefix = read_manifest(out)["prefix_ids"]
    recs = list(iter_samples(out))
    scored = score_continuations(model, [(prefix, r["token_ids"]) for r in recs], 8, "fp32")
    return [s.token_logprobs.tolist() for s in scored]


def test_records_and_manifest_as_the_torch_engine(vllm, tiny_model, tmp_path):
    out = run(tiny_model, tmp_path / "v")
    recs = list(iter_samples(out))
    assert [r["id"] for r in recs] == list(range(6))
    tok = load_tokenizer(tiny_model)
    for r, ref in zip(recs, torch_logps(tiny_model, out), strict=True):
        assert r["n_tokens"] == len(r["token_ids"]) and r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True)
        assert r["finished"] == (r["token_ids"][-1] == tok.eos_token_id)
        assert r["logp_base"] == pytest.approx(sum(ref), abs=1e-4)
    m = read_manifest(out)
    assert m["engine"]["name"] == "vllm" and m["engine"]["logp_base"] == "vllm raw"
    assert m["engine"]["guarantees"]["same_samples_any_batch_size"] is False
    llm = vllm.LLM.instances[0]
    assert llm.kwargs["generation_config"] == "vllm"  # the model's own defaults stay out
    assert llm.kwargs["logprobs_mode"] == "raw_logprobs"  # untempered log-probs
    prompts = [p for p, _ in llm.calls]
    assert prompts == [[tok.bos_token_id]] * 6  # one BOS, as ids: never doubled
    params = [sp for _, sp in llm.calls]
    assert [sp.seed for sp in params] == [sample_seed(5, i) for i in range(6)]
    for sp in params:
        assert (sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (1.0, 1.0, -1, 0.0)
        assert sp.max_tokens == 8 and tok.eos_token_id in sp.stop_token_ids


def test_extension_continues_without_duplicates(vllm, tiny_model, tmp_path):
    run(tiny_model, tmp_path / "v", num_samples=4)
    out = run(tiny_model, tmp_path / "v", num_samples=10)
    assert [r["id"] for r in iter_samples(out)] == list(range(10))
    assert read_manifest(out)["counts"]["samples"] == 10


def test_topk_logprobs_are_the_base_top_k(vllm, tiny_model, tmp_path):
    recs = list(iter_samples(run(tiny_model, tmp_path / "v", topk_logprobs=3)))
    for r in recs:
        assert len(r["topk_ids"]) == len(r["token_ids"])
        for ids, lps in zip(r["topk_ids"], r["topk_logprobs"], strict=True):
            assert len(ids) == 3 and lps == sorted(lps, reverse=True)


def test_rescore_replaces_the_engine_log_probs(vllm, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(fake_vllm.LLM, "noise", 0.01)  # another engine's float rounding
    raw = run(tiny_model, tmp_path / "raw")
    fixed = run(tiny_model, tmp_path / "fixed", rescore=True)
    for r, ref in zip(iter_samples(raw), torch_logps(tiny_model, raw), strict=True):
        assert r["logp_base"] == pytest.approx(sum(ref) + 0.01 * len(ref), abs=1e-4)
    for r, ref in zip(iter_samples(fixed), torch_logps(tiny_model, fixed), strict=True):
        assert r["logp_base"] == pytest.approx(sum(ref), abs=1e-4)
    assert read_manifest(fixed)["engine"]["logp_base"] == "torch, teacher-forced (--rescore)"


def test_without_vllm_a_one_line_error(monkeypatch, tiny_model, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(CftuneError, match=r"--engine vllm needs vLLM: pip install"):
        run(tiny_model, tmp_path / "v")


def test_rescore_needs_the_vllm_engine(tiny_model, tmp_path):
    with pytest.raises(CftuneError, match="rescore applies to --engine vllm"):
        GenerateConfig(model=str(tiny_model), out=str(tmp_path), rescore=True, engine="torch")


def test_auto_engine_is_vllm_on_one_gpu_where_installed(vllm, monkeypatch):
    assert auto_engine("cuda") == "vllm" and auto_engine("cpu") == "torch"
    assert auto_engine("cuda", processes=2) == "torch"  # vLLM shards a model itself
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert auto_engine("cuda") == "torch"


def test_auto_engine_on_a_cpu_is_torch_and_a_folder_keeps_its_engine(vllm, tiny_model, tmp_path):
    torch_run = run(tiny_model, tmp_path / "t", num_samples=2, engine="auto", rescore=True)
    m = read_manifest(torch_run)
    assert m["engine"]["name"] == "torch" and "engine" not in m["settings"] and not vllm.LLM.instances
    run(tiny_model, tmp_path / "v", num_samples=2)  # started with vLLM ...
    extended = run(tiny_model, tmp_path / "v", num_samples=4, engine="auto")  # ... extended so
    assert read_manifest(extended)["engine"]["name"] == "vllm"
    assert [r["id"] for r in iter_samples(extended)] == list(range(4))


def test_one_engine_draws_every_pool_of_a_model(vllm, tiny_model, tmp_path):
    """The runner's pools (seeds, held-out set) share one engine start; each keeps its seeds."""
    run(tiny_model, tmp_path / "a", num_samples=2, seed=1)
    run(tiny_model, tmp_path / "b", num_samples=2, seed=2)
    assert len(vllm.LLM.instances) == 1
    seeds = [sp.seed for _, sp in vllm.LLM.instances[0].calls]
    assert seeds == [sample_seed(s, i) for s in (1, 2) for i in range(2)]


def test_engine_is_part_of_the_settings(vllm, tiny_model, tmp_path):
    """A vLLM folder is not extended by the torch sampler (another law of the same samples);
    a torch folder's settings name no engine, as folders written before the setting existed."""
    run(tiny_model, tmp_path / "v", num_samples=2)
    assert read_manifest(tmp_path / "v")["settings"]["engine"] == "vllm"
    with pytest.raises(CftuneError, match=r"other settings \(engine differ\)"):
        run(tiny_model, tmp_path / "v", num_samples=4, engine="torch")
    torch_run = run(tiny_model, tmp_path / "t", num_samples=2, engine="torch")
    assert "engine" not in read_manifest(torch_run)["settings"]


# ------------------------------------------------------------------ greedy decoding in `cftune eval`

def test_task_accuracy_decoded_by_vllm_equals_the_torch_loop(vllm, tiny_model, tmp_path):
    """`decoder("vllm", ...)` gives task_accuracy the same answers as cftune's torch loop
    (greedy, cut at the same stop strings), asking vLLM for T = 0 and the stop strings."""
    import json

    from cftune.evaluate.task_accuracy import STOP, decoder, task_accuracy

    rows = [{"question": f"What is {i}+{i}?", "answer": f"#### {2 * i}"} for i in range(4)]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(tiny_model)
    torch_run = task_accuracy(load_model(tiny_model, "cpu", "fp32", inference=True), tok, task,
                              max_new_tokens=12, batch_size=2)
    model = load_model(tiny_model, "cpu", "fp32", inference=True)
    assert decoder("auto", model, str(tiny_model), tok, 12, "fp32") == ("torch", None)  # a CPU
    engine, decode = decoder("vllm", model, str(tiny_model), tok, 12, "fp32")
    vllm_run = task_accuracy(model, tok, task, max_new_tokens=12, decode=decode)
    assert engine == "vllm" and vllm_run["correct"] == torch_run["correct"]
    assert [e["output"] for e in vllm_run["examples"]] == [e["output"] for e in torch_run["examples"]]
    sp = vllm.LLM.instances[0].calls[0][1]
    assert sp.temperature == 0.0 and list(sp.stop) == list(STOP) and sp.max_tokens == 12


def test_vllm_does_not_decode_a_lora_adapter(vllm, tiny_model, tmp_path):
    from cftune.evaluate.task_accuracy import decoder

    (tmp_path / "adapter_config.json").write_text("{}")
    model = load_model(tiny_model, "cpu", "fp32", inference=True)
    with pytest.raises(CftuneError, match="LoRA adapter, which vLLM does not decode"):
        decoder("vllm", model, str(tmp_path), load_tokenizer(tiny_model), 8, "fp32")


def test_an_unknown_decode_engine_is_one_line_error(tmp_path):
    from cftune.evaluate.stage import EvalConfig

    with pytest.raises(CftuneError, match="decode_engine must be one of auto, torch, vllm"):
        EvalConfig(task=str(tmp_path / "t.jsonl"), decode_engine="tgi")
