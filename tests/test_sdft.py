"""`method: sdft` (TRL's SDFTTrainer through `cftune.train.sdft`) on a tiny random model: the
output folder every method writes, resume, the student's and teacher's prompts, prompts per step,
the settings' checks and the runner. Tests that run TRL skip when it is not installed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import assert_run_folder
from transformers import AutoModelForCausalLM, TrainerCallback

from cftune.cli import main
from cftune.errors import CftuneError
from cftune.experiment.config import Experiment
from cftune.experiment.plan import Runner
from cftune.models import load_model, load_tokenizer
from cftune.prompts import PromptSpec, prompt_ids
from cftune.train.arguments import training_arguments
from cftune.train.config import TrainConfig
from cftune.train.sdft import sdft_arguments, sdft_rows, teacher_prompt_ids, trainer_classes
from cftune.train.stage import train

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _trl_missing() -> str | None:
    try:
        import trl.experimental.sdft  # noqa: F401
    except ImportError as e:
        return f"TRL >= 1.16 (trl.experimental.sdft) is not importable ({e}): make install-trl"
    return None


needs_trl = pytest.mark.skipif(_trl_missing() is not None, reason=str(_trl_missing()))

ROWS = [{"question": f"What is {i} plus {i + 3}?", "answer": f"{i}+{i + 3}={2 * i + 3}\n#### {2 * i + 3}"}
        for i in range(24)]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdft") / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def config(tiny_model, task, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(tiny_model), task=str(task), method="sdft", out=str(out),
                prompt_field="question", response_field="answer", max_steps=2, batch_size=2,
                learning_rate=1e-3, dtype="fp32", device="cpu", save_steps=100, warmup=0.0,
                sdft_max_completion_length=6)
    return TrainConfig(**{**base, **kw})


def read_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]


@needs_trl
def test_cli_sdft_run_writes_the_output_folder_of_every_method(tiny_model, task, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model), "--task", str(task), "--method", "sdft",
            "--prompt-field", "question", "--response-field", "answer", "--max-steps", "2",
            "--batch-size", "2", "--learning-rate", "1e-2", "--dtype", "fp32", "--device", "cpu",
            "--warmup", "0", "--sdft-max-completion-length", "6", "--out", str(out)]
    assert main(argv) == 0
    assert_run_folder(out)
    assert not (out / "checkpoints").exists()
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert r["loss"] >= 0 and r["completion_length"] > 0 and r["tokens_per_s"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 2 and manifest["counts"]["task"]["kept"] == len(ROWS)
    assert manifest["sdft"]["teacher_model_kind"] == "base"
    assert manifest["sdft"]["num_generations"] == 1
    assert manifest["setting"]["sdft_teacher"] == "base"
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    moved = max(float((a - b).detach().abs().max())
                for a, b in zip(trained.parameters(), base.parameters()))
    assert moved > 1e-4  # the distillation loss trained the model
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") == load_tokenizer(tiny_model).pad_token  # the base's tokenizer
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    assert main(argv) == 0  # same settings: nothing redone
    assert "skipping" in capsys.readouterr().out and (out / "manifest.json").read_text() == before
    assert main([*argv, "--sdft-topk", "5"]) == 2  # another sdft setting: not silently replaced
    assert "finished run with other settings" in capsys.readouterr().err


class _Interrupt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 2:
            raise KeyboardInterrupt


@needs_trl
def test_a_killed_sdft_run_resumes_to_the_uninterrupted_curve(tiny_model, task, tmp_path):
    kw = dict(max_steps=4, save_steps=2, lr_schedule="linear", learning_rate=1e-2)
    whole = read_log(train(config(tiny_model, task, tmp_path / "whole", **kw)))
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_model, task, out, **kw), callbacks=[_Interrupt()])
    assert not (out / "manifest.json").exists() and len(read_log(out)) == 2
    with pytest.raises(CftuneError, match="--resume"):
        train(config(tiny_model, task, out, **kw))
    resumed = read_log(train(config(tiny_model, task, out, resume=True, **kw)))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for r, w in zip(resumed, whole):
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-4)
        assert r["learning_rate"] == pytest.approx(w["learning_rate"], rel=1e-6)


def test_rows_are_the_task_prompt_and_its_reference_response(tiny_model, task, tmp_path):
    rows, counts = sdft_rows(config(tiny_model, task, tmp_path), load_tokenizer(tiny_model))
    assert rows[3] == {"prompt": ROWS[3]["question"], "privileged_context": ROWS[3]["answer"]}
    assert counts.kept == counts.rows == len(ROWS) and counts.truncated == counts.dropped == 0


def test_overlong_teacher_prompts_are_counted_or_dropped(tiny_model, task, tmp_path):
    tok = load_tokenizer(tiny_model)
    spec = PromptSpec("auto")
    lengths = [len(teacher_prompt_ids(tok, r["question"], r["answer"], spec)) for r in ROWS]
    limit = max(lengths) - 1  # the longest rows are over it
    over = sum(n > limit for n in lengths)
    assert 0 < over < len(ROWS)
    _, cut = sdft_rows(config(tiny_model, task, tmp_path, max_length=limit), tok)
    assert (cut.kept, cut.truncated, cut.dropped) == (len(ROWS), over, 0)
    kept, dropped = sdft_rows(config(tiny_model, task, tmp_path, max_length=limit,
                                     overlong="drop"), tok)
    assert (dropped.kept, dropped.dropped) == (len(ROWS) - over, over) and len(kept) == len(ROWS) - over


def test_rows_without_a_response_are_refused_naming_the_row(tiny_model, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": "just a document"}) + "\n")
    cfg = config(tiny_model, path, tmp_path / "o")
    with pytest.raises(CftuneError, match=r"text.jsonl row 1: method sdft needs `question` and "
                                          r"`answer` fields .* not a `text` row"):
        sdft_rows(cfg, load_tokenizer(tiny_model))


def _trainer(tiny_model, task, tmp_path, **kw):
    cfg = config(tiny_model, task, tmp_path / "t", **kw)
    tok = load_tokenizer(cfg.model)
    rows, _ = sdft_rows(cfg, tok)
    args_cls, trainer_cls = trainer_classes()
    from datasets import Dataset

    from cftune.train import data

    args = training_arguments(cfg, tmp_path / "t", "fp32", args_cls, **sdft_arguments(cfg))
    trainer = trainer_cls(model=load_model(cfg.model, device="cpu").train(), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok,
                          prompt_spec=data.prompt_spec(cfg.task_format()))
    return trainer, tok


@needs_trl
@pytest.mark.parametrize("fmt", ["chat", "qa"])
def test_student_sees_cftunes_prompt_and_teacher_the_reference_too(tiny_model, task, tmp_path, fmt):
    trainer, tok = _trainer(tiny_model, task, tmp_path, prompt_format=fmt)
    spec = PromptSpec(fmt)
    question, answer = ROWS[5]["question"], ROWS[5]["answer"]
    # the student's prompt: exactly the one training and evaluation use (cftune.prompts)
    assert trainer._tokenize_prompts([question]) == [prompt_ids(tok, question, spec)]
    # the teacher's: built by TRL from the dataset row, through the same formatting
    completion = torch.tensor([tok("42", add_special_tokens=False)["input_ids"]])
    teacher = trainer.teacher_context_builder.build([question], [answer], completion,
                                                    torch.ones_like(completion))
    ids = teacher["teacher_input_ids"][0].tolist()
    expected = teacher_prompt_ids(tok, question, answer, spec)
    assert ids == expected + completion[0].tolist()
    text = tok.decode(ids)
    assert question in text and answer in text and "This is an example for a response" in text
    assert answer not in tok.decode(prompt_ids(tok, question, spec))  # the student never sees it
    if fmt == "qa":
        assert text.startswith("<|endoftext|>Question: " + question)
        assert tok.decode(expected).endswith("thinking process.\nAnswer:")


@needs_trl
@pytest.mark.parametrize("generations", [1, 2, 3])
def test_each_step_sees_batch_size_distinct_task_prompts(tiny_model, task, tmp_path, generations):
    """TRL samples `num_generations` completions per prompt; cftune sizes the micro-batch at
    batch_size x generations completions, so every method sees batch_size task prompts a step."""
    trainer, _ = _trainer(tiny_model, task, tmp_path, batch_size=2, grad_accum=2,
                          sdft_generations=generations)
    first = next(iter(trainer.get_train_dataloader()))  # one generation batch: a whole step
    prompts = [r["prompt"] for r in first]
    assert len(prompts) == 2 * 2 * generations and len(set(prompts)) == 2 * 2
    assert all(prompts.count(p) == generations for p in prompts)


@pytest.mark.parametrize("flags, message", [
    (["--sdft-generations", "0"], "`sdft_generations` = 0 must be >= 1"),
    (["--sdft-max-completion-length", "0"], "`sdft_max_completion_length` = 0 must be >= 1"),
    (["--sdft-teacher", "oracle"], "`sdft_teacher` = 'oracle' is not one of base, ema, live"),
    (["--sdft-distillation", "jsd"], "`sdft_distillation` = 'jsd' is not one of topk_logits"),
    (["--sdft-alpha", "2"], "`sdft_alpha` = 2.0 must be between 0 and 1"),
    (["--sdft-distillation", "sampled_token", "--sdft-alpha", "0.5"],
     "sampled_token is the reverse KL: `sdft_alpha` must be 1 or unset"),
    (["--lora"], "method `sdft` trains every weight with TRL's loss alone"),
    (["--shape", "text"], "method `sdft` needs prompt/response task rows"),
])
def test_bad_sdft_settings_fail_with_one_line(tiny_model, task, tmp_path, capsys, flags, message):
    argv = ["train", "--model", str(tiny_model), "--task", str(task), "--method", "sdft",
            "--prompt-field", "question", "--response-field", "answer",
            "--out", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_missing_trl_is_one_line_saying_how_to_install_it(tiny_model, task, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.experimental.sdft", None)  # import fails as if absent
    argv = ["train", "--model", str(tiny_model), "--task", str(task), "--method", "sdft",
            "--prompt-field", "question", "--response-field", "answer",
            "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "method `sdft` needs TRL >= 1.16" in err and "pip install 'cftune[trl]'" in err
    assert "\n" not in err and not (tmp_path / "o" / "manifest.json").exists()


def test_sdft_settings_do_not_change_the_setting_of_other_methods(tiny_model, task, tmp_path):
    """A run of another method finished before the sdft settings existed stays finished."""
    full = config(tiny_model, task, tmp_path, method="full")
    assert not any(k.startswith("sdft_") for k in full.setting())
    assert config(tiny_model, task, tmp_path, method="full", sdft_topk=5).setting() == full.setting()
    assert config(tiny_model, task, tmp_path).setting()["sdft_generations"] == 1


def test_runner_plans_an_sdft_run_without_a_cf_pool(tiny_model, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_model),
        "task": {"train": "builtin:arithmetic", "test": "builtin:arithmetic", "train_rows": 8,
                 "test_rows": 2},
        "train": {"max_steps": 2, "batch_size": 2, "dtype": "fp32"},
        "runs": [{"name": "full", "method": "full"},
                 {"name": "sdft", "method": "sdft", "sdft_max_completion_length": 16}]}))
    exp = Experiment(path, tmp_path / "exp")
    runner = Runner(exp, [])
    names = [s.name for s in runner.stages]
    assert "train sdft" in names and "eval sdft" in names
    assert not any(n.startswith("generate cf-pool") for n in names)  # no CF stream to draw
    stage = next(s for s in runner.stages if s.name == "train sdft")
    assert stage.args["settings"]["method"] == "sdft" and "cfs" not in stage.args["settings"]
    assert exp.cf_consumed(next(r for r in exp.runs if r.name == "sdft")) == 0
