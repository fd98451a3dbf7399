"""The settings of `cftune train` (`TrainConfig`) and the methods it runs.

Each method is a row of `METHODS`: which second data stream it trains on (CF samples, the base's
contextual answers, a replay corpus) and which loss terms it adds (KD on the stored top-K, L2 to
the initial weights, LoRA's parameterisation, FLOW's weights); `sdft` is TRL's on-policy
self-distillation instead (`cftune.train.sdft`). Light on purpose: the CLI and the runner read it
without loading the trainer (or TRL).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cftune import precision
from cftune.config import field, to_dict
from cftune.errors import CftuneError, did_you_mean
from cftune.models import DEFAULT_MODEL, DTYPES
from cftune.train import batches, formats

LOG = "training_log.jsonl"
CONFIG = "train_config.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"  # the TensorBoard event files of `report_to: tensorboard`
# Trackers of `report_to` (transformers' integrations): value -> the module and pip package it needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
            "trackio": "trackio"}
HUB_REPO = re.compile(r"([\w.-]+/)?[\w.-]+")  # a hub repo id, as `push_to_hub` takes it


@dataclass(frozen=True)
class Method:
    """What a method adds to plain fine-tuning (`stream`: the second data stream, if any)."""

    stream: str | None = None  # "cf" (CF samples, or contextual data), "replay" (a text corpus)
    kd: bool = False  # top-K KL on the CF stream instead of the sampled-token NLL
    contextual: bool = False  # CF records must carry `prompt_ids` (their task prompt)
    lora: bool = False
    l2: bool = False
    flow: bool = False
    sdft: bool = False  # TRL's SDFT trainer (cftune.train.sdft), not CftuneTrainer


METHODS: dict[str, Method] = {
    "full": Method(),
    "cfs": Method(stream="cf"),
    "kd": Method(stream="cf", kd=True),
    "lora": Method(lora=True),
    "l2": Method(l2=True),
    "replay": Method(stream="replay"),
    "contextual": Method(stream="cf", contextual=True),
    "flow": Method(flow=True),
    "sdft": Method(sdft=True),
}
MODES = ("mix", "weighted")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
# Fields that do not change the trained model: ignored when deciding whether a run is done.
NOT_A_SETTING = ("resume", "overwrite", "keep_checkpoints", "chunked_loss", "mmap_threshold",
                 "report_to", "run_name", "push_to_hub")
SDFT = "sdft_"  # prefix of the settings of `method: sdft` (TRL's SDFTConfig, cftune.train.sdft)
SDFT_DISTILLATIONS = ("topk_logits", "full_logits", "sampled_token")  # TRL's distillation_mode
SDFT_TEACHERS = ("base", "ema", "live")  # TRL's teacher_model_kind


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
    shape: str = field("auto", help=f"task row shape: {', '.join(formats.SHAPES)}")
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
    # sdft: on-policy self-distillation (arXiv 2601.19897) through TRL's SDFTTrainer
    sdft_generations: int = field(1, help="sdft: completions the model samples per task prompt "
                                  "(TRL's num_generations); a micro-batch holds batch_size "
                                  "distinct prompts x this many completions, so every step sees "
                                  "batch_size x grad_accum task prompts whatever its value")
    sdft_max_completion_length: int = field(256, help="sdft: longest sampled completion, in tokens")
    sdft_distillation: str = field("topk_logits", help="sdft: divergence between the student and "
                                   "the teacher on the sampled tokens: topk_logits (on the "
                                   "student's top sdft_topk tokens, TRL's default), full_logits "
                                   "(the whole vocabulary) or sampled_token (reverse KL on the "
                                   "sampled token)")
    sdft_topk: int = field(100, help="sdft: tokens per position of topk_logits")
    sdft_alpha: float | None = field(None, help="sdft: 0 = forward KL(teacher‖student), 1 = "
                                     "reverse KL, between: generalised JSD (TRL's "
                                     "distillation_alpha); unset: 0.5, or 1 for sampled_token")
    sdft_teacher: str = field("base", help="sdft: the teacher, shown the task's reference "
                              "response as a demonstration: base (the frozen initial model, TRL's "
                              "default), ema (a moving average of the student) or live (the "
                              "student itself)")
    # engine
    eval_task: str | None = field(None, help="held-out task data evaluated every eval_steps")
    eval_cfs: str | None = field(None, help="held-out CF sample folder evaluated every eval_steps")
    eval_steps: int = field(0, help="evaluate every N steps (0: never)")
    save_steps: int = field(50, help="checkpoint every N steps")
    save_total_limit: int = field(2, help="checkpoints kept (0: all)")
    keep_checkpoints: bool = field(False, help="keep OUT/checkpoints after a finished run (they "
                                               "hold optimizer states: ~3x the model each)")
    logging_steps: int = field(1, help="log every N steps")
    resume: bool = field(False, help="continue from the last checkpoint in OUT/checkpoints")
    overwrite: bool = field(False, help="replace a finished or partial run in OUT")
    report_to: str = field("none", help=f"experiment tracker the Trainer logs to ({', '.join(TRACKERS)} "
                           "or none): loss, task_loss, cf_loss, learning_rate, grad_norm per "
                           "logged step; tensorboard writes OUT/logs")
    run_name: str | None = field(None, help="the run's name in the tracker and its model card "
                                            "(default: OUT's folder name)")
    push_to_hub: str | None = field(None, help="hub model repo (ORG/NAME) to upload OUT to once "
                                               "the run is finished: model, tokenizer, card, "
                                               "manifest and log, not checkpoints (needs a token: "
                                               "`hf auth login` or HF_TOKEN)")

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
        one_of("shape", formats.SHAPES)
        one_of("prompt_format", formats.PROMPT_FORMATS)
        one_of("overlong", formats.OVERLONG)
        one_of("lr_schedule", SCHEDULES)
        one_of("dtype", (*DTYPES, precision.AUTO))
        one_of("report_to", ("none", *TRACKERS))
        if self.push_to_hub is not None and not HUB_REPO.fullmatch(self.push_to_hub):
            p.append(f"`push_to_hub` = {self.push_to_hub!r} is not a hub repo id (NAME or "
                     "ORG/NAME: letters, digits, '-', '_', '.')")
        one_of("sdft_distillation", SDFT_DISTILLATIONS)
        one_of("sdft_teacher", SDFT_TEACHERS)
        for key in ("cfs_ratio", "cfs_lambda", "l2_lambda", "weight_decay", "max_grad_norm",
                    "warmup", "flow_temperature", "lora_dropout", "epochs"):
            if getattr(self, key) < 0:
                p.append(f"`{key}` = {getattr(self, key)} must be >= 0")
        for key in ("batch_size", "grad_accum", "lora_rank", "save_steps", "logging_steps",
                    "group_batches", "task_rows", "sdft_generations",
                    "sdft_max_completion_length", "sdft_topk"):
            if getattr(self, key) < 1:
                p.append(f"`{key}` = {getattr(self, key)} must be >= 1")
        for key in ("eval_steps", "save_total_limit", "mmap_threshold"):  # 0: never, all, default
            if getattr(self, key) < 0:
                p.append(f"`{key}` = {getattr(self, key)} must be >= 0")
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
        if self.eval_steps > 0 and not (self.eval_task or self.eval_cfs):
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
        return p + self._sdft_problems(method)

    def _sdft_problems(self, method: Method | None) -> list[str]:
        """The sdft settings' own checks, and what `method: sdft` cannot combine with."""
        p = []
        alpha = self.sdft_alpha
        if alpha is not None and not 0 <= alpha <= 1:
            p.append(f"`sdft_alpha` = {alpha} must be between 0 and 1")
        if self.sdft_distillation == "sampled_token" and alpha not in (None, 1.0):
            p.append(f"`sdft_distillation` sampled_token is the reverse KL: `sdft_alpha` must be "
                     f"1 or unset (got {alpha})")
        if not (method and method.sdft):
            return p
        if self.lora or self.l2_lambda > 0:
            p.append("method `sdft` trains every weight with TRL's loss alone: unset `lora` and "
                     "`l2_lambda`")
        if self.eval_steps > 0:
            p.append("method `sdft` has no held-out losses during training: set `eval_steps` 0 "
                     "(`cftune eval` measures the model afterwards)")
        if self.shape not in ("auto", "prompt-response"):
            p.append(f"method `sdft` needs prompt/response task rows (the response is the "
                     f"teacher's demonstration), not `shape` = {self.shape!r}")
        return p

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def task_format(self) -> formats.TaskFormat:
        names = [f.name for f in dataclasses.fields(formats.TaskFormat)]
        return formats.TaskFormat(**{n: getattr(self, n) for n in names})

    def setting(self) -> dict[str, Any]:
        """The config minus fields that do not change the trained model: those of
        `NOT_A_SETTING`, and the `sdft_` settings outside `method: sdft` (so a run of another
        method finished before they existed still counts as finished)."""
        return {k: v for k, v in to_dict(self).items() if k not in NOT_A_SETTING
                and (self.spec.sdft or not k.startswith(SDFT))}


