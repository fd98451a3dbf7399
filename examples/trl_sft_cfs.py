"""A TRL SFT script that forgets less: `SFTTrainer` → `CFSFTTrainer` plus two arguments.

Fine-tunes the embedded default (SmolLM2-135M-Instruct) on cftune's builtin arithmetic word
problems with TRL, with the context-free synthetic term of cftune (arXiv 2505.13811): the base
model's own samples, drawn first with `cftune generate` (here from Python), are mixed into every
batch. Run from the repository root:

    .venv/bin/python examples/trl_sft_cfs.py --max-steps 50 --out out/trl_sft_cfs

then compare the base and the result with
`cftune eval --base smollm2-135m-instruct --model out/trl_sft_cfs/model --kl-samples ...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig

from cftune import precision
from cftune.generate.config import GenerateConfig
from cftune.generate.stage import generate
from cftune.integrations.trl import FORMS, CFSFTTrainer
from cftune.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_device
from cftune.tasks import resolve_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model (alias, folder, GGUF)")
    parser.add_argument("--out", default="out/trl_sft_cfs", help="output folder")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=512, help="CF samples to draw")
    parser.add_argument("--form", choices=FORMS, default="kd", help="the CF term's form")
    args = parser.parse_args()
    out = Path(args.out)

    # 1. Context-free samples of the base, with its top-20 log-probs (the `kd` form reads them).
    #    Resumes, and is skipped when the folder already holds them.
    cf = generate(GenerateConfig(model=args.model, out=str(out / "cf"),
                                 num_samples=args.num_samples, max_new_tokens=64,
                                 topk_logprobs=20))

    # 2. The task in TRL's conversational prompt-completion form.
    rows = resolve_task("builtin:arithmetic", "train", 200)
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["question"]}],
         "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])

    # 3. A TRL SFT run, with the CF term: the only changes are the class and `cf_*` arguments.
    #    On a CPU, bf16 autocast only where it measured faster than fp32 (cftune.precision).
    device = resolve_device("auto")
    half = precision.resolve("auto", device)[0] != "fp32"
    trainer = CFSFTTrainer(
        model=load_model(args.model, dtype="fp32"), processing_class=load_tokenizer(args.model),
        train_dataset=dataset,
        args=SFTConfig(output_dir=str(out / "checkpoints"), max_steps=args.max_steps,
                       per_device_train_batch_size=8, learning_rate=5e-4, warmup_steps=2,
                       lr_scheduler_type="cosine", max_length=384, logging_steps=1,
                       save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
                       bf16=half),
        cf_samples=cf, cf_form=args.form)
    trainer.train()
    trainer.save_model(str(out / "model"))
    trainer.state.save_to_json(str(out / "model" / "trainer_state.json"))
    print(f"wrote {out / 'model'}")


if __name__ == "__main__":
    main()
