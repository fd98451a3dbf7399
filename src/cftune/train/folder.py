"""A training run's output folder, the contract every method keeps (`cftune train`'s trainer and
TRL's SDFT alike) and `eval`, `merge` and the runner read: a `save_pretrained` model (a LoRA
adapter for `lora`, plus `merged/` on request) with its tokenizer and model card (README.md),
`train_config.json` (the resolved config), `training_log.jsonl` (one line per step) and
`manifest.json`, written last (its presence means finished). Here: whether OUT already holds the
run, resuming from its last complete checkpoint, saving, and the upload to the Hub.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from cftune import card
from cftune.config import to_dict
from cftune.errors import CftuneError
from cftune.io import (
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    read_json,
    truncate_to_last_newline,
)
from cftune.locking import is_main_process
from cftune.provenance import package_versions
from cftune.train import data
from cftune.train.config import CHECKPOINTS, CONFIG, LOG, LOGS, TrainConfig


def finished(out: Path, config: TrainConfig, inputs: dict[str, str]) -> bool:
    """True when OUT holds a finished run of the same settings; an error for a different one
    (unless `overwrite`, which always trains afresh)."""
    if config.overwrite:
        return False
    if not (out / MANIFEST).is_file():
        partial = (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir())
        if partial and not config.resume:
            raise CftuneError(f"{out}: an unfinished run is there; pass --resume to continue it "
                              f"or --overwrite to start again")
        return False
    manifest = read_json(out / MANIFEST)
    if manifest.get("setting") == config.setting() and manifest.get("inputs") == inputs:
        return True
    raise CftuneError(f"{out}: holds a finished run with other settings or inputs; choose "
                      f"another --out or pass --overwrite")


def inputs_of(config: TrainConfig) -> dict[str, str]:
    """Content hashes of what the run reads: the same settings on changed files is a new run."""
    from cftune.models import fingerprint

    keys = {"model": fingerprint(config.model)}
    for key in ("task", "cfs", "replay", "eval_task", "eval_cfs"):
        value = getattr(config, key)
        if value and not str(value).startswith("builtin:"):
            keys[key] = data.file_key(value)
    return keys


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint in `folder`, deleting half-saved ones (None: none).

    The Trainer writes a checkpoint's `trainer_state.json` after its weights, optimizer and RNG
    states, so one without a readable state was cut short by a kill (issue 15: kill -9 anywhere);
    resuming from it would fail or load a half-written optimizer. One at the last step is passed
    over (see `NoFinalCheckpoint`).
    """
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        step = path.name.removeprefix("checkpoint-")
        if not (path.is_dir() and step.isdigit()):
            continue
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)
            continue
        if not 0 < state.get("max_steps", 0) <= state.get("global_step", 0):
            found.append((int(step), path))
    return str(max(found)[1]) if found else None


def prepare(out: Path, config: TrainConfig) -> str | None:
    """Clear or keep OUT; return the checkpoint to resume from (None: start fresh)."""
    if config.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    last = last_checkpoint(out / CHECKPOINTS) if config.resume else None
    log = out / LOG
    if config.resume and last:
        step = read_json(Path(last) / "trainer_state.json")["global_step"]
        truncate_to_last_newline(log)  # a line torn by a kill
        lines = log.read_text().splitlines() if log.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        log.write_text("".join(ln + "\n" for ln in kept))  # drop steps the resumed run redoes
        print(f"cftune train: resuming from {last} (step {step})")
        return last
    if config.resume:
        print(f"cftune train: no checkpoint in {out / CHECKPOINTS}; starting from scratch")
    log.unlink(missing_ok=True)
    shutil.rmtree(out / LOGS, ignore_errors=True)  # a fresh run's tracker logs start empty too
    return None


def publish(out: Path, config: TrainConfig) -> Path:
    """Upload a finished run's folder to `push_to_hub` (from the main process only)."""
    if config.push_to_hub and is_main_process():
        card.push(out, config.push_to_hub, ignore=(f"{CHECKPOINTS}/**",))
    return out


def save(trainer, tokenizer, config: TrainConfig, out: Path, inputs: dict[str, str],
          counts: dict[str, data.Counts], facts: dict[str, Any], result, seconds: float) -> Path:
    """Model, tokenizer, resolved config, then the manifest (last: its presence means done)."""
    trainer.save_model(str(out))
    if trainer.args.should_save:  # Trainer pickles its arguments: a model folder holds
        # safetensors, JSON and the tokenizer only (issue 15), so they are kept as JSON instead
        (out / "training_args.bin").unlink(missing_ok=True)
        atomic_write_text(out / "training_args.json", trainer.args.to_json_string() + "\n")
    tokenizer.save_pretrained(str(out))
    model = trainer.model
    if hasattr(model, "merge_and_unload") and config.lora_merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(out / "merged"))
        tokenizer.save_pretrained(str(out / "merged"))
    atomic_write_json(out / CONFIG, {**to_dict(config), "inputs": inputs})
    log = [json.loads(ln) for ln in (out / LOG).read_text().splitlines() if ln.strip()] \
        if (out / LOG).exists() else []
    train_logs = [r for r in log if "loss" in r]
    manifest = {
        "stage": "train", "setting": config.setting(), "inputs": inputs,
        "counts": {k: dataclasses.asdict(v) for k, v in counts.items()},
        "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "final": train_logs[-1] if train_logs else None, **facts,
        "seconds": round(seconds, 2), "adapter": (out / "adapter_config.json").is_file(),
        "versions": package_versions(),
    }
    if trainer.args.should_save:  # the model card (README.md), before the manifest
        card.write(out, card.training_card(to_dict(config), manifest))
        if config.lora_merge and (out / "merged").is_dir():
            card.write(out / "merged", card.training_card(to_dict(config), manifest, merged=True))
    atomic_write_json(out / MANIFEST, manifest)
    if not config.keep_checkpoints:  # only an unfinished run needs them (--resume)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    print(f"cftune train: wrote {out} ({trainer.state.global_step} steps, {seconds:.0f} s)")
    return out
