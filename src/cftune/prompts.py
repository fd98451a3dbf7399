"""Prompts: the one place that turns a task prompt (and its response) into token ids.

Training, greedy task accuracy, the reference solutions' NLL, few-shot evaluation and the
contextual baseline's generation all call `prompt_ids`, so a model is always tested on exactly
the prompt it was trained on (issue 9, item 2: training prompts used to start with a token the
evaluation never added).

Formats:
- `chat`: the model's chat template, user turn then an opened assistant turn; few-shot examples
  are earlier user/assistant turns.
- `qa`: lm-evaluation-harness's "Question: {prompt}\\nAnswer:" with the response after one space
  (its `target_delimiter`); few-shot examples are "Question: …\\nAnswer: …" blocks joined by a
  blank line. The text is tokenised without special tokens after `doc_start_ids`.
- `plain`: a user `template` with "{prompt}", the response right after it, after `doc_start_ids`.
- `auto`: `chat` when the tokenizer has a chat template, else `plain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cftune.errors import CftuneError

FORMATS = ("auto", "chat", "qa", "plain")
QA_TEMPLATE = "Question: {prompt}\nAnswer:"
QA_DELIMITER = " "
# The pretraining document separator of GPT-2-style vocabularies (GPT-2, SmolLM, Qwen, OLMo):
# documents follow it in pretraining even where no tokenizer field names it (SmolLM2-Instruct
# calls it the unk token; its bos is the chat-turn marker `<|im_start|>`).
ENDOFTEXT = "<|endoftext|>"


@dataclass(frozen=True)
class PromptSpec:
    """How a prompt is rendered: `format` (see the module doc), `template` (plain only) and
    `doc_start` (the token a plain document starts with; None = the rule of `doc_start_ids`)."""

    format: str = "auto"
    template: str = "{prompt}\n"
    doc_start: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CftuneError(f"prompt format {self.format!r} is not one of {', '.join(FORMATS)}")


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_markers(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else ""


def doc_start_ids(tokenizer, override: str | int | None = None) -> list[int]:
    """The ids a plain (non-chat) document starts with, as in the model's pretraining.

    Rule, first match wins:
    1. `override` (YAML/CLI `doc_start`): a token string (e.g. "<|endoftext|>"), a token id, or
       "" for no start token;
    2. the special ids the tokenizer itself puts before text (Gemma's and Llama's `<bos>`);
    3. the BOS token, unless it is a chat-turn marker (it appears in the chat template:
       SmolLM2-Instruct's bos is `<|im_start|>`, which every CF sample starts from);
    4. `<|endoftext|>` when the vocabulary has it (GPT-2-style pretraining separator);
    5. the EOS token, unless it is a chat-turn marker.
    Otherwise the caller must set `doc_start`.
    """
    vocab = tokenizer.get_vocab()
    if override is not None:
        if isinstance(override, int) or (isinstance(override, str) and override.isdigit()):
            i = int(override)
            if not 0 <= i < len(tokenizer):
                raise CftuneError(f"doc_start = {override}: not a token id (0..{len(tokenizer) - 1})")
            return [i]
        if override == "":
            return []
        if override not in vocab:
            raise CftuneError(f"doc_start = {override!r} is not a token of the vocabulary; give "
                              f"a token such as {ENDOFTEXT!r}, a token id, or \"\" for none")
        return [vocab[override]]
    with_specials = list(tokenizer("a")["input_ids"])
    plain = _text_ids(tokenizer, "a")
    if len(with_specials) > len(plain) and with_specials[-len(plain):] == plain:
        return with_specials[: len(with_specials) - len(plain)]
    markers = _chat_markers(tokenizer)
    bos = tokenizer.bos_token
    if bos is not None and bos not in markers:
        return [tokenizer.bos_token_id]
    if ENDOFTEXT in vocab:
        return [vocab[ENDOFTEXT]]
    eos = tokenizer.eos_token
    if eos is not None and eos not in markers:
        return [tokenizer.eos_token_id]
    raise CftuneError(f"tokenizer {tokenizer.name_or_path}: no token marks the start of a plain "
                      f"document (its bos/eos are chat-turn markers); set `doc_start`")


def known_doc_start(tokenizer, override: str | int | None = None) -> list[int] | None:
    """`doc_start_ids` for a manifest, or None when this tokenizer has none (a run that needed
    one would have stopped with the error before)."""
    try:
        return doc_start_ids(tokenizer, override)
    except CftuneError:
        return None


def resolve_format(tokenizer, spec: PromptSpec) -> str:
    """`chat`, `qa` or `plain` for this tokenizer (`auto` picks chat when there is a template)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if spec.format == "chat" and not has_template:
        raise CftuneError("prompt format 'chat' but the tokenizer has no chat template; use "
                          "qa or plain")
    if spec.format == "auto":
        return "chat" if has_template else "plain"
    return spec.format


def _chat_text(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: str, spec: PromptSpec,
               shots: Sequence[tuple[str, str]] = ()) -> list[int]:
    """Token ids of a task prompt, ready for `response_ids` to follow; `shots` are few-shot
    (prompt, response) pairs placed before it."""
    fmt = resolve_format(tokenizer, spec)
    if fmt == "chat":
        messages: list[dict[str, str]] = []
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": prompt})
        return _text_ids(tokenizer, _chat_text(tokenizer, messages))
    template = QA_TEMPLATE if fmt == "qa" else spec.template
    delimiter = QA_DELIMITER if fmt == "qa" else ""
    blocks = [template.format(prompt=q) + delimiter + a for q, a in shots]
    text = "\n\n".join(blocks + [template.format(prompt=prompt)])
    return doc_start_ids(tokenizer, spec.doc_start) + _text_ids(tokenizer, text)


def response_ids(tokenizer, response: str, spec: PromptSpec) -> list[int]:
    """Token ids of a response after `prompt_ids` (no end-of-sequence token: callers add it)."""
    delimiter = QA_DELIMITER if resolve_format(tokenizer, spec) == "qa" else ""
    return _text_ids(tokenizer, delimiter + response)


def document_ids(tokenizer, text: str, doc_start: str | None = None) -> list[int]:
    """A generic document (replay corpus, `text` rows) as pretraining saw it: start token + text."""
    return doc_start_ids(tokenizer, doc_start) + _text_ids(tokenizer, text)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to its first stop string (a generated answer, without the next question it
    starts): one rule for every decoding engine, so their answers compare."""
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text
