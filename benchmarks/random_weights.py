"""Write a model folder with random weights of a given architecture, to measure speed and memory
where the real weights are not at hand (a GPU machine without network access, a model too large
to copy there).

Step time and peak memory depend on the shapes, not the values, so an architecture file
(`benchmarks/arch/*.json`, a `config.json`) is enough. What does depend on the values is how long
samples run: random weights almost never emit EOS, so every sample runs to the length cap, as
~90% of SmolLM2's context-free samples do anyway. The tokenizer may come from another model (its
ids must fit the vocabulary); the model's special-token ids are set from it.

    .venv/bin/python benchmarks/random_weights.py benchmarks/arch/gemma3-270m.json \\
        --tokenizer path/to/tokenizer --out /tmp/gemma3-270m-random
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def random_model(arch: Path, tokenizer_dir: str, out: Path, seed: int = 0) -> Path:
    """Save `arch` with random (initializer_range) weights and `tokenizer_dir`'s tokenizer to
    `out`, as a `save_pretrained` folder any cftune stage loads."""
    spec = json.loads(arch.read_text())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > spec["vocab_size"]:
        raise SystemExit(f"{arch}: vocab_size {spec['vocab_size']} is smaller than the "
                         f"tokenizer's {len(tokenizer)} tokens; pick a tokenizer that fits")
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            spec[f"{name}_token_id"] = token_id
    config = AutoConfig.for_model(**spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.do_sample = True  # sampling settings are cftune's, not the model's
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {config.model_type}, {params / 1e6:.1f} M parameters (random)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", type=Path, help="architecture JSON (a config.json)")
    ap.add_argument("--tokenizer", required=True, help="folder holding a tokenizer")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    random_model(a.arch, a.tokenizer, a.out, a.seed)


if __name__ == "__main__":
    main()
