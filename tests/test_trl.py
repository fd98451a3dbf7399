"""TRL's SFTTrainer with the CF term (`cftune.integrations.trl`): the same loss as `cftune train` on
the same batch in every form, the batch TRL and cftune build together, the pool checks with
`cftune train`'s errors, LoRA through `peft_config`, resume, and the example script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_data import make_cf_folder

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'cftune[trl]' (make test installs it)")

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from cftune.errors import CftuneError  # noqa: E402
from cftune.integrations.trl import CFSFTTrainer  # noqa: E402
from cftune.models import load_model, load_tokenizer  # noqa: E402
from cftune.train import batches, data  # noqa: E402
from cftune.train.arguments import training_arguments  # noqa: E402
from cftune.train.config import TrainConfig  # noqa: E402
from cftune.train.streams import cf_pool_facts  # noqa: E402
from cftune.train.trainer import CftuneTrainer  # noqa: E402

ROWS = [{"prompt": f"What is {i} plus {i + 3}?\n", "completion": f"{i}+{i + 3}={2 * i + 3}"}
        for i in range(24)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"model": str(tiny_model), "task": str(task),
            "cfs": str(make_cf_folder(root / "cfs", tiny_model, 40, topk=4))}


def sft_args(out: Path, **kw) -> SFTConfig:
    base = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                lr_scheduler_type="constant", use_cpu=True, report_to="none", logging_steps=1,
                save_strategy="no", seed=0, max_length=128, disable_tqdm=True)
    return SFTConfig(**{**base, **kw})


def cf_trainer(files, out: Path, **kw) -> CFSFTTrainer:
    args = kw.pop("args", None) or sft_args(out)
    return CFSFTTrainer(model=load_model(files["model"], device="cpu"), args=args,
                        train_dataset=Dataset.from_list(ROWS),
                        processing_class=load_tokenizer(files["model"]), cf_samples=files["cfs"],
                        **kw)


FORMS = {"mix": dict(method="cfs"), "weighted": dict(method="cfs", cfs_mode="weighted",
                                                      cfs_lambda=0.37),
         "kd": dict(method="kd")}


@pytest.mark.parametrize("form", list(FORMS))
def test_loss_equals_cftune_trainers_on_the_same_batch(files, tmp_path, form):
    trainer = cf_trainer(files, tmp_path / "trl", cf_form=form, cf_lambda=0.37)
    batch = next(iter(trainer.get_train_dataloader()))
    n = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)

    cfg = TrainConfig(model=files["model"], task=files["task"], cfs=files["cfs"], dtype="fp32",
                      out=str(tmp_path / "c"), max_steps=3, batch_size=4, **FORMS[form])
    native = CftuneTrainer(model=trainer.model, args=training_arguments(cfg, tmp_path / "c", "fp32"),
                           train_dataset=batches.ExampleDataset([]), cftune=cfg,
                           data_collator=batches.Collator(0, kd=cfg.spec.kd),
                           log_path=tmp_path / "log.jsonl")
    with torch.no_grad():
        theirs = native.compute_loss(trainer.model, dict(batch),
                                     num_items_in_batch=native._get_num_items_in_batch(
                                         [batch], torch.device("cpu")))
    assert abs(float(ours) - float(theirs)) < 1e-5
    if form == "mix":  # and both are the mean NLL of every target token, by hand
        logits = trainer.model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits.detach()
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                  batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        assert abs(float(ours) - float(by_hand)) < 1e-5


def test_the_batch_is_trls_task_rows_then_the_pools_cf_rows(files, tmp_path):
    trainer = cf_trainer(files, tmp_path / "trl", cf_ratio=0.5, args=sft_args(
        tmp_path / "trl", per_device_train_batch_size=6))
    plain = SFTTrainer(model=trainer.model, args=sft_args(tmp_path / "plain"),
                       train_dataset=Dataset.from_list(ROWS),
                       processing_class=load_tokenizer(files["model"]))
    loader = trainer.get_train_dataloader()
    batch = next(iter(loader))
    task = batch["source"] == data.TASK
    assert int(task.sum()) == 6 and int((~task).sum()) == 3  # ratio 0.5
    # the task rows are exactly what TRL's own collator makes of the same examples
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    ids = {tuple(e["input_ids"]) for e in examples}
    for row, mask in zip(batch["input_ids"][task], batch["attention_mask"][task]):
        assert tuple(row[mask.bool()].tolist()) in ids
    solo = plain.data_collator([examples[0]])
    assert solo["labels"][0].eq(-100).sum() > 0  # completion-only loss: the prompt is masked
    # the CF rows are the pool's samples in the order `cftune train`'s sampler takes them
    order = batches.CFDraws(len(trainer.cf_examples), 0.5).take(6)
    for row, i in zip(batch["input_ids"][~task], order):
        want = trainer.cf_examples[i]["input_ids"]
        assert row[:len(want)].tolist() == want


def test_draws_split_across_processes_and_say_when_they_wrap():
    ranks = [batches.CFDraws(10, 1.0, seed=3, rank=r, world=2) for r in range(2)]
    first = [d.take(2) for d in ranks]
    assert not set(first[0]) & set(first[1]) and all(len(f) == 2 for f in first)
    third = batches.CFDraws(10, 1 / 3)
    assert [len(third.take(1)) for _ in range(6)] == [0, 0, 1, 0, 0, 1]
    whole = batches.CFDraws(4, 1.0)
    assert sorted(whole.take(4)) == [0, 1, 2, 3] and not whole.wrapped
    whole.take(1)
    assert whole.wrapped


def test_trains_logs_both_terms_and_lora_trains_the_adapter_only(files, tmp_path):
    from peft import LoraConfig

    trainer = cf_trainer(files, tmp_path / "full", cf_form="kd")
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 3 and all(r["task_loss"] > 0 and r["cf_loss"] > -1e-6 for r in logs)  # kd: KL from 0

    lora = CFSFTTrainer(model=files["model"], args=sft_args(tmp_path / "lora"),
                        train_dataset=Dataset.from_list(ROWS), cf_samples=files["cfs"],
                        peft_config=LoraConfig(r=4, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))
    before = {k: v.clone() for k, v in lora.model.named_parameters()}
    lora.train()
    changed = {k for k, v in lora.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)


def _with_settings(folder: Path, target: Path, **settings) -> Path:
    import shutil

    shutil.copytree(folder, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for key, value in settings.items():
        manifest.setdefault(key.split(".")[0], {})[key.split(".")[1]] = value
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize("settings", [{"settings.dedup": True},
                                      {"tokenizer.vocab_size": 12345}])
def test_a_pool_cftune_train_refuses_is_refused_with_the_same_error(files, tmp_path, settings):
    bad = _with_settings(Path(files["cfs"]), tmp_path / "bad", **settings)
    tok = load_tokenizer(files["model"])
    cfg = TrainConfig(model=files["model"], task=files["task"], cfs=str(bad), method="cfs")
    with pytest.raises(CftuneError) as native:
        cf_pool_facts(cfg, tok)
    with pytest.raises(CftuneError) as ours:
        CFSFTTrainer(model=files["model"], args=sft_args(tmp_path / "o"),
                     train_dataset=Dataset.from_list(ROWS), cf_samples=str(bad))
    assert str(ours.value) == str(native.value) and "\n" not in str(ours.value)


def test_bad_settings_are_one_line_errors(files, tmp_path):
    with pytest.raises(CftuneError, match="`cf_form` = 'kl' is not one of mix, weighted, kd"):
        cf_trainer(files, tmp_path / "a", cf_form="kl")
    with pytest.raises(CftuneError, match="packing"):
        cf_trainer(files, tmp_path / "b", args=sft_args(tmp_path / "b", packing=True))


class _Stop(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2:
            control.should_training_stop = True


def test_resumed_run_draws_the_cf_rows_it_would_have_drawn(files, tmp_path):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    whole = cf_trainer(files, tmp_path / "whole", args=sft_args(tmp_path / "whole", **kw))
    whole.train()
    cut = cf_trainer(files, tmp_path / "cut", args=sft_args(tmp_path / "cut", **kw),
                     callbacks=[_Stop()])
    cut.train()
    assert json.loads((tmp_path / "cut/checkpoint-2/cf_draws.json").read_text())["task_seen"] == 8
    resumed = cf_trainer(files, tmp_path / "cut", args=sft_args(tmp_path / "cut", **kw))
    resumed.train(resume_from_checkpoint=True)
    a = [r["cf_loss"] for r in whole.state.log_history if "cf_loss" in r]
    b = [r["cf_loss"] for r in resumed.state.log_history if "cf_loss" in r]
    assert a[2:] == pytest.approx(b[-2:], rel=1e-4)


@pytest.mark.integration
def test_the_example_script_runs_on_the_embedded_default(embedded_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "examples/trl_sft_cfs.py"), "--max-steps",
                           "2", "--num-samples", "16", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model/model.safetensors").is_file()
    logs = json.loads((tmp_path / "model/trainer_state.json").read_text())["log_history"]
    assert any("cf_loss" in r for r in logs)
