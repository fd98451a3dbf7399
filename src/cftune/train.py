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
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cftune import data, head_loss, memory, objectives, precision
from cftune.config import field, to_dict
from cftune.errors import CftuneError, did_you_mean
from cftune.locking import output_locked
from cftune.models import DEFAULT_MODEL, DTYPES, load_model, load_tokenizer, resolve_device
from cftune.prompts import known_doc_start
from cftune.provenance import package_versions
from cftune.samples import (
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    fault_point,
    read_json,
    truncate_to_last_newline,
)

LOG = "training_log.jsonl"
CONFIG = "train_config.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class Method:
    """What a method adds to plain fine-tuning (`stream`: the second data stream, if any)."""

    stream: str | None = None  # "cf" (CF samples, or contextual data), "replay" (a text corpus)
    kd: bool = False  # top-K KL on the CF stream instead of the sampled-token NLL
    contextual: bool = False  # CF records must carry `prompt_ids` (their task prompt)
    lora: bool = False
    l2: bool = False
    flow: bool = False


METHODS: dict[str, Method] = {
    "full": Method(),
    "cfs": Method(stream="cf"),
    "kd": Method(stream="cf", kd=True),
    "lora": Method(lora=True),
    "l2": Method(l2=True),
    "replay": Method(stream="replay"),
    "contextual": Method(stream="cf", contextual=True),
    "flow": Method(flow=True),
}
MODES = ("mix", "weighted")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
# Fields that do not change the trained model: ignored when deciding whether a run is done.
NOT_A_SETTING = ("resume", "overwrite", "keep_checkpoints", "chunked_loss", "mmap_threshold")


