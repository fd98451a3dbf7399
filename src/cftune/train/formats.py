"""How task rows become token ids: the row shapes cftune reads, the prompt formats, what to do with
an overlong example. Settings only (the `TrainConfig` fields `TaskFormat` gathers), so the config
and the data module both read them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from cftune.prompts import FORMATS

SHAPES = ("auto", "prompt-response", "messages", "text")
PROMPT_FORMATS = FORMATS
OVERLONG = ("truncate", "drop")


@dataclass(frozen=True)
class TaskFormat:
    """How task rows become token ids (the data fields of `TrainConfig`, gathered)."""

    shape: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    prompt_format: str = "auto"  # cftune.prompts.FORMATS
    prompt_template: str = "{prompt}\n"
    doc_start: str | None = None  # cftune.prompts.doc_start_ids
    max_length: int = 512
    overlong: str = "truncate"
