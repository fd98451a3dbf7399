"""Instruction yardsticks: forgetting of what an instruct model is for (issue 10, item 2).
The base's responses they are scored on are drawn by `cftune.evaluate.responses`.

Two numbers on held-out human-written instructions, posed with the base's chat template (lm-eval's
"qa" prompt, "Question: …\\nAnswer:", for a tokenizer without one), through
`cftune.prompts.prompt_ids`, the prompt builder training uses:

- instruction KL: KL(base ‖ model) on the base's own T=1 responses, k per prompt, drawn once by
  `cftune generate` (which stores `logp_base`) and scored by `kl.kl_to_base`. Sample i answers
  prompt i mod P, so the k responses of a prompt form a cluster: the SE is the sd of the
  per-prompt means / √P (`paired.clustered_mean`), not the naive SE over responses. BOS-only CF
  samples never pose an instruction, so this measures drift where CFS does not train directly.
- reference NLL: the model's NLL per token of the human reference response (EOS appended, as
  `task_accuracy.answer_nll` does), averaged per prompt. Unlike a KL it can move either way, so
  it can show a gain; `compare_per_prompt` pairs it per prompt against the base.

Files: any JSONL with a prompt field and an optional reference field, or the self-instruct seed
format `{"instruction", "instances": [{"input", "output"}, …]}` (Wang et al. 2023), detected by
its keys: prompt = instruction, then "\\n\\n" + the first instance's input when it is not blank;
reference = that instance's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cftune.errors import CftuneError
from cftune.evaluate.kl import heldout_records, kl_to_base, mean_interval
from cftune.io import BOM, iter_jsonl
from cftune.prompts import PromptSpec, prompt_ids, response_ids
from cftune.scoring import score_continuations
from cftune.stats import clustered_mean, paired_mean_difference

PROMPTS_FILE = "instructions.jsonl"  # the instructions read, one {prompt, reference} per line
RESPONSES = "responses"  # the base's responses: a `cftune generate` folder
SELF_INSTRUCT_KEYS = ("instruction", "instances")


@dataclass(frozen=True)
class Instruction:
    prompt: str
    reference: str | None = None


# ---------------------------------------------------------------------------------- reading


def _numbered_records(path: Path):
    """(line number, record) of a JSONL file: `iter_jsonl` skips blank lines, so the physical
    line numbers of the non-blank lines are counted beside it (errors name the line)."""
    raw = path.read_bytes()
    lines = raw[len(BOM):].split(b"\n") if raw.startswith(BOM) else raw.split(b"\n")
    numbers = [n for n, line in enumerate(lines, 1)
               if line.decode("utf-8", "replace").strip()]
    return zip(numbers, iter_jsonl(path))


def _text(rec: dict, key: str, where: str, required: bool, hint: str) -> str | None:
    value = rec.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        got = "missing" if key not in rec else f"{type(value).__name__} {json.dumps(value)[:40]}"
        raise CftuneError(f"{where}: field `{key}` must be {'non-empty ' if required else ''}"
                          f"text (got {got}); {hint}")
    return value


def _self_instruct_row(rec: dict, where: str) -> Instruction:
    hint = 'self-instruct rows are {"instruction", "instances": [{"input", "output"}]}'
    instruction = _text(rec, "instruction", where, True, hint)
    instances = rec.get("instances")
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise CftuneError(f"{where}: `instances` must be a non-empty list of objects; {hint}")
    first = instances[0]
    given = _text(first, "input", f"{where} (instances[0])", False, hint) or ""
    output = _text(first, "output", f"{where} (instances[0])", False, hint)
    prompt = instruction + ("\n\n" + given if given.strip() else "")
    return Instruction(prompt, output if output and output.strip() else None)


def read_instructions(path: str | Path, prompt_field: str = "prompt",
                      reference_field: str = "reference", limit: int | None = None,
                      offset: int = 0) -> list[Instruction]:
    """The first `limit` instructions of a JSONL file from record `offset` on (shape detected
    from the first record; every record is validated, skipped ones too).

    A missing or empty prompt, a reference that is not text, or a self-instruct row without
    instances is a one-line `CftuneError` naming the file and line. A blank reference counts as
    none (reference NLL skips that prompt)."""
    path = Path(path)
    if not path.is_file():
        raise CftuneError(f"instructions file {path} not found")
    rows: list[Instruction] = []
    self_instruct = None
    hint = (f"an instruction file has a text field `{prompt_field}` (and optionally "
            f"`{reference_field}`; set --instruction-prompt-field / "
            "--instruction-reference-field) or is in the self-instruct format")
    for n, rec in _numbered_records(path):
        where = f"{path} line {n}"
        if not isinstance(rec, dict):
            raise CftuneError(f"{where}: not a JSON object; {hint}")
        if self_instruct is None:
            self_instruct = prompt_field not in rec and all(k in rec for k in SELF_INSTRUCT_KEYS)
        if self_instruct:
            rows.append(_self_instruct_row(rec, where))
        else:
            prompt = _text(rec, prompt_field, where, True, hint)
            reference = _text(rec, reference_field, where, False, hint)
            rows.append(Instruction(prompt, reference if reference and reference.strip() else None))
        if limit is not None and len(rows) >= offset + limit:
            break
    if len(rows) <= offset:
        raise CftuneError(f"instructions file {path} has {len(rows)} records, none from offset "
                          f"{offset} on" if rows else f"instructions file {path} is empty (no records)")
    return rows[offset:]


def instructions_digest(rows: Sequence[Instruction]) -> str:
    """Content hash of the instructions scored: paired comparisons refuse two different sets."""
    text = json.dumps([dataclasses.astuple(r) for r in rows])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def instruction_spec(tokenizer, doc_start: str | None = None) -> PromptSpec:
    """How instructions are posed: the chat template when the tokenizer has one, else lm-eval's
    qa prompt ("Question: {prompt}\\nAnswer:" after the document start token)."""
    return PromptSpec("chat" if getattr(tokenizer, "chat_template", None) else "qa",
                      doc_start=doc_start)


def read_prompts(folder: str | Path) -> list[Instruction]:
    """The instructions a `draw_responses` folder answered, in order."""
    return [Instruction(**r) for r in iter_jsonl(Path(folder) / PROMPTS_FILE)]


# --------------------------------------------------------------------------- the two metrics


def summarize_kl(per_sample: Sequence[float], ids: Sequence[int], n_prompts: int) -> dict:
    """Instruction KL from per-response log-ratios: sample `ids[j]` answers prompt ids[j] mod P.
    `value` = mean over responses, `stderr` = sd of the per-prompt means / √P, t interval on
    P − 1 degrees of freedom; `per_prompt` = each prompt's mean (None if it has no response)."""
    clusters = [i % n_prompts for i in ids]
    out = clustered_mean(per_sample, clusters)
    groups: dict[int, list[float]] = {}
    for v, c in zip(per_sample, clusters):
        groups.setdefault(c, []).append(v)
    per_prompt = [sum(groups[p]) / len(groups[p]) if p in groups else None
                  for p in range(n_prompts)]
    return {**out, "n_prompts": out.pop("n_clusters"), "n_responses": len(per_sample),
            "per_prompt": per_prompt, "indices": list(range(n_prompts))}


