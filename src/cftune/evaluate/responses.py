"""The base's own responses to held-out instructions, drawn once by `cftune generate` (T = 1, with
their `logp_base`) and kept with the prompts they answer: what the instruction KL is scored on
(`cftune.evaluate.instructions`). Sample i answers prompt i mod P, k responses per prompt.

Sampling is seeded but not bitwise portable: another CPU draws other responses, and a KL scored
on another set pairs with nothing. So the folder also keeps `responses/kept.jsonl`, the
responses without their prompts (a hash of each prompt's ids instead: the prompts are the
instruction file's, which an experiment kept in git must not copy), and a folder holding only
it and the manifest is restored from it and the instructions, never drawn again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from cftune.errors import CftuneError
from cftune.evaluate.instructions import (
    PROMPTS_FILE,
    RESPONSES,
    instruction_spec,
    read_instructions,
)
from cftune.generate.samples import SAMPLES_JSONL
from cftune.io import atomic_write_text, iter_jsonl, read_manifest

KEPT = "kept.jsonl"  # in RESPONSES: each response without its prompt ids (see the module doc)

# ---------------------------------------------------------------- the base's responses (once)


def responses_key(base_fingerprint: str, instructions: str | Path, settings: dict) -> str:
    """Folder name of a base's responses: base weights + instruction file content + settings."""
    content = hashlib.sha256(Path(instructions).read_bytes()).hexdigest()
    blob = json.dumps([base_fingerprint, content, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def draw_responses(base: str, instructions: str | Path, samples_per_prompt: int = 2,
                   max_new_tokens: int = 128, out: str | Path | None = None,
                   limit: int | None = None, offset: int = 0, prompt_field: str = "prompt",
                   reference_field: str = "reference", seed: int = 0, batch_size: int = 16,
                   dtype: str = "fp32", device: str = "auto", doc_start: str | None = None,
                   base_fingerprint: str | None = None) -> Path:
    """Draw the base's T=1 responses (k = `samples_per_prompt` per instruction, at most
    `max_new_tokens` each) with `cftune generate`; return the folder, which holds
    `instructions.jsonl` (the P instructions read) and `responses/` (sample i answers
    instruction i mod P; `logp_base` in `dtype`). `out` defaults to a folder under
    `cache_dir()/instructions` keyed by the base's fingerprint, the file's content and every
    setting, so the responses are drawn once however many models are scored; a finished folder
    is returned as it is, an unfinished one resumes."""
    from cftune.generate.config import GenerateConfig, task_prompt_ids
    from cftune.generate.stage import generate
    from cftune.models import cache_dir, fingerprint, load_tokenizer, resolve_device

    if samples_per_prompt <= 0 or max_new_tokens <= 0:
        raise CftuneError(f"instruction samples ({samples_per_prompt}) and max_new_tokens "
                          f"({max_new_tokens}) must be > 0")
    rows = read_instructions(instructions, prompt_field, reference_field, limit, offset)
    spec = instruction_spec(load_tokenizer(base), doc_start)
    settings = {"limit": limit, "offset": offset, "fields": [prompt_field, reference_field],
                "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
                "seed": seed, "prompt": dataclasses.asdict(spec), "dtype": dtype,
                "device": resolve_device(device).type}
    if out is None:
        fp = base_fingerprint or fingerprint(base)
        out = cache_dir() / "instructions" / responses_key(fp, instructions, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows)
    prompts = out / PROMPTS_FILE
    if prompts.is_file() and prompts.read_text() != text:
        raise CftuneError(f"{out} holds responses to other instructions; use another folder")
    if not prompts.is_file():
        atomic_write_text(prompts, text)
    wanted = len(rows) * samples_per_prompt
    config = GenerateConfig(
        model=base, out=str(out / RESPONSES), num_samples=wanted, max_new_tokens=max_new_tokens,
        seed=seed, task_prompts=str(prompts), prompt_field="prompt", prompt_format=spec.format,
        doc_start=doc_start, batch_size=batch_size, dtype=dtype, device=device)
    folder = out / RESPONSES
    if (folder / KEPT).is_file() and not (folder / SAMPLES_JSONL).is_file():
        restore(folder, task_prompt_ids(load_tokenizer(base), config))
    if not ((folder / "manifest.json").is_file()
            and read_manifest(folder)["counts"]["samples"] == wanted):
        generate(config)  # (a batch size or device name change alone needs no redraw)
    if not (folder / KEPT).is_file():
        keep(folder)
    return out


def _prompt_hash(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def keep(folder: Path) -> None:
    """Write `folder/kept.jsonl`: every response record with `prompt_ids` replaced by its hash."""
    lines = []
    for record in iter_jsonl(folder / SAMPLES_JSONL):
        ids = record.pop("prompt_ids")
        lines.append(json.dumps({**record, "prompt_sha": _prompt_hash(ids)}) + "\n")
    atomic_write_text(folder / KEPT, "".join(lines))


def restore(folder: Path, prompts: list[list[int]]) -> None:
    """Rebuild `folder/samples.jsonl` from `kept.jsonl` and the prompts' token ids (response i
    answers prompt i mod P), refusing if a prompt does not hash as the one it was drawn after."""
    lines = []
    for n, record in enumerate(iter_jsonl(folder / KEPT), 1):
        ids = prompts[record["id"] % len(prompts)]
        if _prompt_hash(ids) != record.pop("prompt_sha"):
            raise CftuneError(f"{folder / KEPT} line {n}: its prompt is not posed as when the "
                              "responses were drawn (another instruction file, tokenizer or "
                              "prompt format); delete the folder to draw them again")
        lines.append(json.dumps({**record, "prompt_ids": ids}, separators=(",", ":")) + "\n")
    atomic_write_text(folder / SAMPLES_JSONL, "".join(lines))
