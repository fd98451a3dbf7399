"""`cftune merge`: Wise-FT, θ = (1 − a)·θ_base + a·θ_ft (Wortsman et al. 2022, Eq. 1).

Post-hoc interpolation in weight space between a base model and its fine-tuned version: a = 0
is the base, a = 1 the fine-tuned model, values between trade task gain for forgetting without
any training. A LoRA adapter folder as `finetuned` is merged into its base first (θ_ft = θ_base +
ΔW), so interpolating equals scaling the adapter's update by a. The output is a plain
`save_pretrained` folder with the fine-tuned model's tokenizer, a model card (`cftune.card`) and
a manifest written last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cftune import card
from cftune.config import field, to_dict
from cftune.errors import CftuneError
from cftune.io import MANIFEST, atomic_write_json
from cftune.locking import output_locked
from cftune.models import load_model, load_tokenizer, local_path, resolve


@dataclass
class MergeConfig:
    """Settings of `cftune merge` (every field is also a `--flag` and a YAML key)."""

    finetuned: str = field("", help="fine-tuned model folder (full weights or a LoRA adapter)")
    out: str = field("runs/merged", help="output folder")
    base: str | None = field(None, help="base model (default: the adapter's base, or the "
                                        "`model` in the fine-tuned folder's train_config.json)")
    alpha: float = field(0.5, help="a in θ = (1−a)·θ_base + a·θ_ft; 0 = base, 1 = fine-tuned")

    def __post_init__(self) -> None:
        problems = []
        if not self.finetuned:
            problems.append("`finetuned` is required (a fine-tuned model folder)")
        elif not Path(self.finetuned).exists():
            problems.append(f"`finetuned`: {self.finetuned} not found")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"`alpha` = {self.alpha} must be within [0, 1]")
        if problems:
            raise CftuneError("; ".join(problems))


def base_of(finetuned: str | Path) -> str:
    """The base model a fine-tuned folder came from: the adapter's base, else `train_config.json`."""
    folder = Path(finetuned)
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("train_config.json", "model")):
        if (folder / name).is_file():
            value = json.loads((folder / name).read_text()).get(key)
            if value:
                return value
    raise CftuneError(f"{folder}: cannot tell its base model; pass --base")


@torch.no_grad()
def interpolate(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 − a)·base + a·finetuned for every floating tensor; written so a = 0 and a = 1 give the
    two inputs bit for bit (`torch.lerp` would round at a = 1)."""
    if base.keys() != finetuned.keys():
        diff = sorted(set(base) ^ set(finetuned))[:3]
        raise CftuneError(f"base and fine-tuned models differ in tensors ({', '.join(diff)}...): "
                          f"not the same architecture")
    out = {}
    for name, b in base.items():
        f = finetuned[name]
        if b.shape != f.shape:
            raise CftuneError(f"tensor {name}: base {tuple(b.shape)} vs fine-tuned {tuple(f.shape)}")
        if not b.is_floating_point() or alpha == 1.0:
            out[name] = f.clone()
        elif alpha == 0.0:
            out[name] = b.clone()
        else:
            out[name] = ((1.0 - alpha) * b.float() + alpha * f.float()).to(f.dtype)
    return out


@output_locked
def merge(config: MergeConfig) -> Path:
    """Write the Wise-FT interpolation of `config.base` and `config.finetuned`; return `out`."""
    out = Path(config.out)
    base_spec = config.base or base_of(config.finetuned)
    resolve(base_spec)  # a wrong base fails before any model is loaded
    finetuned = load_model(config.finetuned, device="cpu", dtype="fp32")  # adapters merged here
    base = load_model(base_spec, device="cpu", dtype="fp32")
    # `state_dict` keeps tied weights under both names, so each name is interpolated (equally).
    merged = interpolate(base.state_dict(), finetuned.state_dict(), config.alpha)
    finetuned.load_state_dict(merged)
    tok_source = config.finetuned if (Path(config.finetuned) / "tokenizer_config.json").is_file() \
        else local_path(base_spec)
    tokenizer = load_tokenizer(tok_source)
    # Written beside OUT and renamed into place: OUT never holds half a model (issue 15).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
        finetuned.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        manifest = {"stage": "merge", "setting": to_dict(config), "base": str(base_spec)}
        card.write(tmp, card.merge_card(manifest, name=out.name))  # before the manifest
        atomic_write_json(tmp / MANIFEST, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"cftune merge: wrote {out} (alpha {config.alpha})")
    return out
