"""The context-free sample file format: records, manifest, crash-safe appends, loading and export.

A sample folder holds `samples.jsonl` (or `samples.parquet`) and `manifest.json`. The manifest is
written last, so its presence means generation finished. While a run is in progress,
`progress.json` holds its settings so a restarted run can check it is continuing the same job.

Record contract (what `train` and `eval` read): `id` (the sample's seed index), `text`, `token_ids` (the sampled ids,
ending with the EOS id when `finished`; the prefix is never included), `n_tokens`, `finished`,
`logp_base` (sum of the base model's untempered log-probs of `token_ids` given the prefix), and
optionally `topk_ids` / `topk_logprobs` (one list of K per position of `token_ids`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cftune.errors import CftuneError
from cftune.io import atomic_write_text, iter_jsonl, read_manifest

SAMPLES_JSONL = "samples.jsonl"
SAMPLES_PARQUET = "samples.parquet"
EXPORTS = ("trl", "axolotl", "text")


def samples_file(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    for name in (SAMPLES_PARQUET, SAMPLES_JSONL):
        if (folder / name).is_file():
            return folder / name
    raise CftuneError(f"{folder}: no {SAMPLES_JSONL} or {SAMPLES_PARQUET} found")


def iter_samples(folder: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every record of a finished sample folder, in id order."""
    read_manifest(folder)
    path = samples_file(folder)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    else:
        yield from iter_jsonl(path)


def load_samples(folder: str | os.PathLike):
    """A finished sample folder as a `datasets.Dataset` (one row per record)."""
    import datasets

    path = samples_file(folder)
    read_manifest(folder)
    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def write_parquet(records: Iterable[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(records))
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def export(folder: str | os.PathLike, kind: str, prefix_ids: list[int], prefix_text: str) -> Path:
    """Write a file another trainer loads unchanged.

    - `trl`: `trl.jsonl` with pre-tokenised `input_ids` (prefix + sample), `completion_mask`
      (1 on sample tokens) and `labels` (-100 on the prefix): TRL's SFTTrainer takes it as a
      tokenised dataset; a plain `Trainer` uses `labels` directly.
    - `axolotl`: `axolotl.jsonl` with `{"text"}` (prefix text + sample text) for `type: completion`.
    - `text`: `text.jsonl` with the sample text alone as `{"text"}`.
    """
    if kind not in EXPORTS:
        raise CftuneError(f"--export '{kind}' is not one of {', '.join(EXPORTS)}")
    folder = Path(folder)
    out = folder / f"{kind}.jsonl"
    lines = []
    for r in iter_samples(folder):
        if kind == "trl":
            ids = list(prefix_ids) + list(r["token_ids"])
            row = {
                "input_ids": ids,
                "completion_mask": [0] * len(prefix_ids) + [1] * len(r["token_ids"]),
                "labels": [-100] * len(prefix_ids) + list(r["token_ids"]),
            }
        elif kind == "axolotl":
            row = {"text": prefix_text + r["text"]}
        else:
            row = {"text": r["text"]}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + ("\n" if lines else ""))
    return out
