"""Batches of one optimizer step: task and CF examples in a fixed proportion (`MixedBatchSampler`),
indexed as one list (`ExampleDataset`) and padded into tensors (`Collator`).

Every batch holds `batch_size` task examples plus `cfs_ratio` × as many CF examples on top, so runs
with and without a second stream see the same task data per step; lengths are grouped so
padding costs little.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


# ---------------------------------------------------------------------------------- batching
def cf_per_epoch(ratio: float, n_task: int) -> int:
    """CF examples one epoch of `MixedBatchSampler` hands out: `ratio` per task example, the
    batches' running count kept at floor(task examples so far × ratio). The one count behind
    both the sampler and `cftune.train.config.cf_draws` (how large a pool a run draws)."""
    return round(ratio * n_task)


class MixedBatchSampler:
    """Batches of task and CF example indices in a fixed proportion, grouped by length.

    Indices `[0, n_task)` are task examples and `[n_task, n_task + n_cf)` CF examples. Every batch
    holds `batch_size` task examples (the last one of an epoch may hold fewer) plus about
    `ratio × batch_size` CF examples, so runs with and without a second stream see the same task
    examples per step (issue 9, item 4). Batch `j` carries the CF examples that bring the epoch's
    running CF count to `floor(task examples so far × ratio)`, so a fractional ratio is met to
    within one example per batch. Each epoch shows every task example once (shuffled) and
    `round(ratio · n_task)` CF examples, taken in order from a fixed shuffle of the CF pool and
    continuing across epochs, so no CF sample is reused before the pool is exhausted.
    Inside a window of `group` batches, task and CF examples are each sorted by length and handed
    back in that order (each batch keeps its counts), then the window's batches are shuffled:
    similar lengths pad little, and the proportion survives.
    """

    def __init__(self, lengths: Sequence[int], n_task: int, batch_size: int, ratio: float = 0.0,
                 seed: int = 0, group: int = 16, shuffle: bool = True):
        assert batch_size >= 1 and ratio >= 0 and 0 < n_task <= len(lengths)
        self.lengths = list(lengths)
        self.n_task, self.n_cf = n_task, len(lengths) - n_task
        # Not called `batch_size`: accelerate's BatchSamplerShard reads that attribute as the
        # length of every full batch, which a task + CF batch is not (it would stall DDP ranks).
        self.task_batch, self.seed, self.group, self.shuffle = batch_size, seed, group, shuffle
        self.cf_per_epoch = cf_per_epoch(ratio, n_task) if self.n_cf else 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n_task / self.task_batch)

    def task_sizes(self) -> list[int]:
        """Task examples in each batch of an epoch."""
        return [min(self.task_batch, self.n_task - j * self.task_batch) for j in range(len(self))]

    def composition(self) -> list[int]:
        """Number of CF examples in each batch of an epoch (the same every epoch)."""
        def cf_upto(t: int) -> int:
            return (t * self.cf_per_epoch) // self.n_task

        return [cf_upto(min(self.n_task, (j + 1) * self.task_batch)) - cf_upto(j * self.task_batch)
                for j in range(len(self))]

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        task = list(range(self.n_task))
        if self.shuffle:
            rng.shuffle(task)
        pool = list(range(self.n_task, self.n_task + self.n_cf))
        random.Random(f"{self.seed}:cf").shuffle(pool)
        start = self.epoch * self.cf_per_epoch
        cf = [pool[(start + k) % self.n_cf] for k in range(self.cf_per_epoch)] if self.n_cf else []
        plan, sizes = self.composition(), self.task_sizes()
        t_pos = c_pos = 0
        for w in range(0, len(plan), self.group):
            window = range(w, min(w + self.group, len(plan)))
            n_c = sum(plan[j] for j in window)
            n_t = sum(sizes[j] for j in window)
            t_items = sorted(task[t_pos:t_pos + n_t], key=self.lengths.__getitem__)
            c_items = sorted(cf[c_pos:c_pos + n_c], key=self.lengths.__getitem__)
            t_pos, c_pos = t_pos + n_t, c_pos + n_c
            batches, ti, ci = [], 0, 0
            for j in window:
                k_c, k_t = plan[j], sizes[j]
                batches.append(t_items[ti:ti + k_t] + c_items[ci:ci + k_c])
                ti, ci = ti + k_t, ci + k_c
            if self.shuffle:
                rng.shuffle(batches)
            yield from batches


class CFDraws:
    """CF example indices for batches another loader builds (TRL's, `cftune.integrations.trl`):
    `ratio` per task example, the running count kept at floor(task examples so far × ratio) as in
    `MixedBatchSampler`, taken in order from the same fixed shuffle of the pool. Process `rank` of
    `world` takes every `world`-th position, so processes never draw the same sample; the pool
    wraps around when exhausted (`wrapped` says so: the samples are then reused)."""

    def __init__(self, n_cf: int, ratio: float, seed: int = 0, rank: int = 0, world: int = 1):
        assert n_cf > 0 and ratio >= 0 and 0 <= rank < world
        self.order = list(range(n_cf))
        random.Random(f"{seed}:cf").shuffle(self.order)
        self.ratio, self.rank, self.world = ratio, rank, world
        self.task_seen = 0  # task examples so far: the state a checkpoint keeps
        self.wrapped = False

    def take(self, n_task: int) -> list[int]:
        """The CF indices to add to a batch of `n_task` task examples."""
        start = math.floor(self.task_seen * self.ratio)
        self.task_seen += n_task
        stop = math.floor(self.task_seen * self.ratio)
        positions = [k * self.world + self.rank for k in range(start, stop)]
        self.wrapped |= bool(positions) and positions[-1] >= len(self.order)
        return [self.order[p % len(self.order)] for p in positions]


class ExampleDataset(torch.utils.data.Dataset):
    """Task examples followed by CF examples, indexable as one list (what the sampler indexes)."""

    def __init__(self, task: list[dict], cf: list[dict] | None = None):
        self.examples = list(task) + list(cf or [])
        self.n_task = len(task)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


@dataclass
class Collator:
    """Pads a list of examples to the longest (right padding) into model-ready tensors.

    Rows are put in source order (task first), so an objective can take the task rows as a view.
    Output: `input_ids`, `attention_mask`, `labels` [B, T]; `source`, `weight` [B]; with KD,
    `topk_ids` / `topk_logprobs` [B, T, K] aligned with `labels` (zero where there is no target).
    """

    pad_id: int
    kd: bool = False

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        examples = sorted(examples, key=lambda e: e["source"])
        width = max(len(e["input_ids"]) for e in examples)
        batch_size = len(examples)
        input_ids = torch.full((batch_size, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            attention[i, :n] = 1
            labels[i, :n] = torch.tensor(e["labels"])
        batch = {
            "input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "source": torch.tensor([e["source"] for e in examples]),
            "weight": torch.tensor([float(e.get("weight", 1.0)) for e in examples]),
        }
        if self.kd:
            batch.update(self._topk(examples, width))
        return batch

    @staticmethod
    def _topk(examples: list[dict], width: int) -> dict[str, torch.Tensor]:
        k = next((len(e["topk_ids"][0]) for e in examples if e.get("topk_ids")), 1)
        ids = torch.zeros((len(examples), width, k), dtype=torch.long)
        logps = torch.zeros((len(examples), width, k), dtype=torch.float32)
        for i, e in enumerate(examples):
            if not e.get("topk_ids"):
                continue
            n, end = len(e["topk_ids"]), len(e["input_ids"])
            ids[i, end - n:end] = torch.tensor(e["topk_ids"])
            logps[i, end - n:end] = torch.tensor(e["topk_logprobs"], dtype=torch.float32)
        return {"topk_ids": ids, "topk_logprobs": logps}