@dataclass
class TrainConfig:
    """Settings of `cftune train` (every field is also a `--flag` and a YAML key)."""

    task: str = field("", help="task data: .jsonl/.csv/.parquet file, `datasets` folder, or builtin:arithmetic")
    out: str = field("runs/train", help="output folder (model, tokenizer, config, log, manifest)")
    model: str = field(DEFAULT_MODEL, help="base model: alias, local folder, .gguf file or hub id")
    method: str = field("cfs", help=f"one of {', '.join(METHODS)}")
    cfs: str | None = field(None, help="CF sample folder from `cftune generate` (cfs, kd; for "
                                       "contextual, one made with --task-prompts)")
    replay: str | None = field(None, help="generic text corpus for `replay` (rows with a text field)")
    cfs_mode: str = field("mix", help="mix: CF examples mixed into batches, one loss over all "
                                      "targets; weighted: task mean + λ·CF mean")
    cfs_ratio: float = field(1.0, help="second-stream (CF, contextual, replay) examples per task "
                                       "example: each batch holds batch_size task examples plus "
                                       "about cfs_ratio x batch_size of these")
    cfs_lambda: float = field(1.0, help="λ of the CF term in `weighted` mode")
    # task data
    task_rows: int = field(1000, help="rows drawn from a builtin: task")
    shape: str = field("auto", help=f"task row shape: {', '.join(data.SHAPES)}")
    prompt_field: str = field("prompt", help="prompt field (GSM8K: question)")
    response_field: str = field("response", help="response field (GSM8K: answer)")
    messages_field: str = field("messages", help="chat messages field")
    text_field: str = field("text", help="plain text field")
    prompt_format: str = field("auto", help="chat (the model's chat template), qa ('Question: "
                                            "…\\nAnswer:' + ' ' + response), plain "
                                            "(prompt_template), or auto (chat when the tokenizer "
                                            "has a template, else plain)")
    prompt_template: str = field("{prompt}\n", help="plain prompt format, {prompt} is replaced")
    doc_start: str | None = field(None, help="token a plain document or qa/plain prompt starts "
                                             "with (a token, an id, or '' for none; default: the "
                                             "rule of cftune.prompts.doc_start_ids)")
    allow_filtered_cf: bool = field(False, help="train on a CF pool that generation filtered "
                                                "(dedup/min-tokens): a biased CF term")
    max_length: int = field(512, help="longest example in tokens")
    overlong: str = field("truncate", help="over-long rows: truncate or drop")
    # optimisation
    max_steps: int = field(200, help="optimizer steps (0: train for `epochs`)")
    epochs: float = field(1.0, help="passes over the task data when max_steps is 0")
    batch_size: int = field(8, help="task examples per micro-batch per device (a second "
                                    "stream adds cfs_ratio x this many)")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    learning_rate: float = field(1e-5, help="peak learning rate")
    lr_schedule: str = field("cosine", help=f"one of {', '.join(SCHEDULES)}")
    warmup: float = field(0.03, help="warm-up: a fraction of the steps if < 1, else a step count")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (0: off)")
    gradient_checkpointing: bool = field(False, help="recompute activations to save memory")
    chunked_loss: bool | None = field(None, help="loss from hidden states, the output layer "
                                      "applied to chunks of target positions (cftune.head_loss): "
                                      "never the whole [tokens x vocabulary] logits; false: the "
                                      "model's full logits; unset: on for CPUs only (faster and "
                                      "smaller there; on an H200 it cut memory but ran Gemma-3 5-7x "
                                      "slower, cause not found)")
    mmap_threshold: int = field(0, help="CPU tensors above this many bytes get a memory "
                                "mapping of their own, returned to the system when freed (glibc; "
                                "cftune.memory): 1048576 held SmolLM2 at batch 16 x 384 to 3.6 GiB "
                                "(4.6-6.4 with glibc's default) but ran 1.8x slower; 0 = glibc's "
                                "default")
    dtype: str = field("auto", help="fp32, bf16 or fp16 autocast (weights stay fp32); auto: bf16 "
                       "on GPUs, on CPUs the faster of fp32 and bf16 (measured once, cached)")
    device: str = field("auto", help="auto, cpu, cuda or mps")
    seed: int = field(0, help="seed of initialisation, data order and CF mixing")
    group_batches: int = field(16, help="length grouping window, in batches (1: no grouping)")
    # baselines
    lora: bool = field(False, help="train LoRA adapters (also composable with cfs/kd/l2)")
    lora_rank: int = field(16, help="LoRA rank")
    lora_alpha: float = field(32.0, help="LoRA alpha")
    lora_dropout: float = field(0.05, help="LoRA dropout")
    lora_targets: list[str] = field(["all-linear"], help="LoRA target modules")
    lora_merge: bool = field(False, help="also save the merged model in OUT/merged")
    l2_lambda: float = field(0.0, help="λ₂ of the L2 penalty toward the initial weights")
    flow_temperature: float = field(0.0, help="FLOW temperature τ (0: median base loss)")
    # engine
    eval_task: str | None = field(None, help="held-out task data evaluated every eval_steps")
    eval_cfs: str | None = field(None, help="held-out CF sample folder evaluated every eval_steps")
    eval_steps: int = field(0, help="evaluate every N steps (0: never)")
    save_steps: int = field(50, help="checkpoint every N steps")
    save_total_limit: int = field(2, help="checkpoints kept")
    keep_checkpoints: bool = field(False, help="keep OUT/checkpoints after a finished run (they "
                                               "hold optimizer states: ~3x the model each)")
    logging_steps: int = field(1, help="log every N steps")
    resume: bool = field(False, help="continue from the last checkpoint in OUT/checkpoints")
    overwrite: bool = field(False, help="replace a finished or partial run in OUT")

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise CftuneError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid setting, each naming the key, the value and what is allowed."""
        p: list[str] = []

        def one_of(key: str, allowed: Sequence[str]) -> None:
            if getattr(self, key) not in allowed:
                p.append(f"`{key}` = {getattr(self, key)!r} is not one of {', '.join(allowed)}"
                         f"{did_you_mean(getattr(self, key), allowed)}")

        one_of("method", list(METHODS))
        one_of("cfs_mode", MODES)
        one_of("shape", data.SHAPES)
        one_of("prompt_format", data.PROMPT_FORMATS)
        one_of("overlong", data.OVERLONG)
        one_of("lr_schedule", SCHEDULES)
        one_of("dtype", (*DTYPES, precision.AUTO))
        for key in ("cfs_ratio", "cfs_lambda", "l2_lambda", "weight_decay", "max_grad_norm",
                    "warmup", "flow_temperature", "lora_dropout", "epochs"):
            if getattr(self, key) < 0:
                p.append(f"`{key}` = {getattr(self, key)} must be >= 0")
        for key in ("batch_size", "grad_accum", "lora_rank", "save_steps", "logging_steps",
                    "group_batches", "task_rows"):
            if getattr(self, key) < 1:
                p.append(f"`{key}` = {getattr(self, key)} must be >= 1")
        try:
            self.prompt_template.format(prompt="")
        except (KeyError, IndexError, ValueError):
            p.append(f"`prompt_template` = {self.prompt_template!r}: only {{prompt}} may appear "
                     f"in braces")
        if self.max_length < 2:
            p.append(f"`max_length` = {self.max_length} must be >= 2")
        if self.learning_rate <= 0:
            p.append(f"`learning_rate` = {self.learning_rate} must be > 0")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            p.append("set `max_steps` > 0 or `epochs` > 0")
        if not self.task:
            p.append("`task` is required (a task file, `datasets` folder or builtin:arithmetic)")
        elif not self.task.startswith("builtin:") and not Path(self.task).exists():
            p.append(f"`task`: {self.task} not found")
        if self.eval_steps and not (self.eval_task or self.eval_cfs):
            p.append("`eval_steps` needs `eval_task` and/or `eval_cfs` (held-out data)")
        method = METHODS.get(self.method)
        if method and method.stream == "cf" and not self.cfs:
            p.append(f"method `{self.method}` needs `cfs` (a sample folder from `cftune generate`)")
        if method and method.stream == "replay" and not self.replay:
            p.append("method `replay` needs `replay` (a text corpus file)")
        if method and method.l2 and self.l2_lambda <= 0:
            p.append("method `l2` needs `l2_lambda` > 0")
        for key in ("cfs", "replay", "eval_task", "eval_cfs"):
            value = getattr(self, key)
            if value and not value.startswith("builtin:") and not Path(value).exists():
                p.append(f"`{key}`: {value} not found")
        return p

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def task_format(self) -> data.TaskFormat:
        names = [f.name for f in dataclasses.fields(data.TaskFormat)]
        return data.TaskFormat(**{n: getattr(self, n) for n in names})

    def setting(self) -> dict[str, Any]:
        """The config minus fields that do not change the trained model."""
        return {k: v for k, v in to_dict(self).items() if k not in NOT_A_SETTING}


# ------------------------------------------------------------------------------------ the loss
@functools.cache
def trainer_class() -> type:
    """The `CftuneTrainer` class, defined on first use: importing transformers' Trainer takes
    seconds, which every `cftune` command would pay when the CLI collects its flags."""
    from transformers import Trainer

    class CftuneTrainer(Trainer):
        """A Trainer whose loss is `compute_loss` (one place to override) and whose batches come
        from `MixedBatchSampler`. Losses are normalised by the token counts of the whole optimizer
        step (`_get_num_items_in_batch`), so gradient accumulation and DDP are exact."""

        loss_is_scaled_for_ga = True

        def __init__(self, *args, cftune: TrainConfig, log_path: Path, anchors=None, **kw):
            super().__init__(*args, **kw)
            self.cftune = cftune
            self.log_path = log_path
            self.anchors = anchors  # θ₀ of the trainable tensors, for the l2 term
            self._meter = {"task": 0.0, "task_n": 0, "cf": 0.0, "cf_n": 0, "tokens": 0,
                           "t0": time.perf_counter()}

        # -- data ----------------------------------------------------------------------------
        def get_train_dataloader(self):
            ds = self.train_dataset
            cfg = self.cftune
            sampler = data.MixedBatchSampler(ds.lengths(), ds.n_task, cfg.batch_size,
                                             ratio=cfg.cfs_ratio if len(ds) > ds.n_task else 0.0,
                                             seed=cfg.seed, group=cfg.group_batches)
            loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler,
                                                 collate_fn=self.data_collator)
            return self.accelerator.prepare(loader)

        def _get_num_items_in_batch(self, batch_samples: list, device):
            """Target tokens of the task and CF streams over all micro-batches of this step."""
            counts = torch.zeros(2, dtype=torch.long)
            for b in batch_samples:
                counts += _stream_counts(b["labels"].cpu(), b["source"].cpu())
            counts = counts.to(device)
            if self.args.world_size > 1:
                counts = self.accelerator.gather(counts[None]).sum(0)
            return counts

        # -- loss ----------------------------------------------------------------------------
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Eq. 1: task NLL + CF term (NLL, or top-K KL for `kd`), plus the L2 penalty.

            `mix` is one mean over all target tokens; `weighted` is task mean + λ·CF mean.
            """
            cfg, spec = self.cftune, self.cftune.spec
            labels, source = inputs["labels"], inputs["source"]
            n = num_items_in_batch if num_items_in_batch is not None else \
                _stream_counts(labels, source).to(labels.device)
            batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                     "use_cache": False}
            head = self._head(model)
            if head is None:  # the token losses read the full logits
                outputs = model(**batch)
                x, losses = outputs.logits, objectives
            else:  # the same losses from hidden states, the output layer applied in chunks
                x, outputs = head_loss.hidden_states(model, head, **batch)
                losses = head_loss.bound(head)
            k = int((source == data.TASK).sum())  # task rows come first (Collator)
            task_sum, task_n = losses.nll(x[:k], labels[:k], inputs["weight"][:k])
            if spec.kd:
                cf_sum, cf_n = losses.topk_kd(x[k:], labels[k:], inputs["topk_ids"][k:],
                                              inputs["topk_logprobs"][k:])
            else:
                cf_sum, cf_n = losses.nll(x[k:], labels[k:])
            n_task, n_cf = n[0].clamp_min(1), n[1].clamp_min(1)
            if cfg.cfs_mode == "mix":
                loss = (task_sum + cf_sum) / (n[0] + n[1]).clamp_min(1)
            else:
                loss = task_sum / n_task + cfg.cfs_lambda * cf_sum / n_cf
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            if self.anchors is not None:
                params = [p for p in model.parameters() if p.requires_grad]
                penalty = objectives.l2_to_init(params, self.anchors)
                loss = loss + cfg.l2_lambda * penalty / self.current_gradient_accumulation_steps
            if not torch.isfinite(loss.detach()):
                raise CftuneError(_nan_message(float(loss.detach()), self.state.global_step + 1,
                                               Path(self.args.output_dir)))
            m = self._meter
            m["task"] += float(task_sum.detach())
            m["task_n"] += int(task_n)
            m["cf"] += float(cf_sum.detach())
            m["cf_n"] += int(cf_n)
            m["tokens"] += int(inputs["attention_mask"].sum())
            return (loss, outputs) if return_outputs else loss

        def _head(self, model) -> head_loss.Head | None:
            """The output layer for the chunked loss (None: off, or a head it cannot handle)."""
            if not hasattr(self, "_head_cache"):
                self._head_cache = head_loss.head_of(model) if chunked_loss(
                    self.cftune, self.args.device) else None
            return self._head_cache

        def save_model(self, output_dir=None, _internal_call=False):
            super().save_model(output_dir, _internal_call)
            if _internal_call:  # a checkpoint: weights written, optimizer and state not yet
                fault_point("checkpoint")

        # -- logging and evaluation ----------------------------------------------------------
        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                m = self._meter
                now = time.perf_counter()
                sums = torch.tensor([m["task"], m["task_n"], m["cf"], m["cf_n"], m["tokens"]],
                                    dtype=torch.float64, device=self.args.device)
                if self.args.world_size > 1:  # every process logs (Trainer): sum their meters
                    sums = self.accelerator.reduce(sums, reduction="sum")
                task, task_n, cf, cf_n, tokens = sums.tolist()
                logs["task_loss"] = task / max(task_n, 1)
                if self.cftune.spec.stream:
                    logs["cf_loss"] = cf / max(cf_n, 1)
                logs["tokens_per_s"] = tokens / max(now - m["t0"], 1e-9)
                logs["seconds"] = now - m["t0"]  # wall time since the previous training log
                grad_norm = logs.get("grad_norm")
                if grad_norm is not None and not math.isfinite(grad_norm):
                    raise CftuneError(_nan_message(grad_norm, self.state.global_step,
                                                   Path(self.args.output_dir), "gradient norm"))
                self._meter = {"task": 0.0, "task_n": 0, "cf": 0.0, "cf_n": 0, "tokens": 0, "t0": now}
            if self.args.process_index == 0 and ("loss" in logs or any(k.startswith("eval_") for k in logs)):
                record = {"step": self.state.global_step, **{
                    k: float(f"{v:.7g}") if isinstance(v, float) else v for k, v in logs.items()
                    if k in ("loss", "task_loss", "cf_loss", "learning_rate", "grad_norm",
                             "tokens_per_s", "seconds", "epoch", "eval_task_loss", "eval_cf_loss")}}
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """Mean task NLL and mean CF NLL on the held-out sets (one pass, no grad); once per
            step (the Trainer may ask again at the end of training)."""
            if getattr(self, "_evaluated", (None,))[0] == self.state.global_step:
                return self._evaluated[1]
            ds = eval_dataset or self.eval_dataset
            model = self.model
            was_training = model.training
            model.eval()
            sums = torch.zeros(4, dtype=torch.float64)
            order = sorted(range(len(ds)), key=lambda i: len(ds[i]["input_ids"]))
            with torch.no_grad(), self.autocast_smart_context_manager():
                for s in range(0, len(order), self.args.per_device_eval_batch_size):
                    batch = self._prepare_inputs(self.data_collator(
                        [ds[i] for i in order[s:s + self.args.per_device_eval_batch_size]]))
                    logits = model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits
                    for j, src in enumerate((data.TASK, data.CF)):
                        rows = batch["source"] == src
                        if rows.any():
                            total, count = objectives.nll(logits[rows], batch["labels"][rows])
                            sums[2 * j] += float(total)
                            sums[2 * j + 1] += int(count)
            model.train(was_training)
            metrics = {}
            if sums[1]:
                metrics[f"{metric_key_prefix}_task_loss"] = float(sums[0] / sums[1])
            if sums[3]:
                metrics[f"{metric_key_prefix}_cf_loss"] = float(sums[2] / sums[3])
            self.log(metrics)
            self._evaluated = (self.state.global_step, metrics)
            return metrics

    return CftuneTrainer


