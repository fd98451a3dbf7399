"""The training loop's one class: a transformers `Trainer` whose whole loss is `compute_loss`.

The loss of the CFS paper, Eq. 1 (`objectives.eq1`),

    loss = E_task[−log p_θ(y|x)]  +  λ · E_{x~CF samples}[−log p_θ(x)],

is read from one batch holding both streams (task rows first, `batches.Collator`): the task
NLL on response tokens, the CF term as NLL on every token (`cfs`) or as KL to the stored top-K
(`kd`), plus the L2 penalty of `l2`. Subclass `CftuneTrainer` and override `compute_loss` to
change the objective; `cftune.train.train(config, trainer_cls=...)` runs it. Batches come from
`MixedBatchSampler`; checkpoints, resume, schedules, precision, accumulation and accelerate's
DDP/FSDP/DeepSpeed are the Trainer's own.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from cftune import head_loss, objectives
from cftune.errors import CftuneError
from cftune.io import fault_point
from cftune.train import batches, data
from cftune.train.config import TrainConfig, chunked_loss


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

    # -- loss ----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Eq. 1: task NLL + CF term (NLL, or top-K KL for `kd`), plus the L2 penalty; each
        stream's sum is divided by its token count over the whole step (`num_items_in_batch`)."""
        cfg = self.cftune
        loss, outputs, (task_sum, task_n, cf_sum, cf_n) = eq1_loss(
            model, inputs, num_items_in_batch, kd=cfg.spec.kd, mode=cfg.cfs_mode,
            lam=cfg.cfs_lambda, head=self._head(model))
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

    # -- data ----------------------------------------------------------------------------
    def get_train_dataloader(self):
        ds = self.train_dataset
        cfg = self.cftune
        sampler = batches.MixedBatchSampler(ds.lengths(), ds.n_task, cfg.batch_size,
                                         ratio=cfg.cfs_ratio if len(ds) > ds.n_task else 0.0,
                                         seed=cfg.seed, group=cfg.group_batches)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler,
                                             collate_fn=self.data_collator)
        return self.accelerator.prepare(loader)

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """Target tokens of the task and CF streams over all micro-batches of this step."""
        return step_counts(batch_samples, device, self.accelerator, self.args.world_size)

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


class QuietProgress(ProgressCallback):
    """The tqdm bar with the latest losses as its postfix, instead of a printed dict per step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            keys = ("loss", "task_loss", "cf_loss", "eval_task_loss", "eval_cf_loss")
            self.training_bar.set_postfix({k: f"{logs[k]:.4g}" for k in keys if k in logs})


class NoFinalCheckpoint(TrainerCallback):
    """No checkpoint at the last step: OUT gets the final model, and the Trainer resumed from a
    checkpoint with no step left trains one step too many (seen killing a run as it saved its
    manifest, issue 15); a kill after the last step redoes the steps after the last checkpoint."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False


def eq1_loss(model, inputs: dict[str, torch.Tensor], n: torch.Tensor | None, *, kd: bool,
             mode: str, lam: float, head: head_loss.Head | None = None
             ) -> tuple[torch.Tensor, object, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Eq. 1 of one batch whose task rows come first (`batches.Collator`), and its parts.

    The one implementation of the objective: `CftuneTrainer` and TRL's trainer with the CF term
    (`cftune.integrations.trl`) both call it. `n` holds [task, CF] target tokens over the whole
    optimizer step (None: this batch's own); `head` (from `head_loss.head_of`) computes the same
    losses from hidden states, the output layer applied in chunks. Returns the loss (before DDP
    scaling), the model's outputs and (task sum, task tokens, CF sum, CF tokens) of this batch.
    """
    labels, source = inputs["labels"], inputs["source"]
    if n is None:
        n = _stream_counts(labels, source).to(labels.device)
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
             "use_cache": False}
    if head is None:  # the token losses read the full logits
        outputs = model(**batch)
        x, losses = outputs.logits, objectives
    else:  # the same losses from hidden states, the output layer applied in chunks
        x, outputs = head_loss.hidden_states(model, head, **batch)
        losses = head_loss.bound(head)
    k = int((source == data.TASK).sum())  # task rows come first
    task_sum, task_n = losses.nll(x[:k], labels[:k], inputs["weight"][:k])
    if kd:
        cf_sum, cf_n = losses.topk_kd(x[k:], labels[k:], inputs["topk_ids"][k:],
                                      inputs["topk_logprobs"][k:])
    else:
        cf_sum, cf_n = losses.nll(x[k:], labels[k:])
    loss = objectives.eq1(task_sum, cf_sum, n[0], n[1], mode, lam)
    return loss, outputs, (task_sum, task_n, cf_sum, cf_n)


def step_counts(batch_samples: list, device, accelerator, world_size: int) -> torch.Tensor:
    """[task, CF] target tokens over all micro-batches of one optimizer step, all processes:
    what `eq1_loss` divides by, so accumulation and DDP are exact."""
    counts = torch.zeros(2, dtype=torch.long)
    for b in batch_samples:
        counts += _stream_counts(b["labels"].cpu(), b["source"].cpu())
    counts = counts.to(device)
    if world_size > 1:
        counts = accelerator.gather(counts[None]).sum(0)
    return counts


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
