"""`cftune train`: fine-tune on a task while staying close to the base model.

The loss of the CFS paper, Eq. 1,

    loss = E_task[−log p_θ(y|x)]  +  λ · E_{x~CF samples}[−log p_θ(x)],

and the baselines it is compared against are rows of `METHODS`; each picks the data streams and
loss terms, and all share one engine: a transformers `Trainer` whose whole loss is the one
overridable `CftuneTrainer.compute_loss`, fed by our batch sampler (mix ratio + length grouping)
and collator. Checkpoints, resume, schedules, mixed precision, gradient accumulation and
accelerate's DDP/FSDP/DeepSpeed are the Trainer's own.

The output folder every method writes (`cftune.train.folder`): a `save_pretrained` model with
its tokenizer and model card, `train_config.json`, `training_log.jsonl` and `manifest.json`, last.
`method: sdft` runs TRL's trainer instead (`cftune.train.sdft`), on the same contract.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cftune import memory, precision
from cftune.locking import output_locked
from cftune.models import load_model, load_tokenizer, resolve_device
from cftune.prompts import known_doc_start
from cftune.train import batches, folder
from cftune.train.arguments import tensorboard_in, training_arguments
from cftune.train.config import (
    LOG,
    LOGS,
    TrainConfig,
    check_tracker,
    chunked_loss,
)
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


# ---------------------------------------------------------------------------------- the stage
@output_locked
def train(config: TrainConfig, callbacks: Sequence[Any] = (), trainer_cls: type | None = None) -> Path:
    """Fine-tune `config.model` on `config.task` with `config.method`; return the output folder.

    A finished run with the same settings and inputs is not redone. `callbacks` are extra
    `TrainerCallback`s; `trainer_cls` a `CftuneTrainer` subclass (e.g. with another loss).
    """
    # Here, not at the top: transformers' Trainer takes seconds to import, which `cftune`'s
    # other commands (and this package's config, read by the CLI) should not pay.
    from cftune.train.trainer import CftuneTrainer, NoFinalCheckpoint, QuietProgress

    if config.spec.sdft:  # TRL's trainer, on the same output contract (cftune.train.sdft)
        from cftune.train.sdft import train_sdft

        return folder.publish(train_sdft(config, callbacks), config)
    out = Path(config.out)
    inputs = folder.inputs_of(config)
    if folder.finished(out, config, inputs):
        print(f"cftune train: {out} already holds this run (same settings and inputs); skipping")
        return folder.publish(out, config)
    check_tracker(config.report_to)
    resume_from = folder.prepare(out, config)
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
    tensorboard_in(trainer, out / LOGS)
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
    return folder.publish(folder.save(trainer, tokenizer, config, out, inputs, counts, facts, result,
                          time.perf_counter() - started), config)


def _distributed_facts(accelerator) -> dict[str, Any]:
    """How the processes shared the work, for the manifest (the ZeRO stage under DeepSpeed)."""
    facts = {"type": accelerator.distributed_type.value, "processes": accelerator.num_processes}
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        facts["zero_stage"] = plugin.zero_stage
    return facts


