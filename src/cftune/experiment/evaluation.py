"""The runner's yardsticks as a `Measure`: what its evaluation stages score with
`cftune.evaluate.model.evaluate_model`, the function `cftune eval` calls too."""

from __future__ import annotations

from pathlib import Path

from cftune.evaluate.measure import Measure
from cftune.experiment.config import Experiment


def measure(exp: Experiment, heldout: Path, test_file: Path,
            instructions: Path | None = None) -> Measure:
    """The experiment's yardsticks: the task's test split (answer NLL, and greedy accuracy when
    `eval.task_acc`), KL on the held-out CF samples, the benchmarks, and the instruction
    yardsticks on the base's drawn responses. The runner's stage folder is its cache, so the
    per-metric cache is off."""
    e = exp.eval
    return Measure(kl_samples=heldout, kl_limit=exp.cf_heldout, bench=tuple(e.bench),
                   bench_limit=e.limit, bench_offset=e.offset, data_dir=e.data_dir,
                   task=test_file, task_limit=e.task_limit, task_acc=e.task_acc,
                   prompt=exp.task.prompt_spec, max_new_tokens=e.max_new_tokens,
                   instructions=instructions, doc_start=exp.task.doc_start,
                   batch_size=e.batch_size, score_dtype=e.score_dtype,
                   decode_dtype=e.decode_dtype, decode_engine=e.decode_engine)
