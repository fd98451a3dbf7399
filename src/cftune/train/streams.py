"""The data of one training run: task examples plus its second stream (CF samples, contextual
answers or a replay corpus) as one `ExampleDataset`, the held-out sets of `eval_steps`, and the
per-example weights of FLOW. The CF stream takes the pool's first `cf_draws` samples, so a pool
extended later leaves a finished run's data as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import torch

from cftune import objectives
from cftune.errors import CftuneError
from cftune.train import batches, data
from cftune.train.config import TrainConfig, cf_draws


# -------------------------------------------------------------------------------------- data
def examples(config: TrainConfig, tokenizer, kind: str, path: str,
             split: str = "train") -> tuple[list[dict], data.Counts]:
    """The examples of one source, tokenised once and cached: `kind` is "task" (a task file or
    builtin: spec), "cf" (a sample folder: CF samples or contextual data) or "replay" (a corpus).
    The cache key holds the inputs' content hashes and every setting that changes the tokens."""
    from cftune.tasks import is_builtin, resolve_task

    fmt, spec = config.task_format(), config.spec
    key: dict[str, Any] = {"tokenizer": data.tokenizer_key(tokenizer),
                           "format": dataclasses.asdict(fmt), "kind": kind}
    if kind == "task" and is_builtin(path):
        # Keyed by the drawn rows themselves (cheap to draw): a changed generator must miss.
        rows = resolve_task(path, split, config.task_rows, config.seed)
        key["rows"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
        return data.cached(key, lambda: data.task_examples(path, tokenizer, fmt, rows))
    key["file"] = data.file_key(path)
    if kind == "task":
        return data.cached(key, lambda: data.task_examples(path, tokenizer, fmt))
    if kind == "replay":
        return data.cached(key, lambda: data.text_examples(path, tokenizer, fmt))
    kd = spec.kd and split == "train"  # held-out CF is scored by its NLL
    key.update(kd=kd, contextual=spec.contextual)
    return data.cached(key, lambda: data.cf_examples(path, fmt, kd=kd,
                                                     require_prompts=spec.contextual))


def cf_pool_facts(config: TrainConfig, tokenizer=None, model_fp: str | None = None
                  ) -> dict[str, Any] | None:
    """How the training CF pool was drawn (for the manifest); None for a method without one.
    Refuses what `check_cf_pool` refuses."""
    if config.spec.stream != "cf" or not config.cfs:
        return None
    return check_cf_pool(config.cfs, config.model, tokenizer, model_fp, config.allow_filtered_cf)


def check_cf_pool(folder: str, model: str, tokenizer=None, model_fp: str | None = None,
                  allow_filtered: bool = False) -> dict[str, Any]:
    """How the CF pool in `folder` was drawn, refusing a filtered one and one drawn from
    another model or tokenizer than `model` (`model_fp`: its fingerprint, when known).

    The CF term is an expectation under p_base: de-duplication under-weights the most probable
    sequences and a length filter drops short ones, so a filtered pool biases the estimator
    (issue 9, item 5). Tempered pools are allowed (the temperature ablation needs them) and
    recorded as such. `cftune train` and TRL's trainer with the CF term both check here.
    """
    from cftune.io import read_manifest

    manifest = read_manifest(folder)
    drawn_fp = manifest.get("model_fingerprint")
    vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    if tokenizer is not None and vocab is not None and vocab != len(tokenizer):
        other = f"another tokenizer (vocab {vocab}; {model}: {len(tokenizer)})"
    elif model_fp and drawn_fp and drawn_fp != model_fp:
        other = f"another model ({drawn_fp[:19]}…; {model}: {model_fp[:19]}…)"
    else:
        other = None
    if other:
        raise CftuneError(f"{folder}/manifest.json: the CF samples were drawn from "
                          f"{manifest.get('model')}, {other}; the CF term needs samples of the "
                          f"model being trained: `cftune generate --model {model}`")
    settings = manifest.get("settings") or {}
    dedup, min_tokens = bool(settings.get("dedup")), int(settings.get("min_tokens") or 0)
    filtered = dedup or min_tokens > 0
    if filtered and not allow_filtered:
        raise CftuneError(
            f"{folder}/manifest.json: the CF pool was filtered (dedup={dedup}, "
            f"min_tokens={min_tokens}), so its samples are not draws from the base and the CF "
            f"term is biased; regenerate with --no-dedup --min-tokens 0, or pass "
            f"--allow-filtered-cf")
    counts = manifest.get("counts") or {}
    samples = counts.get("samples") or 0
    return {"sampling": manifest.get("sampling"), "dedup": dedup, "min_tokens": min_tokens,
            "filtered": filtered, "prefix_ids": manifest.get("prefix_ids"), "samples": samples,
            # samples cut at max_new_tokens (contextual answers should stay < 5%)
            "capped": (counts.get("truncated") or 0) / samples if samples else None}


def build_data(config: TrainConfig, tokenizer) -> tuple[batches.ExampleDataset, dict[str, data.Counts]]:
    """Task examples + the method's second stream (CF samples, contextual data or a corpus)."""
    counts: dict[str, data.Counts] = {}
    task, counts["task"] = examples(config, tokenizer, "task", config.task)
    stream: list[dict] = []
    if config.spec.stream:
        path = config.replay if config.spec.stream == "replay" else config.cfs
        stream, counts["cf"] = examples(config, tokenizer, config.spec.stream, path)
        if config.spec.stream == "cf":
            stream, counts["cf"] = first_draws(config, stream, counts["cf"], counts["task"].kept)
    return batches.ExampleDataset(task, stream), counts


def first_draws(config: TrainConfig, pool: list[dict], counts: data.Counts, n_task: int
                ) -> tuple[list[dict], data.Counts]:
    """The CF samples a run trains on: the pool's first `cf_draws` (all processes together).

    Why: the samples are i.i.d. draws, so the first N are as good as any N, and a pool extended
    later (the runner extends a pool when another run of the config draws more) leaves this
    run's data, and its result, as they were; a shuffle of the whole pool would not."""
    need = cf_draws(config, n_task) * int(os.environ.get("WORLD_SIZE", "1"))
    if len(pool) <= need:
        return pool, counts
    kept = pool[:need]
    tokens = sum(sum(t != -100 for t in e["labels"]) for e in kept)
    return kept, dataclasses.replace(counts, kept=need, unused=len(pool) - need,
                                     target_tokens=tokens)


def warn_if_cf_repeats(config: TrainConfig, counts: dict[str, data.Counts]) -> None:
    """Say loudly when CF samples would be reused: a small pool is memorised and the model
    drifts (measured: a 192-sample pool reused 2.5x doubled KL(base‖θ) over plain fine-tuning),
    since the KL argument needs samples drawn anew."""
    if config.spec.stream != "cf" or "cf" not in counts:
        return
    need, have = cf_draws(config, counts["task"].kept), counts["cf"].kept
    if need > have:
        print(f"cftune train: WARNING: training draws {need} CF examples but {config.cfs} holds "
              f"{have}: each is reused ~{need / have:.1f}x, which makes the model memorise the "
              f"pool and drift from the base. Draw more first: `cftune generate --out {config.cfs} "
              f"--num-samples {need}` with the same settings extends the folder.",
              file=sys.stderr)


def build_eval_data(config: TrainConfig, tokenizer) -> batches.ExampleDataset:
    """Held-out task rows and/or held-out CF samples (`eval_task`, `eval_cfs`)."""
    task = examples(config, tokenizer, "task", config.eval_task, "test")[0] if config.eval_task else []
    cf = examples(config, tokenizer, "cf", config.eval_cfs, "test")[0] if config.eval_cfs else []
    return batches.ExampleDataset(task, cf)


def apply_flow_weights(model, dataset: batches.ExampleDataset, config: TrainConfig, dtype: str
                       ) -> dict[str, float]:
    """Set each task example's weight from the base model's mean token loss on it (FLOW),
    scored in the training precision `dtype`."""
    from cftune.scoring import score_continuations

    task = dataset.examples[:dataset.n_task]
    requests, masks = [], []
    for e in task:
        first = next(i for i, t in enumerate(e["labels"]) if t != -100 and i > 0)
        requests.append((e["input_ids"][:first], e["input_ids"][first:]))
        masks.append(torch.tensor([t != -100 for t in e["labels"][first:]]))
    was_training = model.training
    model.eval()
    scored = score_continuations(model, requests, batch_size=config.batch_size, dtype=dtype,
                                 pad_id=0, desc="FLOW: base losses")
    model.train(was_training)
    losses = torch.stack([-s.token_logprobs[m].mean() for s, m in zip(scored, masks)])
    weights = objectives.flow_weights(losses, config.flow_temperature)
    for e, w in zip(task, weights.tolist()):
        e["weight"] = w
    return {"min": float(weights.min()), "max": float(weights.max()),
            "base_loss_median": float(losses.median())}
