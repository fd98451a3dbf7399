"""Stage 3, `cftune eval`: how far a model drifted from its base (KL, zero-shot benchmarks) and what it
gained (task accuracy), with error bars. See docs/eval.md.

The Python API the CLI and the experiment runner share:
- `evaluate_model(model, Measure(...), base_fingerprint) -> dict`: every metric of one model
  under the report's names, with per-item outcomes (the one function both call);
- `cftune.evaluate.stage.evaluate(EvalConfig(...)) -> dict`: the whole comparison (`cftune
  eval`), writes eval.json / eval.md;
- `kl_to_base(model, samples_folder, batch_size, dtype, force) -> dict`;
- `run_benchmark(model, tokenizer, name_or_path, limit, batch_size, dtype) -> dict`;
- `task_accuracy(model, tokenizer, task_file, limit, ...) -> dict`;
- `answer_nll(model, tokenizer, task_file, limit, ...) -> dict` (reference solutions' NLL);
- `perplexity(model, tokenizer, text_file, ...) -> dict`.
"""

from cftune.evaluate.benchmarks import REGISTRY, Benchmark
from cftune.evaluate.kl import kl_to_base
from cftune.evaluate.measure import Measure
from cftune.evaluate.model import evaluate_model
from cftune.evaluate.multiple_choice import run_benchmark
from cftune.evaluate.perplexity import perplexity
from cftune.evaluate.task_accuracy import answer_nll, extract_answer, task_accuracy

__all__ = ["REGISTRY", "Benchmark", "Measure", "answer_nll", "evaluate_model", "extract_answer",
           "kl_to_base", "perplexity", "run_benchmark", "task_accuracy"]
