"""`cftune generate`: context-free samples x ~ p_base, with the base log-probs the KL needs.

The stage turns a `GenerateConfig` into a sample folder (format: `cftune.generate.samples`). It is
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
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cftune import __version__, precision
from cftune.errors import CftuneError
from cftune.generate.config import (
    GenerateConfig,
    context_free_prefix,
    engine_settings,
    prompt_spec,
    stop_ids,
    task_prompt_ids,
    without_later_defaults,
)
from cftune.generate.sampler import ContinuousSampler
from cftune.generate.samples import SAMPLES_JSONL, SAMPLES_PARQUET, export, write_parquet
from cftune.generate.sampling import Drawn, Job
from cftune.io import (
    MANIFEST,
    PROGRESS,
    JsonlAppender,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    read_json,
    truncate_to_last_newline,
)
from cftune.locking import output_locked
from cftune.models import (
    DTYPES,
    fingerprint,
    load_model,
    load_tokenizer,
    resolve_device,
)
from cftune.prompts import resolve_format
from cftune.provenance import package_versions

# Samples are drawn in blocks of this many batches: a block starts from an empty batch, so a
# resumed or multi-process run reproduces the uninterrupted run's batches (and floats) exactly.
BLOCK_BATCHES = 8
# Settings that may change between a run and its resumption without changing any sample.
_RESUMABLE_CHANGES = ("num_samples", "out", "export", "format")


# ---------------------------------------------------------------------------------------------
# The stage


def _settings(config: GenerateConfig) -> dict[str, Any]:
    """What determines the samples (the resume check compares these)."""
    return without_later_defaults(
        {k: v for k, v in asdict(config).items() if k not in _RESUMABLE_CHANGES})


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

        from cftune.generate.vllm_engine import VLLMSampler
        from cftune.models import local_path

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
    from cftune.generate.vllm_engine import GUARANTEES, load_vllm

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
    from cftune.generate.samples import load_samples

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
