"""`cftune generate`: determinism, resume, stored log-probs, prefixes, filters, files, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cftune.generate.stage as gen_module
from cftune.cli import main as cli_main
from cftune.errors import CftuneError
from cftune.generate.config import GenerateConfig
from cftune.generate.sampler import filter_probs, pick
from cftune.generate.samples import iter_samples, load_samples
from cftune.generate.sampling import SamplingParams
from cftune.generate.stage import generate
from cftune.io import read_manifest
from cftune.models import load_model, load_tokenizer
from cftune.scoring import score_continuations


def run(model: Path, out: Path, **kw) -> Path:
    """Sample in fp32 (not the machine-dependent `auto`): the tests compare with fp32 passes."""
    settings = dict(model=str(model), out=str(out), num_samples=24, max_new_tokens=24,
                    batch_size=5, device="cpu", dtype="fp32")
    settings.update(kw)
    return generate(GenerateConfig(**settings))


def records(folder: Path) -> list[dict]:
    return list(iter_samples(folder))


def test_same_samples_whatever_the_batch_size(tiny_model, tmp_path):
    a = records(run(tiny_model, tmp_path / "a", batch_size=1))
    b = records(run(tiny_model, tmp_path / "b", batch_size=7))
    c = records(run(tiny_model, tmp_path / "c", batch_size=32))
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b] == [r["token_ids"] for r in c]
    assert len({tuple(r["token_ids"]) for r in a}) == 24  # distinct samples
    assert any(r["finished"] for r in a) and any(not r["finished"] for r in a)


def test_other_seed_other_samples(tiny_model, tmp_path):
    a = records(run(tiny_model, tmp_path / "a", seed=0))
    b = records(run(tiny_model, tmp_path / "b", seed=1))
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in b]


def test_logp_base_equals_teacher_forced_recomputation(tiny_model, tmp_path):
    out = run(tiny_model, tmp_path / "s", temperature=0.7, top_k=50)  # logp stays untempered
    prefix = read_manifest(out)["prefix_ids"]
    recs = records(out)
    scored = score_continuations(load_model(tiny_model, "cpu"),
                                 [(prefix, r["token_ids"]) for r in recs])
    for r, s in zip(recs, scored):
        assert abs(r["logp_base"] - s.logprob) < 1e-3
        assert r["n_tokens"] == len(r["token_ids"])
        assert r["finished"] == (r["token_ids"][-1] == 257)  # EOS ends exactly the finished ones


def test_record_fields_and_manifest(tiny_model, tmp_path):
    out = run(tiny_model, tmp_path / "s", topk_logprobs=4)
    m = read_manifest(out)
    assert m["prefix_ids"] == [256] and m["prefix_source"] == "bos"
    assert m["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                             "max_new_tokens": 24, "seed": 0}
    assert m["counts"]["samples"] == 24
    assert m["counts"]["finished"] + m["counts"]["truncated"] == 24
    assert m["model_fingerprint"].startswith("sha256:") and m["versions"]["torch"]
    tok = load_tokenizer(tiny_model)
    for r in records(out):
        body = r["token_ids"][:-1] if r["finished"] else r["token_ids"]
        assert r["text"] == tok.decode(body)
        assert len(r["topk_ids"]) == len(r["topk_logprobs"]) == r["n_tokens"]
        assert all(len(k) == 4 for k in r["topk_ids"])
        # the top-1 log-prob bounds the sampled token's log-prob at every position
        assert r["logp_base"] <= sum(lp[0] for lp in r["topk_logprobs"]) + 1e-3


def dies_in_block(block: int, written: int):
    """A stand-in for `_Acceptor.offer_block` that, in block `block`, writes `written` records
    and half of the next one, then dies before the block's progress update, as a kill would."""
    offer_block, calls = gen_module._Acceptor.offer_block, []

    def offer(self, drawn, block_end):
        calls.append(block_end)
        if len(calls) == block:
            for d in drawn[:written]:
                self.out.write(gen_module.to_record(d, self.tokenizer))
            self.out._f.write('{"id": 99, "text": "half a rec')
            self.out._f.flush()
            raise KeyboardInterrupt
        return offer_block(self, drawn, block_end)
    return offer


