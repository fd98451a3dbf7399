"""What an evaluation scores, and how: `Measure`, the one description `cftune eval` and the
runner both build (from their flags or YAML) and `cftune.evaluate.model.evaluate_model` reads.
Every input is a resolved file or folder: held-out CF samples, benchmarks, a task test file, the
base's instruction responses, a text corpus. Light on purpose: the runner plans with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from cftune import precision
from cftune.config import field
from cftune.models import DTYPES, ENGINES
from cftune.prompts import PromptSpec

# Part of every cached result's key and of the runner's evaluation stage keys: bump when a
# metric's computation changes, so nothing computed before is reused.
VERSION = 4


@dataclass(frozen=True)
class Measure:
    """What to score on a model, and how: every input a resolved file or folder (None: skip)."""

    kl_samples: Path | None = None  # held-out CF samples of the base (T=1)
    kl_limit: int | None = None  # first N of them
    force_kl: bool = False  # estimate the KL even from biased or mismatched samples
    bench: tuple[Any, ...] = ()  # registry names, NAME=PATH or {name, path, ...} entries
    bench_limit: int | None = None
    bench_offset: int = 0
    bench_seed: int = 0  # 0: items [offset, offset + limit); else a seeded draw of `limit`
    data_dir: str | None = None
    task: Path | None = None  # GSM8K-format test file: answer NLL, and accuracy when `task_acc`
    task_limit: int | None = None
    task_acc: bool = True
    prompt: PromptSpec = dataclass_field(default_factory=lambda: PromptSpec("qa"))
    num_fewshot: int = 0
    fewshot_file: str | None = None
    max_new_tokens: int = 256
    instructions: Path | None = None  # a `draw_responses` folder of the base
    doc_start: str | None = None  # how the instructions were posed (as the base's responses)
    perplexity: Path | None = None
    perplexity_limit: int | None = None
    batch_size: int = 16
    score_dtype: str = "fp32"
    decode_dtype: str = "fp32"
    decode_engine: str = "auto"
    device: str = "auto"
    cache: bool = False


@dataclass
class Scoring:
    """How an evaluation runs, the settings `cftune eval` (`EvalConfig`) and the runner's `eval:`
    section (`EvalSpec`) share: one name, default and help for each, one check."""

    batch_size: int = field(16, "sequences per forward pass")
    score_dtype: str = field("fp32", "precision of every log-likelihood metric (KL, benchmarks, "
                             "answer NLL, perplexity); not fp32: the base is re-scored in it for "
                             "the KLs, so KL(base‖base) is 0 in every precision")
    decode_dtype: str = field("fp32", "precision of greedy task decoding: fp32 | bf16 | fp16 | "
                              "auto (the machine's faster, cftune.precision); not fp32 flips "
                              "near-ties, so the default keeps task accuracy machine-independent")
    decode_engine: str = field("auto", "greedy task decoding by torch | vllm | auto (vLLM on one "
                               "GPU where it is installed, for whole models; torch elsewhere)")

    def scoring_problems(self, prefix: str = "") -> list[str]:
        """What is wrong with these settings, one phrase each (`prefix`: e.g. "eval.")."""
        problems = []
        if self.score_dtype not in DTYPES:
            problems.append(f"{prefix}score_dtype must be one of {', '.join(DTYPES)} "
                            f"(got {self.score_dtype})")
        if self.decode_dtype not in (*DTYPES, precision.AUTO):
            problems.append(f"{prefix}decode_dtype must be one of {', '.join(DTYPES)}, "
                            f"{precision.AUTO} (got {self.decode_dtype})")
        if self.decode_engine not in ENGINES:
            problems.append(f"{prefix}decode_engine must be one of {', '.join(ENGINES)} "
                            f"(got {self.decode_engine})")
        return problems
