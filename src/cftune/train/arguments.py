"""The transformers `TrainingArguments` of a `TrainConfig` (every method's, TRL's subclasses
included), and where a tracker writes: one translation of the settings, so `cftune train`'s own
trainer and TRL's SDFT trainer schedule, checkpoint, log and track alike."""

from __future__ import annotations

from pathlib import Path

from cftune.models import resolve_device
from cftune.train.config import CHECKPOINTS, TrainConfig


def training_arguments(config: TrainConfig, out: Path, dtype: str, args_cls: type | None = None,
                       **overrides):
    """The Trainer's arguments; `dtype` is `config.dtype` resolved (never `auto`). `args_cls`: a
    `TrainingArguments` subclass (TRL's `SDFTConfig`) built from the same settings, `overrides`
    on top."""
    from transformers import TrainingArguments

    device = resolve_device(config.device)
    half = dtype != "fp32"
    kwargs = dict(
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
        report_to=config.report_to, run_name=config.run_name or out.name,
        remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=False, logging_nan_inf_filter=False,
    )
    return (args_cls or TrainingArguments)(**{**kwargs, **overrides})


def tensorboard_in(trainer, folder: Path) -> None:
    """Point `report_to: tensorboard`'s writer at `folder` (OUT/logs): transformers 5 has no
    `logging_dir` argument, and its default, under `output_dir` (OUT/checkpoints), is deleted
    with the checkpoints. `TENSORBOARD_LOGGING_DIR`, where set, still wins."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(folder)
