"""KL(base ‖ model), estimated data-free from context-free samples of the base.

For samples x ~ p_base drawn at temperature 1 with no truncation of the distribution,
    KL(p_base ‖ p_model) = E_x[log p_base(x) − log p_model(x)],
so the mean of the per-sample differences is an unbiased estimate with an ordinary standard
error. `logp_base` is stored with each sample by `cftune generate`; only the model is scored here.
Samples cut at `max_new_tokens` give the KL between the two distributions over length-capped
sequences, which is what the sample set measures (and a lower bound on the full-sequence KL).

Any other sampler (T≠1, top-p/top-k/min-p) draws from a distribution other than p_base, and the
mean difference is then not the KL: such samples are refused unless `force=True`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

from cftune.errors import CftuneError
from cftune.generate.samples import iter_samples
from cftune.io import read_manifest
from cftune.scoring import score_continuations

UNBIASED_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
Z95 = 1.959964


def check_manifest(folder: str | Path, manifest: dict, base_fingerprint: str | None = None,
                   tokenizer=None, force: bool = False) -> None:
    """Refuse samples the estimate would be wrong for: biased sampling, another base model, or
    another tokenizer. `force` skips the first two (the tokenizer must always match)."""
    where = f"{Path(folder) / 'manifest.json'}"
    sampling = manifest.get("sampling") or {}
    bad = [f"{k}={sampling.get(k)!r}" for k, v in UNBIASED_SAMPLING.items() if sampling.get(k) != v]
    if bad and not force:
        raise CftuneError(
            f"{where}: samples were drawn with {', '.join(bad)}; the KL estimate needs plain "
            "sampling (temperature 1, top_p 1, top_k 0, min_p 0): draw held-out samples with "
            "those settings, or pass --force-kl to accept a biased estimate"
        )
    counts = manifest.get("counts") or {}
    dropped = {k: counts.get(k, 0) for k in ("filtered_min_tokens", "filtered_duplicates")}
    if any(dropped.values()) and not force:
        raise CftuneError(
            f"{where}: generation dropped samples ({', '.join(f'{k}={v}' for k, v in dropped.items())}),"
            " so the kept ones are not draws from the base; regenerate held-out samples with "
            "--min-tokens 0 --no-dedup, or pass --force-kl"
        )
    drawn_from = manifest.get("model_fingerprint")
    if base_fingerprint and drawn_from and drawn_from != base_fingerprint and not force:
        raise CftuneError(
            f"{where}: samples were drawn from '{manifest.get('model')}' ({drawn_from[:19]}…), "
            f"not from the base given ({base_fingerprint[:19]}…); pass the base they came from, "
            "or --force-kl"
        )
    info = manifest.get("tokenizer") or {}
    if tokenizer is not None and info:
        sizes = {len(tokenizer), tokenizer.vocab_size}
        eos = info.get("eos_token_ids")
        if info.get("vocab_size") not in sizes or (
            eos and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos
        ):
            raise CftuneError(
                f"{where}: samples were tokenised by '{info.get('name_or_path')}' "
                f"(vocab {info.get('vocab_size')}, eos {eos}), not by the base's tokenizer "
                f"(vocab {len(tokenizer)}, eos {tokenizer.eos_token_id}); use samples of this base"
            )


def mean_interval(values: Sequence[float]) -> dict:
    """Mean, standard error (sample std / sqrt n) and normal 95% interval."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    se = math.sqrt(var / n)
    return {"value": mean, "stderr": se, "ci95": [mean - Z95 * se, mean + Z95 * se], "n": n}


def ratio_interval(num: Sequence[float], den: Sequence[float]) -> dict:
    """sum(num)/sum(den) with its delta-method standard error (per-token KL)."""
    n = len(num)
    mean_den = sum(den) / n
    r = sum(num) / sum(den)
    resid = [a - r * b for a, b in zip(num, den)]
    se = math.sqrt(sum(x * x for x in resid) / (n - 1) / n) / mean_den if n > 1 else float("nan")
    return {"value": r, "stderr": se, "ci95": [r - Z95 * se, r + Z95 * se]}


def heldout_records(samples_folder: str | Path, limit: int | None = None) -> list[dict]:
    """The first `limit` non-empty samples of a folder (sample i is the same however many were
    drawn, so a folder extended later still gives the same first `limit`)."""
    records = [r for r in iter_samples(samples_folder) if r["token_ids"]]
    return records[:limit] if limit is not None else records


