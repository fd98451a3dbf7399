"""Perplexity of a model on a text file (whole `.txt`, or the `text` field of each JSONL line).

Each document is split into windows of `window` tokens; every window after the first is scored
given the `window` tokens before it (so each token sees at least `window` tokens of context once
the document is long enough, as in lm-eval's rolling log-likelihood), and the first token of a
document is scored after the BOS (else EOS) token. Reports token perplexity and bits per byte,
the tokenizer-independent figure for comparing models with different vocabularies.
"""

from __future__ import annotations

import math
from pathlib import Path

from cftune.errors import CftuneError
from cftune.io import iter_jsonl
from cftune.scoring import score_continuations


def read_documents(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CftuneError(f"perplexity text file {path} not found")
    if path.suffix == ".jsonl":
        docs = []
        for n, rec in enumerate(iter_jsonl(path), 1):
            if not isinstance(rec.get("text"), str):
                raise CftuneError(f"{path} record {n}: missing text field `text`")
            docs.append(rec["text"])
    else:
        docs = [path.read_text(encoding="utf-8")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CftuneError(f"{path}: no text to score")
    return docs


def perplexity(model, tokenizer, text_file: str | Path, window: int = 512, batch_size: int = 8,
               dtype: str = "fp32", limit: int | None = None) -> dict:
    """Token perplexity and bits per byte of `text_file` (first `limit` documents)."""
    docs = read_documents(text_file)[:limit]
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    requests = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        for s in range(0, len(ids), window):
            context = ids[max(0, s - window):s] or [start_id]
            requests.append((context, ids[s:s + window]))
    scored = score_continuations(model, requests, batch_size, dtype, desc="perplexity")
    logp = sum(s.logprob for s in scored)
    n_tokens = sum(len(c) for _, c in requests)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"perplexity": math.exp(-logp / n_tokens), "bits_per_byte": -logp / n_bytes / math.log(2),
            "n_tokens": n_tokens, "n": len(docs)}