def test_resume_after_torn_write_equals_uninterrupted(tiny_model, tmp_path, monkeypatch):
    kw = dict(num_samples=60, batch_size=2, min_tokens=3)  # blocks of 16 ids
    full = run(tiny_model, tmp_path / "full", **kw)
    part = tmp_path / "part"
    offer_block = gen_module._Acceptor.offer_block
    monkeypatch.setattr(gen_module._Acceptor, "offer_block", dies_in_block(4, written=5))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, part, **kw)
    monkeypatch.setattr(gen_module._Acceptor, "offer_block", offer_block)
    assert not (part / "manifest.json").exists()
    run(tiny_model, part, **kw)
    assert (part / "samples.jsonl").read_bytes() == (full / "samples.jsonl").read_bytes()
    assert read_manifest(part)["counts"]["resumed_from"] > 0
    assert read_manifest(part)["counts"] == {**read_manifest(full)["counts"],
                                              "resumed_from": read_manifest(part)["counts"]["resumed_from"]}


def test_kill_9_then_rerun_equals_uninterrupted(tiny_model, tmp_path):
    args = ["generate", "--model", str(tiny_model), "--num-samples", "400",
            "--max-new-tokens", "40", "--batch-size", "8", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cftune", *args, "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    samples = killed / "samples.jsonl"
    while time.time() < deadline:
        if samples.exists() and samples.read_bytes().count(b"\n") >= 30:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "run finished before it could be killed"
    # The same command again (same thread count: float sums depend on it), and a clean run.
    for out in (killed, tmp_path / "clean"):
        subprocess.run([sys.executable, "-m", "cftune", *args, "--out", str(out)], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert samples.read_bytes() == (tmp_path / "clean" / "samples.jsonl").read_bytes()


def test_extend_num_samples_keeps_the_first_ones(tiny_model, tmp_path):
    small_bytes = (run(tiny_model, tmp_path / "s", num_samples=10) / "samples.jsonl").read_bytes()
    bigger = records(run(tiny_model, tmp_path / "s", num_samples=24))
    fresh = records(run(tiny_model, tmp_path / "f", num_samples=24))
    assert (tmp_path / "s" / "samples.jsonl").read_bytes().startswith(small_bytes)  # kept
    assert len(bigger) == 24 and [r["token_ids"] for r in bigger] == [r["token_ids"] for r in fresh]


def test_filters_count_and_keep_exactly_n(tiny_model, tmp_path):
    with pytest.raises(CftuneError, match="min_tokens"):
        run(tiny_model, tmp_path / "s", min_tokens=6, max_new_tokens=3)
    out = run(tiny_model, tmp_path / "t", min_tokens=5)
    m = read_manifest(out)
    recs = records(out)
    assert len(recs) == 24 and all(r["n_tokens"] - r["finished"] >= 5 for r in recs)
    assert m["counts"]["filtered_min_tokens"] > 0
    assert m["counts"]["ids_drawn"] == 24 + m["counts"]["filtered_min_tokens"] + \
        m["counts"]["filtered_duplicates"]
    assert [r["id"] for r in recs] == sorted(r["id"] for r in recs)


def test_duplicates_are_kept_unless_dedup_is_asked(tiny_model, tmp_path):
    """Samples are draws from p_base: repeats stay by default (dropping them under-weights the
    most probable sequences, issue 9 item 5); `dedup` is opt-in and recorded as a filter."""
    plain = run(tiny_model, tmp_path / "p", max_new_tokens=1, num_samples=40)
    assert len({tuple(r["token_ids"]) for r in records(plain)}) < 40  # 1-token samples repeat
    m = read_manifest(plain)
    assert m["counts"]["filtered_duplicates"] == 0 and m["filters"]["filtered"] is False
    out = run(tiny_model, tmp_path / "s", max_new_tokens=1, num_samples=40, dedup=True)
    recs = records(out)
    assert len({tuple(r["token_ids"]) for r in recs}) == 40
    m = read_manifest(out)
    assert m["counts"]["filtered_duplicates"] > 0 and m["filters"] == {
        "dedup": True, "min_tokens": 0, "filtered": True}


def test_sampler_matches_the_model_distribution(tiny_model, tmp_path):
    """2000 one-token samples: empirical frequencies match softmax(logits) (untempered)."""
    out = run(tiny_model, tmp_path / "s", max_new_tokens=1, num_samples=2000, dedup=False,
              batch_size=256)
    counts = torch.bincount(torch.tensor([r["token_ids"][0] for r in records(out)]),
                            minlength=259).double()
    model = load_model(tiny_model, "cpu")
    probs = torch.softmax(model(torch.tensor([[256]])).logits[0, -1].double(), -1)
    top = torch.argsort(probs, descending=True)[:5]
    for t in top:
        expected, sd = 2000 * probs[t], (2000 * probs[t] * (1 - probs[t])).sqrt()
        assert abs(counts[t] - expected) < 4 * sd + 1


def test_filter_probs_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (filter_probs(logits, SamplingParams(top_k=2)) > 0).sum() == 2
    kept = filter_probs(logits, SamplingParams(top_p=0.7))
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0, 0]], dtype=kept.dtype))
    assert (filter_probs(logits, SamplingParams(min_p=0.2)) > 0).sum() == 3  # 0.05 < 0.2*0.5
    hot = filter_probs(logits, SamplingParams(temperature=100.0))
    assert hot.max() - hot.min() < 0.02
    probs = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    assert pick(probs, torch.tensor([0.1], dtype=torch.float64)).item() == 0
    assert pick(probs, torch.tensor([0.49], dtype=torch.float64)).item() == 1
    assert pick(probs, torch.tensor([0.99], dtype=torch.float64)).item() == 2