def samples_digest(records: Sequence[dict]) -> str:
    """A content hash of exactly the samples scored (ids, tokens, stored log-probs): evaluations
    are keyed and compared by it, so a table never mixes two sample sets (issue 9, item 7)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r["id"], r["token_ids"], r["logp_base"]]).encode())
    return h.hexdigest()[:20]


def logp_dtype(manifest: dict) -> str:
    """The precision `logp_base` was computed in (older manifests: the generation dtype)."""
    return manifest.get("logp_dtype") or (manifest.get("settings") or {}).get("dtype") or "fp32"


def _requests(samples_folder: str | Path, records: list[dict]) -> list[tuple[list, list]]:
    prefix = list(read_manifest(samples_folder).get("prefix_ids") or [])
    requests = [(r.get("prompt_ids") or prefix, r["token_ids"]) for r in records]
    if not all(ctx for ctx, _ in requests):
        raise CftuneError(f"{samples_folder}/manifest.json: `prefix_ids` is empty; the samples "
                          "need the context they were drawn after")
    return requests


def score_samples(model, samples_folder: str | Path, limit: int | None = None,
                  batch_size: int = 8, dtype: str = "fp32", desc: str | None = None) -> list[float]:
    """log p_model(x) of the first `limit` samples (the base's own, for a `reference`)."""
    records = heldout_records(samples_folder, limit)
    scored = score_continuations(model, _requests(samples_folder, records), batch_size, dtype,
                                 desc=desc)
    return [s.logprob for s in scored]


def needs_reference(samples_folder: str | Path, dtype: str) -> bool:
    """Whether the KL in `dtype` needs the base re-scored by the model's own scorer: always but
    for fp32 scoring of fp32 `logp_base`. In fp32 the sampler's incremental (cached) passes and
    the scorer's full forward pass agree to ~1e-5 nats per sample; in bf16 or fp16 they round
    differently even when stored in `dtype` (issue 32, item 5: KL(base ‖ base) = 0.073 nats
    per sample for SmolLM2 with bf16 `logp_base` scored in bf16)."""
    return dtype != "fp32" or logp_dtype(read_manifest(samples_folder)) != "fp32"


def base_reference(base: str, samples_folder: str | Path, dtype: str, limit: int | None = None,
                   batch_size: int = 8, device: str = "auto") -> list[float] | None:
    """The base's log-probs of the samples in `dtype`, by the scorer (and the `batch_size`) the
    model is scored with: the KL's `reference` where `needs_reference`, else None (nothing
    loaded: the stored fp32 `logp_base` serves)."""
    if not needs_reference(samples_folder, dtype):
        return None
    from cftune.models import load_model

    model = load_model(base, device, dtype, inference=True)
    return score_samples(model, samples_folder, limit, batch_size, dtype,
                         desc=f"base log-probs in {dtype}")


def kl_to_base(model, samples_folder: str | Path, batch_size: int = 8, dtype: str = "fp32",
               force: bool = False, limit: int | None = None, base_fingerprint: str | None = None,
               tokenizer=None, reference: Sequence[float] | None = None) -> dict:
    """KL(base ‖ model) from a finished sample folder of the base: `value` (nats per sequence),
    `stderr`, `ci95`, `n` (samples), `per_token` = {value, stderr, ci95, n (tokens)},
    `per_sample` (each sample's log-ratio) and `samples_digest` (what was scored).

    Give `base_fingerprint` / `tokenizer` (the base's) to check the samples came from them.
    `reference`: the base's log-probs of the same samples by the same scorer in the same
    precision as the model (`base_reference`), used instead of the stored `logp_base` whenever
    scoring is not fp32 or `logp_base` is not (`needs_reference`: a bf16 model against fp32
    `logp_base` carries a rounding offset, +0.13 nats per sample for SmolLM2, and bf16
    `logp_base` from the sampler's cached passes another, 0.073). `evaluate_model` passes it
    (computed once per base, cached); not given where it is needed, it is computed here from the
    model the manifest names (the one `logp_base` is of), with this `batch_size` on the model's
    device, so a direct call gets it too (issue 32, item 5). The stored-minus-reference gap is then reported as
    `reference_residual`, a diagnostic that is never subtracted. For the base itself the result
    is then exactly 0, and in fp32 without a reference the recomputation error, ~1e-5 nats per
    sample (not forced to 0, so a wrong sample set shows up).
    """
    manifest = read_manifest(samples_folder)
    check_manifest(samples_folder, manifest, base_fingerprint, tokenizer, force)
    records = heldout_records(samples_folder, limit)
    if len(records) < 2:
        raise CftuneError(f"{samples_folder}: {len(records)} usable sample(s); the KL estimate "
                          "needs at least 2 (more for a useful error bar)")
    if reference is None and needs_reference(samples_folder, dtype):
        if not manifest.get("model"):
            raise CftuneError(f"{Path(samples_folder) / 'manifest.json'}: names no `model` to "
                              f"re-score `logp_base` with, which the KL in {dtype} needs; score "
                              "in fp32 or draw the samples again with `cftune generate`")
        reference = base_reference(manifest["model"], samples_folder, dtype, limit, batch_size,
                                   next(model.parameters()).device.type)
    if reference is not None and len(reference) != len(records):
        raise CftuneError(f"{samples_folder}: {len(reference)} reference log-probs for "
                          f"{len(records)} samples")
    scored = score_continuations(model, _requests(samples_folder, records), batch_size, dtype,
                                 desc="KL to base")
    stored = [r["logp_base"] for r in records]
    base = list(reference) if reference is not None else stored
    diffs = [b - s.logprob for b, s in zip(base, scored)]
    lengths = [len(r["token_ids"]) for r in records]
    out = mean_interval(diffs)
    per_token = ratio_interval(diffs, lengths)
    out.update(
        per_token={**per_token, "n": sum(lengths)}, n_tokens=sum(lengths),
        unfinished=sum(not r.get("finished", True) for r in records),
        forced=bool(force), samples=str(samples_folder), samples_digest=samples_digest(records),
        per_sample=diffs,  # log p_base − log p_model per sample, in file order (paired tests)
        score_dtype=dtype, logp_base_dtype=logp_dtype(manifest),
    )
    if reference is not None:
        out["reference_residual"] = mean_interval([a - b for a, b in zip(stored, base)])
    return out
