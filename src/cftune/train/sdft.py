"""`method: sdft`: on-policy self-distillation (SDFT, arXiv 2601.19897) through TRL's trainer.

The model answers each task prompt itself (on-policy, `sdft_generations` samples per prompt); a
teacher, the model shown the task's reference response as a demonstration (`TEACHER_TEMPLATE`),
scores those same tokens, and the student is trained toward the teacher's next-token
distributions on them (`sdft_distillation`, `sdft_alpha`). No reference token is a training
target: the model learns what it would say having seen the answer, which the paper finds keeps
its other abilities better than fine-tuning on the answers. The teacher is the frozen base model
(`sdft_teacher: base`, TRL's default; `ema` and `live` are TRL's other teachers).

TRL samples, runs the teacher and computes the loss (`trl.experimental.sdft`, TRL >= 1.16,
imported only here). cftune hands it the task rows (`sdft_rows`), its own prompt format (chat, qa
or plain by `cftune.prompts.prompt_ids`, so a model is trained and evaluated on one prompt), the
Trainer arguments of every other method (`arguments.training_arguments`), and writes the output
folder of every other method (`cftune.train.folder`).

Batches: TRL samples `num_generations` completions per prompt and needs the completions of a step
divisible by it. cftune keeps `batch_size` distinct task prompts per micro-batch, as for every
other method, and sizes the micro-batch at `batch_size x sdft_generations` completions, so the
division holds by construction and every run of a comparison sees the same task prompts per step.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from cftune import memory, precision
from cftune.errors import CftuneError
from cftune.models import load_model, load_tokenizer, resolve_device
from cftune.prompts import PromptSpec, known_doc_start, prompt_ids
from cftune.train import data, folder
from cftune.train.arguments import tensorboard_in, training_arguments
from cftune.train.config import LOG, LOGS, TrainConfig, check_tracker

# The teacher's prompt: the task prompt with the reference response shown as an example, the
# paper's Section 3 prompt (the authors' Self-Distillation/main.py). TRL's default,
# "{prompt}\n\n{privileged_context}", never says that the text after the question is an example.
TEACHER_TEMPLATE = ("{prompt}\n\nThis is an example for a response to the question:\n"
                    "{privileged_context}\n\nNow answer with a response of your own, including "
                    "the thinking process.")
INSTALL = "pip install 'cftune[trl]' (or `make install-trl`)"
# TRL's log keys -> training_log.jsonl's (one line per logged step)
LOGGED = {"loss": "loss", "sdft/distillation_loss": "distillation_loss",
          "learning_rate": "learning_rate", "grad_norm": "grad_norm",
          "completions/mean_length": "completion_length",
          "completions/clipped_ratio": "completion_clipped", "tokens_per_s": "tokens_per_s",
          "seconds": "seconds", "epoch": "epoch"}


# -------------------------------------------------------------------------------------- data
def teacher_prompt_ids(tokenizer, prompt: str, demonstration: str, spec: PromptSpec) -> list[int]:
    """The teacher's prompt as TRL builds it (`TEACHER_TEMPLATE` filled, then formatted by
    `CftuneSDFT._tokenize_prompts`), before TRL cuts it to `max_length` from the left."""
    text = TEACHER_TEMPLATE.format(prompt=prompt, privileged_context=demonstration)
    return prompt_ids(tokenizer, text, spec)


def sdft_rows(config: TrainConfig, tokenizer) -> tuple[list[dict[str, str]], data.Counts]:
    """TRL's dataset: per task row its `prompt` (the prompt text; the trainer formats it as
    training and evaluation do) and `privileged_context` (the reference response: the teacher's
    demonstration). A teacher prompt over `max_length` tokens is cut from the left by TRL, or its
    row dropped with `overlong: drop`; `counts` says how many."""
    from cftune.tasks import is_builtin, resolve_task

    fmt = config.task_format()
    spec = data.prompt_spec(fmt)
    rows = (resolve_task(config.task, "train", config.task_rows, config.seed)
            if is_builtin(config.task) else data.read_rows(config.task))
    if not rows:
        raise CftuneError(f"{config.task}: no rows")
    counts, out = data.Counts(rows=len(rows)), []
    for i, row in enumerate(rows):
        where = f"{config.task} row {i + 1}"
        if not isinstance(row, dict):
            raise CftuneError(f"{where}: expected an object with fields, got {type(row).__name__}")
        shape = data.detect_shape(row, fmt, where)
        if shape != "prompt-response":
            raise CftuneError(f"{where}: method sdft needs `{fmt.prompt_field}` and "
                              f"`{fmt.response_field}` fields (the response is the teacher's "
                              f"demonstration), not a `{shape}` row")
        prompt = data.row_text(row, fmt.prompt_field, where)
        demonstration = data.row_text(row, fmt.response_field, where)
        if len(teacher_prompt_ids(tokenizer, prompt, demonstration, spec)) > fmt.max_length:
            if fmt.overlong == "drop":
                counts.dropped += 1
                continue
            counts.truncated += 1
        counts.kept += 1
        out.append({"prompt": prompt, "privileged_context": demonstration})
    if not out:
        raise CftuneError(f"{config.task}: no usable rows ({counts.rows} rows, every teacher "
                          f"prompt longer than --max-length {fmt.max_length} with --overlong drop)")
    return out, counts


# ---------------------------------------------------------------------------------- trainer
def sdft_arguments(config: TrainConfig) -> dict[str, Any]:
    """SDFTConfig's own settings, on top of the Trainer's (`arguments.training_arguments`)."""
    alpha = config.sdft_alpha
    if alpha is None:  # TRL's default, except where TRL allows only the reverse KL
        alpha = 1.0 if config.sdft_distillation == "sampled_token" else 0.5
    return dict(
        # batch_size distinct prompts x sdft_generations completions (module docstring)
        per_device_train_batch_size=config.batch_size * config.sdft_generations,
        num_generations=config.sdft_generations,
        max_completion_length=config.sdft_max_completion_length,
        max_prompt_length=config.max_length, teacher_model_kind=config.sdft_teacher,
        teacher_prompt_template=TEACHER_TEMPLATE, distillation_mode=config.sdft_distillation,
        distillation_topk=config.sdft_topk, distillation_alpha=alpha)


def trainer_classes() -> tuple[type, type]:
    """(SDFTConfig, `CftuneSDFT`): TRL's config and its trainer with cftune's prompts, a token
    meter and no telemetry. Imported here only: no other method needs TRL."""
    # The API is experimental (docs/train.md says so); its warning would print on every run.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    except ImportError as e:
        raise CftuneError(f"method `sdft` needs TRL >= 1.16 ({e}): {INSTALL}") from None

    class CftuneSDFT(SDFTTrainer):
        """TRL's SDFTTrainer whose prompts are cftune's (`prompt_spec`)."""

        def __init__(self, *args, prompt_spec: PromptSpec, **kw):
            self.prompt_spec = prompt_spec
            self._meter = (0, time.perf_counter())  # (tokens, start) since the last log
            super().__init__(*args, **kw)

        def _tokenize_prompts(self, prompts: list[str]) -> list[list[int]]:
            """Student and teacher prompts in cftune's format (TRL would apply the chat template
            to messages or tokenise text with the tokenizer's own special tokens), cut from the
            left to `max_prompt_length` as TRL cuts them."""
            ids = [prompt_ids(self._tokenizer, p, self.prompt_spec) for p in prompts]
            n = self.max_prompt_length
            return [x[-n:] for x in ids] if n else ids

        def _send_telemetry(self) -> None:
            """Nothing leaves the machine: cftune downloads and sends nothing at run time."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:  # tokens the student reads: prompt + sampled completion
                tokens, t0 = self._meter
                self._meter = (tokens + int(inputs["prompt_mask"].sum())
                               + int(inputs["completion_mask"].sum()), t0)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                from cftune.train.trainer import _nan_message

                for key in ("loss", "grad_norm"):
                    if key in logs and not math.isfinite(logs[key]):
                        raise CftuneError(_nan_message(logs[key], self.state.global_step,
                                                       Path(self.args.output_dir), key))
                (tokens, t0), now = self._meter, time.perf_counter()
                logs = {**logs, "tokens_per_s": tokens / max(now - t0, 1e-9), "seconds": now - t0}
                self._meter = (0, now)
            super().log(logs, start_time)

    return SDFTConfig, CftuneSDFT