def instruction_kl(model, folder: str | Path, batch_size: int = 8, dtype: str = "fp32",
                   base_fingerprint: str | None = None, tokenizer=None,
                   reference: Sequence[float] | None = None) -> dict:
    """KL(base ‖ model) in nats per response on a `draw_responses` folder: value, stderr, ci95
    (clustered by prompt), n (responses), n_prompts, n_responses, per_prompt, per_token (value
    only), n_tokens, unfinished, samples_digest and `seconds` (scoring time).
    `base_fingerprint` / `tokenizer` / `reference`: as `kl.kl_to_base`."""
    started = time.time()
    folder = Path(folder)
    n_prompts = len(read_prompts(folder))
    kl = kl_to_base(model, folder / RESPONSES, batch_size, dtype, base_fingerprint=base_fingerprint,
                    tokenizer=tokenizer, reference=reference)
    ids = [r["id"] for r in heldout_records(folder / RESPONSES)]  # kl_to_base's records, in order
    out = summarize_kl(kl["per_sample"], ids, n_prompts)
    out.update(per_token=kl["per_token"]["value"], n_tokens=kl["n_tokens"],
               unfinished=kl["unfinished"], samples_digest=kl["samples_digest"],
               score_dtype=dtype, seconds=round(time.time() - started, 2))
    return out


