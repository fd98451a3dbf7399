"""TRL's `SFTTrainer` with the CFS objective: an existing TRL script gains the CF term by changing
its trainer class and adding two arguments.

    from cftune.integrations.trl import CFSFTTrainer

    trainer = CFSFTTrainer(model=model, args=SFTConfig(...), train_dataset=dataset,
                           cf_samples="cf/smollm2", cf_form="kd")   # was: SFTTrainer(...)
    trainer.train()

TRL prepares and collates the task data as usual (prompt-completion, messages, text; completion-
or assistant-only loss; LoRA through `peft_config`). Each training batch then gains about
`cf_ratio` × its task rows of CF samples from a `cftune generate` folder (collated by cftune's own
`batches.Collator`), and the loss is `cftune.train.trainer.eq1_loss`, the very function
`cftune train` calls, in the three forms of `cftune train`:

- `mix`: one mean over every target token of both streams (`--method cfs`, the default);
- `weighted`: task mean + `cf_lambda` × CF mean (`--method cfs --cfs-mode weighted`);
- `kd`: `mix` with the CF term as KL to the base's stored top-K (`--method kd`).

The pool is checked as `cftune train` checks it (same one-line errors): a filtered pool, or one
drawn with another tokenizer (or, when `model` is given as a name or path, another model), is
refused. Evaluation batches are TRL's own (task loss only).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cftune import head_loss
from cftune.errors import CftuneError
from cftune.train import batches, data
from cftune.train.formats import TaskFormat
from cftune.train.streams import check_cf_pool
from cftune.train.trainer import eq1_loss, step_counts

try:
    from trl import SFTTrainer
except ImportError as e:  # an optional extra
    raise CftuneError("cftune.integrations.trl needs TRL: pip install 'cftune[trl]' "
                      "(or `make install-trl`)") from e

FORMS = ("mix", "weighted", "kd")
STATE = "cf_draws.json"  # in each checkpoint: where the CF stream stood


class CFSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose loss is Eq. 1 of the CFS paper: task NLL + the CF term.

    Extra arguments: `cf_samples` (a `cftune generate` folder; with `cf_form="kd"`, one made with
    `--topk-logprobs K`), `cf_form` (mix, weighted or kd), `cf_ratio` (CF rows per task row),
    `cf_lambda` (λ of `weighted`), `allow_filtered_cf` (train on a de-duplicated or length-filtered
    pool, a biased CF term), `chunked_loss` (the loss from hidden states, the output layer in
    chunks, as `cftune train` does on CPUs; None: on CPUs only).
    """

    def __init__(self, *args, cf_samples: str | Path, cf_form: str = "mix", cf_ratio: float = 1.0,
                 cf_lambda: float = 1.0, allow_filtered_cf: bool = False,
                 chunked_loss: bool | None = None, **kwargs):
        if cf_form not in FORMS:
            raise CftuneError(f"`cf_form` = {cf_form!r} is not one of {', '.join(FORMS)}")
        if cf_ratio <= 0 or cf_lambda < 0:
            raise CftuneError(f"`cf_ratio` = {cf_ratio} must be > 0 and `cf_lambda` = "
                              f"{cf_lambda} >= 0")
        model = kwargs.get("model", args[0] if args else None)
        super().__init__(*args, **kwargs)
        if self.args.packing or self.padding_free:
            raise CftuneError("CFSFTTrainer: `packing` and `padding_free` put several examples in "
                              "one row; the CF term needs one example per row: set both False")
        if self.args.dataloader_num_workers:
            raise CftuneError("CFSFTTrainer: the CF stream is drawn in the collator of the main "
                              "process: set `dataloader_num_workers=0`")
        self.cf_form, self.cf_lambda = cf_form, cf_lambda
        kd = cf_form == "kd"
        tokenizer = self.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
        folder = str(cf_samples)
        model_fp = _fingerprint(model) if isinstance(model, str | Path) else None
        self.cf_pool = check_cf_pool(folder, str(model) if isinstance(model, str | Path) else
                                     type(self.model).__name__, tokenizer, model_fp,
                                     allow_filtered_cf)
        fmt = TaskFormat(max_length=self.args.max_length or 2**31, overlong="truncate")
        self.cf_examples, self.cf_counts = data.cf_examples(folder, fmt, kd=kd)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        self.cf_draws = batches.CFDraws(len(self.cf_examples), cf_ratio, seed=self.args.seed,
                                        rank=self.args.process_index, world=self.args.world_size)
        self._train_collator = WithCFRows(self.data_collator, self.cf_examples, self.cf_draws,
                                          batches.Collator(pad_id, kd=kd), pad_id)
        self._cf_position = 0  # task examples of the batches trained on so far (a checkpoint's)
        self._cf_head: head_loss.Head | None | bool = False  # resolved at the first step
        self._chunked = chunked_loss

    # -- loss ----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Eq. 1 on a training batch (task rows, then CF rows); TRL's own loss on others."""
        if "source" not in inputs:  # an evaluation batch: TRL's collator, task rows only
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs, (task_sum, task_n, cf_sum, cf_n) = eq1_loss(
            model, inputs, num_items_in_batch, kd=self.cf_form == "kd",
            mode="weighted" if self.cf_form == "weighted" else "mix", lam=self.cf_lambda,
            head=self._head(model))
        loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        self._cf_position = int(inputs["cf_position"])  # consumed, not merely collated
        metrics = self._metrics["train"]
        metrics["task_loss"].append(float(task_sum.detach()) / max(int(task_n), 1))
        metrics["cf_loss"].append(float(cf_sum.detach()) / max(int(cf_n), 1))
        self._total_train_tokens += int(self.accelerator.gather_for_metrics(
            inputs["attention_mask"].sum()).sum())
        metrics["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device):
        if batch_samples and "source" in batch_samples[0]:  # [task, CF] tokens of the step
            return step_counts(batch_samples, device, self.accelerator, self.args.world_size)
        return super()._get_num_items_in_batch(batch_samples, device)

    def _head(self, model) -> head_loss.Head | None:
        if self._cf_head is False:
            on = self.args.device.type == "cpu" if self._chunked is None else self._chunked
            self._cf_head = head_loss.head_of(model) if on else None
        return self._cf_head

    # -- data ----------------------------------------------------------------------------
    def get_train_dataloader(self):
        """TRL's training loader with the CF rows added by the collator (evaluation keeps
        TRL's collator)."""
        task_collator = self.data_collator
        self.data_collator = self._train_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = task_collator

    # -- checkpoints: the CF stream resumes where it stood -------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            (folder / STATE).write_text(json.dumps({"task_seen": self._cf_position}) + "\n")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True \
                else resume_from_checkpoint
            state = Path(folder or "") / STATE
            if state.is_file():
                self.cf_draws.task_seen = json.loads(state.read_text())["task_seen"]
                self._cf_position = self.cf_draws.task_seen
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.cf_draws.wrapped:
            print(f"cftune: WARNING: the run drew more CF rows than {len(self.cf_examples)} in "
                  "the pool, so samples were reused; a reused pool is memorised and the model "
                  "drifts from the base: draw more with `cftune generate --num-samples N`",
                  file=sys.stderr)
        return result


@dataclass
class WithCFRows:
    """A task collator whose batches gain CF rows: the task batch (TRL's collator) first, then
    the CF rows `draws` picks (cftune's collator), padded to one width, with `source` and
    `weight` per row (and, for kd, the stored top-K, zero on task rows): cftune's batch layout,
    plus `cf_position` (the stream's state after this batch, for checkpoints)."""

    task_collator: Any
    cf: list[dict]
    draws: batches.CFDraws
    cf_collator: batches.Collator
    pad_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        task = self.task_collator(examples)
        unexpected = set(task) - {"input_ids", "attention_mask", "labels"}
        if unexpected:
            raise CftuneError(f"CFSFTTrainer: the task collator returned {sorted(unexpected)}; the "
                              "CF term needs batches of input_ids, attention_mask and labels only")
        n = task["input_ids"].shape[0]
        picked = [self.cf[i] for i in self.draws.take(n)]
        task.update(source=torch.full((n,), data.TASK), weight=torch.ones(n),
                    # where the CF stream stands after this batch: the loader collates ahead of
                    # the step (accelerate prefetches), so a checkpoint keeps what was trained on
                    cf_position=torch.tensor(self.draws.task_seen))
        if not picked:  # a fractional ratio leaves some batches without a CF row
            return task if not self.cf_collator.kd else {**task, **_no_topk(n, task)}
        cf = self.cf_collator(picked)
        width = max(task["input_ids"].shape[1], cf["input_ids"].shape[1])
        fills = {"input_ids": self.pad_id, "attention_mask": 0, "labels": -100}
        if self.cf_collator.kd:
            task.update(_no_topk(n, task, cf["topk_ids"].shape[-1]))
            fills.update(topk_ids=0, topk_logprobs=0.0)
        return {"cf_position": task["cf_position"],
                **{key: torch.cat([_pad(task[key], width, fills.get(key)),
                                   _pad(cf[key], width, fills.get(key))]) for key in cf}}


def _no_topk(n: int, task: dict[str, torch.Tensor], k: int = 1) -> dict[str, torch.Tensor]:
    """Zero top-K fields for task rows (kd reads them on CF rows only)."""
    width = task["input_ids"].shape[1]
    return {"topk_ids": torch.zeros((n, width, k), dtype=torch.long),
            "topk_logprobs": torch.zeros((n, width, k), dtype=torch.float32)}


def _pad(x: torch.Tensor, width: int, value) -> torch.Tensor:
    """Right-pad dimension 1 of `x` to `width`."""
    if x.dim() < 2 or x.shape[1] == width:  # per-row fields (source, weight) need none
        return x
    shape = (x.shape[0], width - x.shape[1], *x.shape[2:])
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], dim=1)


def _fingerprint(model: str | Path) -> str | None:
    """The model's fingerprint as `cftune generate` records it (None when it cannot be read)."""
    from cftune.models import fingerprint

    try:
        return fingerprint(model)
    except (CftuneError, OSError, ValueError):
        return None