@functools.cache
def _progress_class() -> type:
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        """The tqdm bar with the latest losses as its postfix, instead of a printed dict per step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                keys = ("loss", "task_loss", "cf_loss", "eval_task_loss", "eval_cf_loss")
                self.training_bar.set_postfix({k: f"{logs[k]:.4g}" for k in keys if k in logs})

    return QuietProgress


@functools.cache
def _no_final_checkpoint_class() -> type:
    from transformers import TrainerCallback

    class NoFinalCheckpoint(TrainerCallback):
        """No checkpoint at the last step: OUT gets the final model, and the Trainer resumed from a
        checkpoint with no step left trains one step too many (seen killing a run as it saved its
        manifest, issue 15); a kill after the last step redoes the steps after the last checkpoint."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False

    return NoFinalCheckpoint


def __getattr__(name: str):
    """`cftune.train.CftuneTrainer` (subclass it and pass it to `train`) without an eager import."""
    if name == "CftuneTrainer":
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stream_counts(labels: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """[task targets, CF targets] of one batch (targets after the causal shift)."""
    per_row = (labels[:, 1:] != -100).sum(-1)
    return torch.stack([per_row[source == data.TASK].sum(), per_row[source == data.CF].sum()]).long().cpu()


def _nan_message(value: float, step: int, checkpoints: Path, what: str = "loss") -> str:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    keep = f"the last good checkpoint is {last} (rerun with --resume and a lower learning rate)" \
        if last else "no checkpoint was saved before it"
    return f"{what} is {value} at step {step}: training stopped; {keep}"


# -------------------------------------------------------------------------------------- data
def examples(config: TrainConfig, tokenizer, kind: str, path: str,
             split: str = "train") -> tuple[list[dict], data.Counts]:
    """The examples of one source, tokenised once and cached: `kind` is "task" (a task file or
    builtin: spec), "cf" (a sample folder: CF samples or contextual data) or "replay" (a corpus).
    The cache key holds the inputs' content hashes and every setting that changes the tokens."""
    from cftune.tasks import is_builtin, resolve_task

    fmt, spec = config.task_format(), config.spec
    key: dict[str, Any] = {"tokenizer": data.tokenizer_key(tokenizer),
                           "format": dataclasses.asdict(fmt), "kind": kind}
    if kind == "task" and is_builtin(path):
        # Keyed by the drawn rows themselves (cheap to draw): a changed generator must miss.
        rows = resolve_task(path, split, config.task_rows, config.seed)
        key["rows"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
        return data.cached(key, lambda: data.task_examples(path, tokenizer, fmt, rows))
    key["file"] = data.file_key(path)
    if kind == "task":
        return data.cached(key, lambda: data.task_examples(path, tokenizer, fmt))
    if kind == "replay":
        return data.cached(key, lambda: data.text_examples(path, tokenizer, fmt))
    kd = spec.kd and split == "train"  # held-out CF is scored by its NLL
    key.update(kd=kd, contextual=spec.contextual)
    return data.cached(key, lambda: data.cf_examples(path, fmt, kd=kd,
                                                     require_prompts=spec.contextual))


def cf_pool_facts(config: TrainConfig, tokenizer=None, model_fp: str | None = None
                  ) -> dict[str, Any] | None:
    """How the training CF pool was drawn (for the manifest), refusing a filtered one and one
    drawn from another model or tokenizer than the one trained (`model_fp`: its fingerprint).

    The CF term is an expectation under p_base: de-duplication under-weights the most probable
    sequences and a length filter drops short ones, so a filtered pool biases the estimator
    (issue 9, item 5). Tempered pools are allowed (the temperature ablation needs them) and
    recorded as such.
    """
    if config.spec.stream != "cf" or not config.cfs:
        return None
    from cftune.samples import read_manifest

    manifest = read_manifest(config.cfs)
    drawn_fp = manifest.get("model_fingerprint")
    vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    if tokenizer is not None and vocab is not None and vocab != len(tokenizer):
        other = f"another tokenizer (vocab {vocab}; {config.model}: {len(tokenizer)})"
    elif model_fp and drawn_fp and drawn_fp != model_fp:
        other = f"another model ({drawn_fp[:19]}…; {config.model}: {model_fp[:19]}…)"
    else:
        other = None
    if other:
        raise CftuneError(f"{config.cfs}/manifest.json: the CF samples were drawn from "
                          f"{manifest.get('model')}, {other}; the CF term needs samples of the "
                          f"model being trained: `cftune generate --model {config.model}`")
    settings = manifest.get("settings") or {}
    dedup, min_tokens = bool(settings.get("dedup")), int(settings.get("min_tokens") or 0)
    filtered = dedup or min_tokens > 0
    if filtered and not config.allow_filtered_cf:
        raise CftuneError(
            f"{config.cfs}/manifest.json: the CF pool was filtered (dedup={dedup}, "
            f"min_tokens={min_tokens}), so its samples are not draws from the base and the CF "
            f"term is biased; regenerate with --no-dedup --min-tokens 0, or pass "
            f"--allow-filtered-cf")
    counts = manifest.get("counts") or {}
    samples = counts.get("samples") or 0
    return {"sampling": manifest.get("sampling"), "dedup": dedup, "min_tokens": min_tokens,
            "filtered": filtered, "prefix_ids": manifest.get("prefix_ids"), "samples": samples,
            # samples cut at max_new_tokens (contextual answers should stay < 5%)
            "capped": (counts.get("truncated") or 0) / samples if samples else None}


def build_data(config: TrainConfig, tokenizer) -> tuple[data.ExampleDataset, dict[str, data.Counts]]:
    """Task examples + the method's second stream (CF samples, contextual data or a corpus)."""
    counts: dict[str, data.Counts] = {}
    task, counts["task"] = examples(config, tokenizer, "task", config.task)
    stream: list[dict] = []
    if config.spec.stream:
        path = config.replay if config.spec.stream == "replay" else config.cfs
        stream, counts["cf"] = examples(config, tokenizer, config.spec.stream, path)
        if config.spec.stream == "cf":
            stream, counts["cf"] = first_draws(config, stream, counts["cf"], counts["task"].kept)
    return data.ExampleDataset(task, stream), counts


def first_draws(config: TrainConfig, pool: list[dict], counts: data.Counts, n_task: int
                ) -> tuple[list[dict], data.Counts]:
    """The CF samples a run trains on: the pool's first `cf_draws` (all processes together).

    Why: the samples are i.i.d. draws, so the first N are as good as any N, and a pool extended
    later (the runner extends a pool when another run of the config draws more) leaves this
    run's data, and its result, as they were; a shuffle of the whole pool would not."""
    need = cf_draws(config, n_task) * int(os.environ.get("WORLD_SIZE", "1"))
    if len(pool) <= need:
        return pool, counts
    kept = pool[:need]
    tokens = sum(sum(t != -100 for t in e["labels"]) for e in kept)
    return kept, dataclasses.replace(counts, kept=need, unused=len(pool) - need,
                                     target_tokens=tokens)


def cf_draws(config: TrainConfig, n_task: int) -> int:
    """CF examples the mixed sampler hands out over the whole run (one process)."""
    r = config.cfs_ratio
    if config.max_steps:
        return math.ceil(config.max_steps * config.batch_size * config.grad_accum * r)
    return math.ceil(config.epochs * round(r * n_task))


def warn_if_cf_repeats(config: TrainConfig, counts: dict[str, data.Counts]) -> None:
    """Say loudly when CF samples would be reused: a small pool is memorised and the model
    drifts (measured: a 192-sample pool reused 2.5x doubled KL(base‖θ) over plain fine-tuning),
    since the KL argument needs samples drawn anew."""
    if config.spec.stream != "cf" or "cf" not in counts:
        return
    need, have = cf_draws(config, counts["task"].kept), counts["cf"].kept
    if need > have:
        print(f"cftune train: WARNING: training draws {need} CF examples but {config.cfs} holds "
              f"{have}: each is reused ~{need / have:.1f}x, which makes the model memorise the "
              f"pool and drift from the base. Draw more first: `cftune generate --out {config.cfs} "
              f"--num-samples {need}` with the same settings extends the folder.",
              file=sys.stderr)


def build_eval_data(config: TrainConfig, tokenizer) -> data.ExampleDataset:
    """Held-out task rows and/or held-out CF samples (`eval_task`, `eval_cfs`)."""
    task = examples(config, tokenizer, "task", config.eval_task, "test")[0] if config.eval_task else []
    cf = examples(config, tokenizer, "cf", config.eval_cfs, "test")[0] if config.eval_cfs else []
    return data.ExampleDataset(task, cf)


def apply_flow_weights(model, dataset: data.ExampleDataset, config: TrainConfig, dtype: str
                       ) -> dict[str, float]:
    """Set each task example's weight from the base model's mean token loss on it (FLOW),
    scored in the training precision `dtype`."""
    from cftune.scoring import score_continuations

    task = dataset.examples[:dataset.n_task]
    requests, masks = [], []
    for e in task:
        first = next(i for i, t in enumerate(e["labels"]) if t != -100 and i > 0)
        requests.append((e["input_ids"][:first], e["input_ids"][first:]))
        masks.append(torch.tensor([t != -100 for t in e["labels"][first:]]))
    was_training = model.training
    model.eval()
    scored = score_continuations(model, requests, batch_size=config.batch_size, dtype=dtype,
                                 pad_id=0, desc="FLOW: base losses")
    model.train(was_training)
    losses = torch.stack([-s.token_logprobs[m].mean() for s, m in zip(scored, masks)])
    weights = objectives.flow_weights(losses, config.flow_temperature)
    for e, w in zip(task, weights.tolist()):
        e["weight"] = w
    return {"min": float(weights.min()), "max": float(weights.max()),
            "base_loss_median": float(losses.median())}


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


def chunked_loss(config: TrainConfig, device: torch.device) -> bool:
    """Whether the loss comes from hidden states (cftune.head_loss). Unset: on CPUs, where it
    measured 1.39x faster at 0.84x the memory (SmolLM2, batch 16); off on GPUs, where one H200
    measurement ran it 5-7x slower per step for Gemma-3-270m (262k vocabulary) while the head loss
    alone ran as fast as the full logits: a cost outside the loss, not yet found."""
    if config.chunked_loss is None:
        return device.type == "cpu"
    return config.chunked_loss


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
    trainer = (trainer_cls or trainer_class())(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=data.Collator(pad_id, kd=config.spec.kd), processing_class=tokenizer,
        callbacks=list(callbacks), cftune=config, log_path=out / LOG, anchors=anchors)
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_class())
    trainer.add_callback(_no_final_checkpoint_class())
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
