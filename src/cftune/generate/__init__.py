"""Stage 1, `cftune generate`: context-free samples x ~ p_base with the base's log-probs.

`config` (settings), `prefix` (what a sample starts from), `sampler` (torch continuous batching),
`vllm_engine` (the same on vLLM), `samples` (the file format train and eval read), `stage` (the
resumable job). The public API:
"""

from cftune.generate.config import GenerateConfig
from cftune.generate.stage import generate, generate_dataset

__all__ = ["GenerateConfig", "generate", "generate_dataset"]