def check_tracker(report_to: str) -> None:
    """Refuse, in one line, a `report_to` tracker whose package is not installed: transformers
    would fail later, in the Trainer, with a traceback."""
    module = TRACKERS.get(report_to)
    if module and importlib.util.find_spec(module) is None:
        raise CftuneError(f"`report_to` = {report_to} needs the {module} package: pip install "
                          f"{module} (or `report_to` none)")


def cf_draws(config: TrainConfig, n_task: int) -> int:
    """CF examples the mixed sampler hands out over the whole run (one process): `cfs_ratio` per
    task example seen, so `max_steps` runs draw ratio × their task examples (rounded up: the pool
    never runs short of the sampler's floor), epoch runs `epochs` × `batches.cf_per_epoch`."""
    r = config.cfs_ratio
    if config.max_steps:
        return math.ceil(config.max_steps * config.batch_size * config.grad_accum * r)
    return math.ceil(config.epochs * batches.cf_per_epoch(r, n_task))


def chunked_loss(config: TrainConfig, device: torch.device) -> bool:
    """Whether the loss comes from hidden states (cftune.head_loss). Unset: on CPUs, where it
    measured 1.39x faster at 0.84x the memory (SmolLM2, batch 16); off on GPUs, where one H200
    measurement ran it 5-7x slower per step for Gemma-3-270m (262k vocabulary) while the head loss
    alone ran as fast as the full logits: a cost outside the loss, not yet found."""
    if config.chunked_loss is None:
        return device.type == "cpu"
    return config.chunked_loss