class LogLines(TrainerCallback):
    """One line per logged step in `training_log.jsonl` (TRL's names mapped by `LOGGED`)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            record = {"step": state.global_step, **{
                name: float(f"{logs[key]:.7g}") for key, name in LOGGED.items() if key in logs}}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------- the stage
def train_sdft(config: TrainConfig, callbacks: Sequence[Any] = ()) -> Path:
    """`cftune train --method sdft`: the folder `cftune.train.stage.train` writes for every method
    (model, tokenizer, train_config.json, training_log.jsonl, manifest.json last), resumable."""
    from datasets import Dataset
    from transformers.trainer_callback import ProgressCallback

    from cftune.train.trainer import NoFinalCheckpoint, QuietProgress

    args_cls, trainer_cls = trainer_classes()  # a missing TRL fails before OUT is touched
    out = Path(config.out)
    inputs = folder.inputs_of(config)
    if folder.finished(out, config, inputs):
        print(f"cftune train: {out} already holds this run (same settings and inputs); skipping")
        return out
    check_tracker(config.report_to)
    resume_from = folder.prepare(out, config)
    mmap_threshold = memory.set_mmap_threshold(config.mmap_threshold)
    tokenizer = load_tokenizer(config.model)
    rows, counts = sdft_rows(config, tokenizer)
    print(f"cftune train: task data: {counts.kept} prompts of {counts.rows} rows "
          f"({counts.truncated} teacher prompts cut to {config.max_length} tokens, "
          f"{counts.dropped} dropped)")
    dtype, chosen = precision.resolve(config.dtype, resolve_device(config.device))
    args = training_arguments(config, out, dtype, args_cls, **sdft_arguments(config))
    model = load_model(config.model, device=config.device, dtype="fp32").train()
    trainer = trainer_cls(
        # TRL sets a missing pad token on the tokenizer it gets: OUT keeps the base's tokenizer
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=copy.deepcopy(tokenizer), callbacks=[*callbacks, LogLines(out / LOG)],
        prompt_spec=data.prompt_spec(config.task_format()))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    trainer.add_callback(NoFinalCheckpoint())
    tensorboard_in(trainer, out / LOGS)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    facts = {"precision": chosen, "mmap_threshold": mmap_threshold,
             "doc_start_ids": known_doc_start(tokenizer, config.doc_start),
             "sdft": {"trl": importlib.metadata.version("trl"),
                      "teacher_template": TEACHER_TEMPLATE, **{
                          k: v for k, v in sdft_arguments(config).items()
                          if k not in ("teacher_prompt_template", "max_prompt_length")}}}
    return folder.save(trainer, tokenizer, config, out, inputs, {"task": counts}, facts, result,
                       time.perf_counter() - started)