def test_no_double_bos_with_text_prefix(tiny_model, tmp_path):
    out = run(tiny_model, tmp_path / "s", prefix="Once upon", num_samples=3)
    m = read_manifest(out)
    assert m["prefix_ids"][0] == 256 and m["prefix_ids"].count(256) == 1
    assert m["prefix_ids"][1:] == load_tokenizer(tiny_model)("Once upon").input_ids
    assert m["prefix_source"] == "text"


def test_no_bos_tokenizer_falls_back_to_eos(tiny_model_no_bos, tmp_path):
    out = run(tiny_model_no_bos, tmp_path / "s", num_samples=4)
    m = read_manifest(out)
    eos = load_tokenizer(tiny_model_no_bos).eos_token_id
    assert m["prefix_ids"] == [eos] and m["prefix_source"] == "eos-fallback"


def test_chat_prefix_starts_an_assistant_turn(tiny_model, tmp_path):
    out = run(tiny_model, tmp_path / "s", chat=True, num_samples=6)
    m = read_manifest(out)
    tok = load_tokenizer(tiny_model)
    assert tok.decode(m["prefix_ids"]).endswith("<|bos|>assistant\n")
    assert m["prefix_source"] == "chat"
    scored = score_continuations(load_model(tiny_model, "cpu"),
                                 [(m["prefix_ids"], r["token_ids"]) for r in records(out)])
    assert all(abs(r["logp_base"] - s.logprob) < 1e-3 for r, s in zip(records(out), scored))


def test_task_prompts_give_contextual_samples(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in ["2+2?", "Name a cat."]))
    out = run(tiny_model, tmp_path / "s", task_prompts=str(prompts), num_samples=4,
              prompt_format="qa")
    tok = load_tokenizer(tiny_model)
    recs = records(out)
    # posed as training poses them (issue 9, item 3: the bare question made continuations)
    assert tok.decode(recs[0]["prompt_ids"]) == "<|endoftext|>Question: 2+2?\nAnswer:"
    assert tok.decode(recs[1]["prompt_ids"]) == "<|endoftext|>Question: Name a cat.\nAnswer:"
    assert read_manifest(out)["task_prompt_format"] == "qa"
    scored = score_continuations(load_model(tiny_model, "cpu"),
                                 [(r["prompt_ids"], r["token_ids"]) for r in recs])
    assert all(abs(r["logp_base"] - s.logprob) < 1e-3 for r, s in zip(recs, scored))


def test_parquet_and_exports_load_with_datasets(tiny_model, tmp_path):
    import datasets

    out = run(tiny_model, tmp_path / "s", format="parquet", export=["trl", "axolotl", "text"])
    assert (out / "samples.parquet").exists() and not (out / "samples.jsonl").exists()
    ds = load_samples(out)
    assert len(ds) == 24 and set(ds.column_names) >= {"id", "text", "token_ids", "logp_base"}
    trl = datasets.load_dataset("json", data_files=str(out / "trl.jsonl"), split="train")
    row = trl[0]
    assert row["input_ids"][0] == 256 and row["labels"][0] == -100
    assert row["input_ids"][1:] == ds[0]["token_ids"] == row["labels"][1:]
    axo = datasets.load_dataset("json", data_files=str(out / "axolotl.jsonl"), split="train")
    assert axo[0]["text"] == "<|bos|>" + ds[0]["text"]


