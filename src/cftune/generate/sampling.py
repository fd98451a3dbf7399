"""What every sampling engine shares: the sampling knobs, a job (prefix, id), a drawn sample, and
the per-sample seed that makes sample `i` the same whatever engine, batch or interruption.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs; the defaults are plain ancestral sampling (the distribution in the KL)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    max_new_tokens: int = 256


@dataclass
class Job:
    """One sample to draw: its id (also its seed index) and the token ids it is drawn after."""

    id: int
    prefix_ids: tuple[int, ...]


@dataclass
class Drawn:
    """A finished sample: ids (ending with EOS when `finished`), untempered log-probs per token."""

    id: int
    token_ids: list[int]
    token_logprobs: list[float]
    finished: bool
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit seed for sample `sample_id` of a run seeded with `seed` (stable across versions)."""
    digest = hashlib.sha256(f"cftune:{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