def reference_nll(model, tokenizer, instructions: str | Path | Sequence[Instruction],
                  spec: PromptSpec | None = None, batch_size: int = 8, dtype: str = "fp32",
                  limit: int | None = None, prompt_field: str = "prompt",
                  reference_field: str = "reference") -> dict:
    """The model's NLL of each human reference response after its prompt, nats per token
    (response + EOS as targets, prompt from `cftune.prompts.prompt_ids`; `spec` defaults to
    `instruction_spec(tokenizer)`). `value` averages the per-prompt means, `stderr` is over
    prompts; `per_prompt` / `indices` (position in the instruction list) feed
    `compare_per_prompt`; prompts without a reference are `skipped`."""
    started = time.time()
    rows = (read_instructions(instructions, prompt_field, reference_field, limit)
            if isinstance(instructions, (str, Path)) else list(instructions)[:limit])
    spec = spec or instruction_spec(tokenizer)
    indices = [i for i, r in enumerate(rows) if r.reference]
    if not indices:
        raise CftuneError(f"none of the {len(rows)} instructions has a reference response; "
                          f"reference NLL needs a `{reference_field}` field")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    requests = [(prompt_ids(tokenizer, rows[i].prompt, spec),
                 response_ids(tokenizer, rows[i].reference, spec) + eos) for i in indices]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = score_continuations(model, requests, batch_size, dtype, pad_id=pad,
                                 desc="instructions (reference NLL)")
    per_prompt = [-float(s.token_logprobs.mean()) for s in scored]
    tokens = sum(len(s.token_logprobs) for s in scored)
    return {**mean_interval(per_prompt), "per_prompt": per_prompt, "indices": indices,
            "n_prompts": len(rows), "skipped": len(rows) - len(indices),
            "token_weighted": -sum(s.logprob for s in scored) / tokens, "tokens": tokens,
            "format": spec.format, "instructions_digest": instructions_digest(rows),
            "score_dtype": dtype, "seconds": round(time.time() - started, 2)}


def compare_per_prompt(result_a: dict, result_b: dict) -> dict:
    """Paired comparison of two `instruction_kl` or two `reference_nll` results (B − A per
    prompt, paired SE and t interval; `paired.paired_mean_difference`). For reference NLL a
    negative delta means B finds the human responses more likely than A does (a gain)."""
    for key in ("samples_digest", "instructions_digest"):
        if key in result_a and result_a.get(key) != result_b.get(key):
            raise CftuneError(f"the two results scored different instruction sets ({key} "
                              f"{result_a.get(key)} vs {result_b.get(key)}); compare results of "
                              "the same instructions and responses")
    a = {i: v for i, v in zip(result_a["indices"], result_a["per_prompt"]) if v is not None}
    b = {i: v for i, v in zip(result_b["indices"], result_b["per_prompt"]) if v is not None}
    common = sorted(a.keys() & b.keys())
    if not common:
        raise CftuneError("the two results share no scored prompt")
    return paired_mean_difference([a[i] for i in common], [b[i] for i in common])