def test_two_processes_with_accelerate_equal_one(tiny_model, tmp_path):
    args = ["--model", str(tiny_model), "--num-samples", "30", "--max-new-tokens", "20",
            "--batch-size", "4", "--device", "cpu", "--min-tokens", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # On a CPU-only machine `--multi_gpu` makes accelerate start torchrun workers that use gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "cftune", "generate"]
    res = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    subprocess.run([sys.executable, "-m", "cftune", "generate", *args, "--out",
                    str(tmp_path / "one")], env=env, check=True, capture_output=True)
    one = (tmp_path / "one" / "samples.jsonl").read_bytes()
    assert (tmp_path / "two" / "samples.jsonl").read_bytes() == one
    assert read_manifest(tmp_path / "two")["processes"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--model", "no/such/model/folder"], "unknown model"),
    (["--num-samples", "0"], "num_samples must be > 0"),
    (["--num-samples", "-3"], "num_samples must be > 0"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prefix-ids", "5,99999"], "outside the vocabulary"),
    (["--num-samples", "many"], "not a valid int"),
])
def test_bad_input_is_one_line_error(tiny_model, tmp_path, capsys, flags, message):
    base = ["generate", "--model", str(tiny_model), "--out", str(tmp_path / "o"),
            "--num-samples", "2", "--device", "cpu"]
    assert cli_main([*base, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_folder_with_other_settings_is_refused(tiny_model, tmp_path, capsys):
    run(tiny_model, tmp_path / "s", num_samples=3)
    with pytest.raises(CftuneError, match="temperature differ"):
        run(tiny_model, tmp_path / "s", num_samples=3, temperature=0.5)
    assert cli_main(["generate", "--model", str(tiny_model), "--out", str(tmp_path / "s"),
                     "--num-samples", "3", "--top-k", "5", "--device", "cpu"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_unwritable_output_folder(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CftuneError, match="not writable|exists"):
        run(tiny_model, blocker / "sub", num_samples=2)


@pytest.mark.integration
def test_real_embedded_model_samples(embedded_model, tmp_path):
    out = generate(GenerateConfig(model=embedded_model, out=str(tmp_path / "s"), num_samples=4,
                                  max_new_tokens=16, batch_size=4, device="cpu", dtype="fp32"))
    m = read_manifest(out)
    tok = load_tokenizer(embedded_model)
    assert m["prefix_ids"] == [tok.bos_token_id] == [1]
    recs = records(out)
    assert len(recs) == 4 and all(r["text"] for r in recs)
    scored = score_continuations(load_model(embedded_model, "cpu"),
                                 [(m["prefix_ids"], r["token_ids"]) for r in recs])
    assert all(abs(r["logp_base"] - s.logprob) < 1e-3 for r, s in zip(recs, scored))


def test_sampler_with_mixed_prefix_lengths_matches_teacher_forcing(tiny_model):
    """Rows refilled with prefixes of other lengths (cache shifted right, grown, cropped)."""
    from cftune.generate.sampler import ContinuousSampler
    from cftune.generate.sampling import Job

    model = load_model(tiny_model, "cpu")
    prefixes = [(256,), (256, *range(40, 75)), (256, 50, 51), (256, *range(80, 90))]
    sampler = ContinuousSampler(model, SamplingParams(max_new_tokens=8), [257], seed=3,
                                batch_size=3)
    drawn = sorted(sampler.run(Job(i, prefixes[i % 4]) for i in range(20)), key=lambda d: d.id)
    assert [d.id for d in drawn] == list(range(20))
    scored = score_continuations(model, [(list(prefixes[d.id % 4]), d.token_ids) for d in drawn])
    for d, s in zip(drawn, scored):
        assert torch.allclose(torch.tensor(d.token_logprobs, dtype=torch.float64),
                              s.token_logprobs, atol=1e-4)


def test_python_api_returns_a_dataset(tiny_model, tmp_path):
    from cftune.generate.stage import generate_dataset

    ds = generate_dataset(GenerateConfig(model=str(tiny_model), out=str(tmp_path / "s"),
                                         num_samples=5, max_new_tokens=6, device="cpu"))
    assert len(ds) == 5 and ds[0]["id"] == 0 and isinstance(ds[0]["logp_base"], float)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_model_tied"])
def test_stored_logp_base_equals_a_plain_forward_pass(fixture, request, tmp_path):
    """Each sample's stored logp_base (the sampler's incremental, KV-cached computation) equals
    log p_base of its tokens from one plain transformers forward pass, to 1e-4 nats in fp32:
    a check independent of cftune's scorer, which the KL estimate uses."""
    folder = request.getfixturevalue(fixture)
    out = run(folder, tmp_path / "s", num_samples=16, max_new_tokens=12)
    prefix = read_manifest(out)["prefix_ids"]
    model = load_model(folder, "cpu")
    for r in records(out):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix + r["token_ids"]])).logits[0].double()
        logp = torch.log_softmax(logits[len(prefix) - 1:-1], -1)
        expected = float(logp.gather(-1, torch.tensor(r["token_ids"])[:, None]).sum())
        assert abs(r["logp_base"] - expected) < 1e-4, (r["id"], r["logp_base"], expected)
