"""`cftune train`: fine-tune on a task while staying close to the base model.

The loss of the CFS paper, Eq. 1,

    loss = E_task[−log p_θ(y|x)]  +  λ · E_{x~CF samples}[−log p_θ(x)],

and the baselines it is compared against are rows of `METHODS`; each picks the data streams and
loss terms, and all share one engine: a transformers `Trainer` whose whole loss is the one
overridable `CftuneTrainer.compute_loss`, fed by our batch sampler (mix ratio + length grouping)
and collator. Checkpoints, resume, schedules, mixed precision, gradient accumulation and
accelerate's DDP/FSDP/DeepSpeed are the Trainer's own.

Output folder (the contract with `eval` and `merge`): a `save_pretrained` model (a LoRA adapter
for `lora`, plus `merged/` on request) with its tokenizer, `train_config.json` (the resolved
config), `training_log.jsonl` (one line per step) and `manifest.json`, written last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cftune import memory, precision
from cftune.config import to_dict
from cftune.errors import CftuneError
from cftune.io import (
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    read_json,
    truncate_to_last_newline,
)
from cftune.locking import output_locked
from cftune.models import load_model, load_tokenizer, resolve_device
from cftune.prompts import known_doc_start
from cftune.provenance import package_versions
from cftune.train import batches, data
from cftune.train.config import CHECKPOINTS, CONFIG, LOG, TrainConfig, chunked_loss
from cftune.train.streams import (
    apply_flow_weights,
    build_data,
    build_eval_data,
    cf_pool_facts,
    warn_if_cf_repeats,
)


# ------------------------------------------------------------------------------------- model
def build_model(config: TrainConfig):
    """The base model with fp32 weights (mixed precision is the Trainer's autocast), wrapped in
    LoRA adapters when asked; and θ₀ of its trainable tensors when the L2 penalty is on."""
    model = load_model(config.model, device=config.device, dtype="fp32")
    model.config.use_cache = False
    if config.lora or config.spec.lora:
        from peft import LoraConfig, get_peft_model

        targets = config.lora_targets[0] if config.lora_targets == ["all-linear"] else config.lora_targets
        model = get_peft_model(model, LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets, task_type="CAUSAL_LM"))
    anchors = None
    if config.l2_lambda > 0:
        # One fp32 copy of the trainable tensors only: +1× trainable weights next to AdamW's 2×.
        anchors = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    model.train()
    return model, anchors


def training_arguments(config: TrainConfig, out: Path, dtype: str):
    """The Trainer's arguments; `dtype` is `config.dtype` resolved (never `auto`)."""
    from transformers import TrainingArguments

    device = resolve_device(config.device)
    half = dtype != "fp32"
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS), max_steps=config.max_steps if config.max_steps else -1,
        num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_schedule,
        warmup_steps=int(config.warmup) if config.warmup >= 1 else config.warmup,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        activation_checkpointing=config.gradient_checkpointing, seed=config.seed,
        data_seed=config.seed, use_cpu=device.type == "cpu",
        # On CPU "bf16" is bf16 autocast over fp32 weights (cftune.models.autocast); fp16 autocast
        # has no CPU kernels worth using, so it maps to bf16 there too.
        bf16=half and (dtype == "bf16" or device.type == "cpu"),
        fp16=half and dtype == "fp16" and device.type != "cpu",
        logging_steps=config.logging_steps, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if config.eval_steps else "no", eval_steps=config.eval_steps or None,
        report_to="none", remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=False, logging_nan_inf_filter=False,
    )


# ---------------------------------------------------------------------------------- the stage
def _finished(out: Path, config: TrainConfig, inputs: dict[str, str]) -> bool:
    """True when OUT holds a finished run of the same settings; an error for a different one
    (unless `overwrite`, which always trains afresh)."""
    if config.overwrite:
        return False
    if not (out / MANIFEST).is_file():
        partial = (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir())
        if partial and not config.resume:
            raise CftuneError(f"{out}: an unfinished run is there; pass --resume to continue it "
                              f"or --overwrite to start again")
        return False
    manifest = read_json(out / MANIFEST)
    if manifest.get("setting") == config.setting() and manifest.get("inputs") == inputs:
        return True
    raise CftuneError(f"{out}: holds a finished run with other settings or inputs; choose "
                      f"another --out or pass --overwrite")


