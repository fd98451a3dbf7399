"""Task readers, prompt masking, CF examples and the mixing batch sampler."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from cftune.errors import CftuneError
from cftune.io import atomic_write_json
from cftune.models import load_model, load_tokenizer
from cftune.train import batches as batching
from cftune.train import data

ROWS = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
        for i in range(12)]
FMT = data.TaskFormat(prompt_field="question", response_field="answer", max_length=256)


def make_cf_folder(folder: Path, model_dir: Path, n: int, seed: int = 0, topk: int = 0,
                   max_new_tokens: int = 24, prompts: list[list[int]] | None = None) -> Path:
    """A finished CF sample folder drawn from `model_dir` at T=1, as `cftune generate` writes it.

    With `prompts`, record i is drawn after prompts[i % len(prompts)] and carries it as
    `prompt_ids` (contextual data). Used by the other test modules too.
    """
    from cftune.generate.sampler import ContinuousSampler
    from cftune.generate.sampling import Job, SamplingParams

    folder.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, device="cpu")
    prefix = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    sampler = ContinuousSampler(model, SamplingParams(max_new_tokens=max_new_tokens),
                                [tok.eos_token_id], seed=seed, batch_size=16, topk_logprobs=topk)
    ctx = [prompts[i % len(prompts)] if prompts else prefix for i in range(n)]
    drawn = sorted(sampler.run(Job(i, tuple(ctx[i])) for i in range(n)), key=lambda d: d.id)
    with open(folder / "samples.jsonl", "w") as f:
        for d in drawn:
            record = {"id": d.id, "text": tok.decode(d.token_ids), "token_ids": d.token_ids,
                      "n_tokens": len(d.token_ids), "finished": d.finished,
                      "logp_base": float(sum(d.token_logprobs))}
            if topk:
                record.update(topk_ids=d.topk_ids, topk_logprobs=d.topk_logprobs)
            if prompts:
                record["prompt_ids"] = ctx[d.id]
            f.write(json.dumps(record) + "\n")
    atomic_write_json(folder / "manifest.json", {
        "model": str(model_dir), "prefix_ids": prefix, "prefix_source": "bos",
        "topk_logprobs": topk, "counts": {"samples": n},
        "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                     "max_new_tokens": max_new_tokens, "seed": seed}})
    return folder


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def cf_folder(tiny_model, tmp_path_factory):
    return make_cf_folder(tmp_path_factory.mktemp("cf"), tiny_model, 40, topk=3)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_tokens_carry_no_loss_and_response_plus_eos_all_do(tok, tmp_path):
    examples, counts = data.task_examples(write_jsonl(tmp_path / "t.jsonl", ROWS), tok, FMT)
    assert counts.kept == len(ROWS) and counts.dropped == counts.truncated == 0
    for row, e in zip(ROWS, examples):
        prompt = data.format_prompt(tok, row["question"], FMT)
        n = len(prompt)
        assert e["input_ids"][:n] == prompt and all(t == -100 for t in e["labels"][:n])
        targets = e["labels"][n:]
        assert targets == e["input_ids"][n:] and -100 not in targets
        assert targets[-1] == tok.eos_token_id
        assert tok.decode(targets[:-1]) == row["answer"]
    # the chat template was used (the tiny tokenizer has one): the prompt ends with the opened turn
    assert tok.decode(data.format_prompt(tok, "hi", FMT)).endswith("assistant\n")


def test_plain_prompt_format_and_text_shape(tok):
    """Plain prompts and generic documents start where pretraining documents start
    (`<|endoftext|>`), never at the chat-turn marker every CF sample starts from (issue 9,
    item 1: replay used to learn "prose follows <|im_start|>")."""
    fmt = data.TaskFormat(prompt_format="plain", prompt_template="Q: {prompt}\nA: ")
    ids, labels = data.task_example({"prompt": "2+2?", "response": "4"}, tok, fmt, "x")
    assert tok.decode(ids) == "<|endoftext|>Q: 2+2?\nA: 4<|eos|>"
    assert [t for t in labels if t != -100] == tok("4<|eos|>", add_special_tokens=False)["input_ids"]
    ids, labels = data.task_example({"text": "hello"}, tok, fmt, "x")
    assert tok.decode(ids) == "<|endoftext|>hello<|eos|>" and labels == [-100] + ids[1:]
    qa = data.TaskFormat(prompt_format="qa")
    ids, labels = data.task_example({"prompt": "2+2?", "response": "4"}, tok, qa, "x")
    assert tok.decode(ids) == "<|endoftext|>Question: 2+2?\nAnswer: 4<|eos|>"
    assert tok.decode([t for t in labels if t != -100]) == " 4<|eos|>"


def test_doc_start_rule_and_override(tok, tiny_model_no_bos):
    from cftune.models import load_tokenizer
    from cftune.prompts import doc_start_ids

    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    assert doc_start_ids(tok) == [endoftext] != [tok.bos_token_id]
    assert doc_start_ids(tok, "<|bos|>") == [tok.bos_token_id]
    assert doc_start_ids(tok, "7") == [7] and doc_start_ids(tok, "") == []
    with pytest.raises(CftuneError, match="doc_start = 'nope' is not a token"):
        doc_start_ids(tok, "nope")
    gpt2_like = load_tokenizer(tiny_model_no_bos)  # no bos, no chat template
    assert doc_start_ids(gpt2_like) == [gpt2_like.eos_token_id]
    fmt = data.TaskFormat(prompt_format="plain", doc_start="")
    ids, _ = data.task_example({"text": "hello"}, tok, fmt, "x")
    assert tok.decode(ids) == "hello<|eos|>"


def test_messages_shape_trains_assistant_turns_only(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    ids, labels = data.task_example({"messages": messages}, tok, data.TaskFormat(), "x")
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    spans = tok.decode([t for t in labels if t != -100])
    assert spans == "hello<|eos|>\nciao<|eos|>\n"


def test_readers_agree_on_jsonl_csv_parquet_and_datasets_folder(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "t.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "ds"))
    for path in (jsonl, tmp_path / "t.csv", tmp_path / "t.parquet", tmp_path / "ds"):
        assert data.read_rows(path) == ROWS, path


def test_overlong_rows_are_truncated_or_dropped_and_counted(tok, tmp_path):
    rows = ROWS[:3] + [{"question": "x" * 10, "answer": "y" * 300}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cut, c1 = data.task_examples(path, tok, data.TaskFormat(**{**FMT.__dict__, "max_length": 64}))
    assert (c1.kept, c1.truncated, c1.dropped) == (4, 1, 0) and len(cut[-1]["input_ids"]) == 64
    _, c2 = data.task_examples(path, tok, data.TaskFormat(**{**FMT.__dict__, "max_length": 64,
                                                               "overlong": "drop"}))
    assert (c2.kept, c2.truncated, c2.dropped) == (3, 0, 1)


def test_task_file_without_expected_fields_is_one_clear_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(CftuneError, match=r"t.jsonl row 1: row has fields a, q .*--prompt-field"):
        data.task_examples(path, tok, data.TaskFormat())
    with pytest.raises(CftuneError, match="not found"):
        data.read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(CftuneError, match="bad.jsonl line 2"):
        data.read_rows(tmp_path / "bad.jsonl")


def test_cf_examples_mask_the_prefix_and_target_every_sampled_token(cf_folder):
    examples, counts = data.cf_examples(cf_folder, FMT, kd=True)
    records = [json.loads(x) for x in (cf_folder / "samples.jsonl").read_text().splitlines()]
    prefix = json.loads((cf_folder / "manifest.json").read_text())["prefix_ids"]
    assert counts.kept == len(records) == len(examples)
    eos = load_tokenizer(json.loads((cf_folder / "manifest.json").read_text())["model"]).eos_token_id
    assert any(r["finished"] for r in records) and any(not r["finished"] for r in records)
    for r, e in zip(records, examples):
        assert e["input_ids"] == prefix + r["token_ids"] and e["source"] == data.CF
        assert e["labels"] == [-100] * len(prefix) + r["token_ids"]
        assert (e["labels"][-1] == eos) == r["finished"]  # EOS is a target only when sampled
        assert e["topk_ids"] == r["topk_ids"] and len(e["topk_logprobs"]) == r["n_tokens"]


def test_record_prompt_ids_override_the_manifest_prefix(tiny_model, tok, tmp_path):
    prompts = [data.format_prompt(tok, "What is 1 plus 1?", FMT),
               data.format_prompt(tok, "Name a colour.", FMT)]
    folder = make_cf_folder(tmp_path / "ctx", tiny_model, 6, prompts=prompts)
    examples, _ = data.cf_examples(folder, FMT, require_prompts=True)
    for i, e in enumerate(examples):
        p = prompts[i % 2]
        assert e["input_ids"][:len(p)] == p and e["labels"][:len(p)] == [-100] * len(p)
        assert -100 not in e["labels"][len(p):]
    plain = make_cf_folder(tmp_path / "plain", tiny_model, 2)
    with pytest.raises(CftuneError, match="no `prompt_ids`.*--task-prompts"):
        data.cf_examples(plain, FMT, require_prompts=True)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 3.0])
def test_mix_holds_its_ratio_in_every_batch_and_uses_fresh_cf_first(ratio):
    n_task, n_cf, bs = 50, 400, 8
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (n_task + n_cf,), generator=rng).tolist()
    sampler = batching.MixedBatchSampler(lengths, n_task, bs, ratio=ratio, seed=3)
    seen_cf: list[int] = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(i for i in flat if i < n_task) == list(range(n_task))  # each task ex. once
        # every batch holds bs task examples (one holds the remainder), whatever the
        # ratio: a second stream comes on top of the task examples (issue 9, item 4)
        n_tasks = [sum(i < n_task for i in b) for b in batches]
        assert sorted(n_tasks, reverse=True) == \
            [bs] * (len(batches) - 1) + [n_task - bs * (len(batches) - 1)]
        for b, k in zip(batches, n_tasks):
            n_c = sum(i >= n_task for i in b)
            assert abs(n_c - k * ratio) <= 1
        seen_cf += [i for i in flat if i >= n_task]
        assert list(sampler) == batches  # deterministic for a seed and epoch
    assert len(seen_cf) == 2 * round(ratio * n_task)
    assert len(set(seen_cf)) == min(len(seen_cf), n_cf)  # no CF sample reused before the pool ends


def test_length_grouping_cuts_padding():
    lengths = torch.randint(5, 300, (400,), generator=torch.Generator().manual_seed(1)).tolist()

    def padding(group: int) -> int:
        batches = batching.MixedBatchSampler(lengths, 200, 8, ratio=1.0, group=group)
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(16) < 0.3 * padding(1)


def test_collator_pads_orders_task_first_and_aligns_topk(cf_folder, tok, tmp_path):
    task, _ = data.task_examples(write_jsonl(tmp_path / "t.jsonl", ROWS[:2]), tok, FMT)
    cf, _ = data.cf_examples(cf_folder, FMT, kd=True)
    batch = batching.Collator(pad_id=tok.pad_token_id, kd=True)([cf[0], task[0], cf[1], task[1]])
    assert batch["source"].tolist() == [0, 0, 1, 1]
    width = batch["input_ids"].shape[1]
    for row, e in zip(range(4), [task[0], task[1], cf[0], cf[1]]):
        n = len(e["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"]
        assert batch["attention_mask"][row].sum() == n and (batch["labels"][row, n:] == -100).all()
        assert n == width or batch["input_ids"][row, n] == tok.pad_token_id
    k = len(cf[0]["topk_ids"][0])
    n = len(cf[0]["input_ids"])
    targets = batch["labels"][2] != -100
    assert batch["topk_ids"][2][targets].tolist() == cf[0]["topk_ids"]
    assert batch["topk_ids"].shape[-1] == k and (batch["topk_ids"][0] == 0).all()
    assert batch["topk_ids"][2, n - 1, 0] == cf[0]["topk_ids"][-1][0]


def test_tokenised_examples_are_cached_by_content(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    calls = Counter()

    def build():
        calls["n"] += 1
        return data.task_examples(path, tok, FMT)

    first = data.cached({"file": data.file_key(path)}, build)
    again = data.cached({"file": data.file_key(path)}, build)
    assert calls["n"] == 1 and again[0] == first[0] and again[1] == first[1]
    write_jsonl(path, ROWS[:3])  # changed content: a new key, tokenised afresh
    data.cached({"file": data.file_key(path)}, build)
    assert calls["n"] == 2


def test_builtin_task_examples_are_cached_by_the_rows_drawn(tok, tmp_path, monkeypatch):
    """A built-in task is keyed by the rows its generator draws, not by its name: a changed
    generator (a new cftune version) must not reuse examples tokenised from the old one."""
    from cftune import tasks
    from cftune.train.config import TrainConfig
    from cftune.train.streams import examples

    monkeypatch.setenv("CFTUNE_CACHE", str(tmp_path / "cache"))
    config = TrainConfig(task="builtin:arithmetic", method="full", task_rows=4,
                         prompt_field="question", response_field="answer",
                         out=str(tmp_path / "run"))
    before, _ = examples(config, tok, "task", config.task)
    monkeypatch.setitem(tasks.TASKS, "arithmetic", lambda split, n, seed: ROWS[:n])
    after, _ = examples(config, tok, "task", config.task)
    assert before != after
    assert after == data.task_examples(tmp_path, tok, config.task_format(), ROWS[:4])[0]