def _inputs(config: TrainConfig) -> dict[str, str]:
    """Content hashes of what the run reads: the same settings on changed files is a new run."""
    from cftune.models import fingerprint

    keys = {"model": fingerprint(config.model)}
    for key in ("task", "cfs", "replay", "eval_task", "eval_cfs"):
        value = getattr(config, key)
        if value and not str(value).startswith("builtin:"):
            keys[key] = data.file_key(value)
    return keys


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint in `folder`, deleting half-saved ones (None: none).

    The Trainer writes a checkpoint's `trainer_state.json` after its weights, optimizer and RNG
    states, so one without a readable state was cut short by a kill (issue 15: kill -9 anywhere);
    resuming from it would fail or load a half-written optimizer. One at the last step is passed
    over (see `NoFinalCheckpoint`).
    """
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        step = path.name.removeprefix("checkpoint-")
        if not (path.is_dir() and step.isdigit()):
            continue
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)
            continue
        if not 0 < state.get("max_steps", 0) <= state.get("global_step", 0):
            found.append((int(step), path))
    return str(max(found)[1]) if found else None


def _prepare_out(out: Path, config: TrainConfig) -> str | None:
    """Clear or keep OUT; return the checkpoint to resume from (None: start fresh)."""
    if config.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    last = last_checkpoint(out / CHECKPOINTS) if config.resume else None
    log = out / LOG
    if config.resume and last:
        step = read_json(Path(last) / "trainer_state.json")["global_step"]
        truncate_to_last_newline(log)  # a line torn by a kill
        lines = log.read_text().splitlines() if log.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        log.write_text("".join(ln + "\n" for ln in kept))  # drop steps the resumed run redoes
        print(f"cftune train: resuming from {last} (step {step})")
        return last
    if config.resume:
        print(f"cftune train: no checkpoint in {out / CHECKPOINTS}; starting from scratch")
    log.unlink(missing_ok=True)
    return None


@output_locked
def train(config: TrainConfig, callbacks: Sequence[Any] = (), trainer_cls: type | None = None) -> Path:
    """Fine-tune `config.model` on `config.task` with `config.method`; return the output folder.

    A finished run with the same settings and inputs is not redone. `callbacks` are extra
    `TrainerCallback`s; `trainer_cls` a `CftuneTrainer` subclass (e.g. with another loss).
    """
    # Here, not at the top: transformers' Trainer takes seconds to import, which `cftune`'s
    # other commands (and this package's config, read by the CLI) should not pay.
    from cftune.train.trainer import CftuneTrainer, NoFinalCheckpoint, QuietProgress

    out = Path(config.out)
    inputs = _inputs(config)
    if _finished(out, config, inputs):
        print(f"cftune train: {out} already holds this run (same settings and inputs); skipping")
        return out
    resume_from = _prepare_out(out, config)
    mmap_threshold = memory.set_mmap_threshold(config.mmap_threshold)
    tokenizer = load_tokenizer(config.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pool = cf_pool_facts(config, tokenizer, inputs["model"])
    train_ds, counts = build_data(config, tokenizer)
    eval_ds = build_eval_data(config, tokenizer) if config.eval_steps else None
    for name, c in counts.items():
        unused = f", the pool's last {c.unused} not drawn by this run" if c.unused else ""
        print(f"cftune train: {name} data: {c.kept} examples of {c.rows} rows "
              f"({c.truncated} truncated, {c.dropped} dropped{unused}), {c.target_tokens} "
              "target tokens")
    warn_if_cf_repeats(config, counts)
    model, anchors = build_model(config)
    dtype, chosen = precision.resolve(config.dtype, resolve_device(config.device))
    flow = apply_flow_weights(model, train_ds, config, dtype) if config.spec.flow else None
    args = training_arguments(config, out, dtype)
    trainer = (trainer_cls or CftuneTrainer)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=batches.Collator(pad_id, kd=config.spec.kd), processing_class=tokenizer,
        callbacks=list(callbacks), cftune=config, log_path=out / LOG, anchors=anchors)
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    trainer.add_callback(NoFinalCheckpoint())
    ran = trainer.accelerator.distributed_type.value
    if (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and ran != "FSDP"
            and trainer.args.process_index == 0):
        print(f"cftune train: FSDP was asked but accelerate runs {ran} here (it runs FSDP on "
              "GPUs only): the model is replicated, not sharded", file=sys.stderr)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    facts = {"flow_weights": flow, "cf_pool": pool, "precision": chosen,
             "chunked_loss": chunked_loss(config, args.device), "mmap_threshold": mmap_threshold,
             "distributed": _distributed_facts(trainer.accelerator),
             "doc_start_ids": known_doc_start(tokenizer, config.doc_start)}
    return _save(trainer, tokenizer, config, out, inputs, counts, facts, result,
                 time.perf_counter() - started)


def _distributed_facts(accelerator) -> dict[str, Any]:
    """How the processes shared the work, for the manifest (the ZeRO stage under DeepSpeed)."""
    facts = {"type": accelerator.distributed_type.value, "processes": accelerator.num_processes}
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        facts["zero_stage"] = plugin.zero_stage
    return facts


def _save(trainer, tokenizer, config: TrainConfig, out: Path, inputs: dict[str, str],
          counts: dict[str, data.Counts], facts: dict[str, Any], result, seconds: float) -> Path:
    """Model, tokenizer, resolved config, then the manifest (last: its presence means done)."""
    trainer.save_model(str(out))
    if trainer.args.should_save:  # Trainer pickles its arguments: a model folder holds
        # safetensors, JSON and the tokenizer only (issue 15), so they are kept as JSON instead
        (out / "training_args.bin").unlink(missing_ok=True)
        atomic_write_text(out / "training_args.json", trainer.args.to_json_string() + "\n")
    tokenizer.save_pretrained(str(out))
    model = trainer.model
    if hasattr(model, "merge_and_unload") and config.lora_merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(out / "merged"))
        tokenizer.save_pretrained(str(out / "merged"))
    atomic_write_json(out / CONFIG, {**to_dict(config), "inputs": inputs})
    log = [json.loads(ln) for ln in (out / LOG).read_text().splitlines() if ln.strip()] \
        if (out / LOG).exists() else []
    train_logs = [r for r in log if "loss" in r]
    atomic_write_json(out / MANIFEST, {
        "stage": "train", "setting": config.setting(), "inputs": inputs,
        "counts": {k: dataclasses.asdict(v) for k, v in counts.items()},
        "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "final": train_logs[-1] if train_logs else None, **facts,
        "seconds": round(seconds, 2), "adapter": (out / "adapter_config.json").is_file(),
        "versions": package_versions(),
    })
    if not config.keep_checkpoints:  # only an unfinished run needs them (--resume)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    print(f"cftune train: wrote {out} ({trainer.state.global_step} steps, {seconds:.0f} s)")
    return out
