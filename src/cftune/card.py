"""Model cards: the README.md of every model folder cftune writes, in the Hugging Face Hub's
format, and the upload of a finished folder to the hub.

A card is YAML front matter, the keys the Hub files a model by (`base_model`, `library_name`,
`tags`, `datasets`, `license`), and a Markdown body saying how the model was made: the method and
its settings, the CF pool it trained on (how the base drew it, how many samples), the task data's
fingerprint and size and, once `cftune run` has evaluated the model, its task gain and forgetting
with 95% intervals. `cftune train` and `cftune merge` write it just before their manifest; the
runner rewrites it with the evaluation (`cftune.experiment.results.write_cards`).

Everything is rendered from plain dicts (a run's resolved config, its manifest), so this module
imports no stage. The front matter is conservative: a key is written only where it is known for
sure: `base_model` for a hub id, an embedded alias or GGUF file (the model it quantises) or a
hub cache snapshot; `license` from that table, the GGUF file or the base's own card; `datasets`
only when the task file's name says which (`DATASETS`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cftune.errors import CftuneError
from cftune.io import MANIFEST, atomic_write_text, read_json

CARD = "README.md"
TRAIN_CONFIG = "train_config.json"  # cftune.train.config.CONFIG (this module sits below train)
# A word of the task file's name, or of its folder's, that names one hub dataset. A `builtin:`
# task is generated here and names none.
DATASETS = {"gsm8k": "openai/gsm8k"}
# One line per method (cftune.train.config.METHODS), for the body.
METHODS = {
    "full": "plain fine-tuning: the task NLL alone",
    "cfs": "the task NLL plus the NLL of context-free (CF) samples the base wrote from its BOS "
           "token alone (Eq. 1 of arXiv 2505.13811): since x ~ p_base, the CF term is "
           "KL(p_base ‖ p_θ) up to a constant, so it keeps the model close to the base on all text",
    "kd": "the task NLL plus the KL to the base's stored top-K next-token distributions on its "
          "CF samples",
    "lora": "the task NLL, on LoRA adapters",
    "l2": "the task NLL plus λ₂‖θ − θ₀‖², an L2 penalty toward the initial weights",
    "replay": "the task NLL plus the NLL of a generic text corpus (replay)",
    "contextual": "the task NLL plus the NLL of the base's own answers to the task prompts",
    "flow": "the task NLL, each example weighted by exp(−ℓ_base/τ) (FLOW)",
    "sdft": "on-policy self-distillation (TRL's SDFT trainer)",
}
STREAM = {"cfs": "CF pool", "kd": "CF pool", "contextual": "contextual answers",
          "replay": "replay corpus"}
Section = tuple[str, Sequence[dict[str, Any]]]  # (title, rows of yardstick, value, ci95, n)


# --------------------------------------------------------------------------- front matter
def base_model(spec: str) -> tuple[str | None, str | None]:
    """(hub id, license) of a base model spec, each None where it is not known for sure."""
    from cftune.models import EMBEDDED

    entry = EMBEDDED.get(spec) or next(
        (e for e in EMBEDDED.values() if Path(spec).name == e.filename), None)
    if entry is not None:
        return entry.hub_id, entry.license
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return _gguf_origin(path)
    if path.is_dir():
        return _snapshot_id(path), _card_license(path / CARD)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):  # a hub id
        return spec, _cached_license(spec)
    return None, None


def _snapshot_id(folder: Path) -> str | None:
    """The hub id of a hub cache snapshot (`…/models--ORG--NAME/snapshots/REV`); the hub forbids
    `--` in names, so the first one separates organisation and name."""
    parts = folder.absolute().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def front_matter_of(path: Path) -> dict[str, Any]:
    """The YAML front matter of a card ({} when there is none or it does not parse)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def _card_license(path: Path) -> str | None:
    value = front_matter_of(path).get("license")
    return str(value) if value else None


def _cached_license(hub_id: str) -> str | None:
    """The license on a hub model's card, when the hub cache holds the card (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(hub_id, CARD)
    except (ValueError, OSError):  # not a valid repo id
        return None
    return _card_license(Path(path)) if isinstance(path, str) else None


def _gguf_origin(path: Path) -> tuple[str | None, str | None]:
    """(hub id, license) from a GGUF file's metadata (`general.repo_url`, `general.license`)."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        text = {k: str(fields[k].contents()) for k in ("general.repo_url", "general.license")
                if k in fields}
    except Exception:  # noqa: BLE001 (gguf raises several kinds): an unreadable file tells nothing
        return None, None
    url = text.get("general.repo_url", "").removeprefix("https://huggingface.co/")
    hub = url if url.count("/") == 1 and "://" not in url else None
    return hub, text.get("general.license")


def datasets_of(task: str | None) -> list[str]:
    """Hub datasets a task file's name (or its folder's) names, e.g. `gsm8k/train.jsonl`."""
    if not task or task.startswith("builtin:"):
        return []
    path = Path(task)
    words = set(re.split(r"[^a-z0-9]+", f"{path.parent.name} {path.stem}".lower()))
    return sorted({DATASETS[w] for w in words if w in DATASETS})


def front_matter(base: str, library: str, tags: Sequence[str], task: str | None) -> str:
    from huggingface_hub import ModelCardData

    hub, license_ = base_model(base)
    data = ModelCardData(base_model=hub, library_name=library, license=license_,
                         tags=list(dict.fromkeys(tags)), datasets=datasets_of(task) or None)
    return f"---\n{data.to_yaml()}\n---\n"


# ---------------------------------------------------------------------------------- body
def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else f"{v}"


def _method(method: str) -> str:
    return METHODS.get(method, f"method `{method}`")


def _settings(config: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """The method's settings and the schedule, as table rows."""
    method = config.get("method")
    keys = ["method"]
    if "cf" in (facts.get("counts") or {}):  # a second data stream
        keys += ["cfs_mode", "cfs_ratio"] + (["cfs_lambda"] if config.get("cfs_mode") == "weighted"
                                             else [])
    if config.get("lora") or method == "lora":
        keys += ["lora_rank", "lora_alpha", "lora_dropout", "lora_targets"]
    if (config.get("l2_lambda") or 0) > 0:
        keys.append("l2_lambda")
    if method == "flow":
        keys.append("flow_temperature")
    if method == "sdft":
        keys += sorted(k for k in config if k.startswith("sdft_"))
    keys += ["max_steps" if config.get("max_steps") else "epochs", "batch_size", "grad_accum",
             "learning_rate", "lr_schedule", "warmup", "weight_decay", "max_grad_norm",
             "max_length", "prompt_format", "seed"]
    rows = [f"| `{k}` | {_value(config[k])} |" for k in keys if k in config]
    dtype = (facts.get("precision") or {}).get("dtype", config.get("dtype"))
    if dtype:
        rows.append(f"| precision | {dtype} |")
    return ["| setting | value |", "|---|---|", *rows]


def _counts(c: dict[str, Any]) -> str:
    return (f"{c.get('rows', 0):,} rows → {c.get('kept', 0):,} examples ({c.get('truncated', 0)} "
            f"truncated, {c.get('dropped', 0)} dropped), {c.get('target_tokens', 0):,} target "
            f"tokens")


def _pool(pool: dict[str, Any]) -> str:
    """How the base drew its CF pool (the pool's own manifest, as the train manifest keeps it)."""
    s = pool.get("sampling") or {}
    filtered = (f"filtered (dedup {pool.get('dedup')}, min_tokens {pool.get('min_tokens')}): a "
                "biased CF term" if pool.get("filtered") else "unfiltered")
    capped = f", {pool['capped']:.0%} cut at the length cap" if pool.get("capped") is not None \
        else ""
    return (f"{pool.get('samples', 0):,} samples of the base, each from the prefix ids "
            f"{pool.get('prefix_ids')} alone, at temperature {s.get('temperature')}, top-p "
            f"{s.get('top_p')}, top-k {s.get('top_k')}, min-p {s.get('min_p')}, up to "
            f"{s.get('max_new_tokens')} new tokens, pool seed {s.get('seed')}; {filtered}{capped}")


def _data(config: dict[str, Any], facts: dict[str, Any], task: str | None) -> list[str]:
    inputs, counts = facts.get("inputs") or {}, facts.get("counts") or {}
    fp = inputs.get("model")
    lines = [f"- Base model: `{config.get('model')}`" + (f" (weights `{fp}`)" if fp else "")]
    source = f" (rows of `{task}`)" if task and task != config.get("task") else ""
    key = inputs.get("task")
    task_line = f"- Task data: `{config.get('task')}`{source}, " + (
        f"content hash `{key}`" if key else f"generated with seed {config.get('seed')}")
    if "task" in counts:
        task_line += f": {_counts(counts['task'])}"
    lines.append(task_line)
    method = config.get("method")
    if "cf" in counts:
        what = STREAM.get(method, "second stream")
        path = config.get("replay") if method == "replay" else config.get("cfs")
        key = inputs.get("replay" if method == "replay" else "cfs")
        line = f"- {what[0].upper()}{what[1:]}: `{path}`" + (f", content hash `{key}`" if key else "")
        if facts.get("cf_pool"):
            line += f": {_pool(facts['cf_pool'])}"
        c = counts["cf"]  # the run draws the pool's first `kept` (cftune.train.streams)
        lines.append(f"{line}. This run trained on the first {c.get('kept', 0):,} of its "
                     f"{c.get('rows', 0):,} rows ({c.get('target_tokens', 0):,} target tokens, "
                     f"{c.get('truncated', 0)} truncated, {c.get('dropped', 0)} dropped).")
    return lines


def _result(facts: dict[str, Any]) -> list[str]:
    final = facts.get("final") or {}
    terms = ", ".join(f"{k} {final[k]:.4g}" for k in ("loss", "task_loss", "cf_loss")
                      if isinstance(final.get(k), (int, float)))
    seconds = facts.get("seconds")
    took = f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    return [f"{facts.get('steps')} optimizer steps{took}" + (f"; the last logged step: {terms}"
                                                              if terms else "") + "."]


def _training_sections(config: dict[str, Any], facts: dict[str, Any], task: str | None,
                       level: str) -> list[str]:
    # the manifest's `setting`: what makes the model (no output, resume or tracker options)
    every = json.dumps(facts.get("setting") or {k: v for k, v in config.items() if k != "inputs"},
                       indent=2, sort_keys=True)
    return [f"{level} Training", "", *_settings(config, facts), "",
            f"<details><summary>every setting ({MANIFEST})</summary>", "", "```json", every,
            "```", "", "</details>", "", f"{level} Data", "", *_data(config, facts, task), "",
            f"{level} Training run", "", *_result(facts)]


def _evaluation(sections: Sequence[Section]) -> list[str]:
    if not sections:
        return []
    lines = ["## Evaluation", "", "Measured by `cftune run` on held-out items, with 95% intervals; "
             "a Δ or a rise is paired: the two models' difference on the same items."]
    for title, rows in sections:
        lines += ["", f"### {title}", "", "| yardstick | value | 95% interval | n |",
                  "|---|---|---|---|"]
        for r in rows:
            ci = r.get("ci95")
            interval = f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "–"
            lines.append(f"| {r['yardstick']} | {_value(float(r['value']))} | {interval} | "
                         f"{r.get('n') if r.get('n') is not None else '–'} |")
    return lines


def _files(adapter: bool) -> list[str]:
    weights = "A LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`; loads onto " \
        "the base with peft)" if adapter else "The weights (`save_pretrained`)"
    return ["## Files", "", f"{weights} and the tokenizer; `{MANIFEST}` (every setting, the "
            "inputs' content hashes, counts, versions; written last), `train_config.json`, "
            "`training_log.jsonl` (per step: loss, task_loss, cf_loss, learning rate)."]


def training_card(config: dict[str, Any], facts: dict[str, Any], *, name: str | None = None,
                  task: str | None = None, evaluation: Sequence[Section] = (),
                  merged: bool = False) -> str:
    """The card of a `cftune train` folder: `config` its resolved settings, `facts` its manifest;
    `task` the task's original file where the run read a copy (the runner's), `merged` for the
    LoRA run's `merged/` folder."""
    method = str(config.get("method"))
    lora = bool(config.get("lora")) or method == "lora"
    adapter = bool(facts.get("adapter")) and not merged
    tags = ["cftune", method, *(["lora"] if lora else [])]
    name = name or config.get("run_name") or Path(str(config.get("out"))).name
    hub = base_model(str(config.get("model")))[0]
    named = f" (`{hub}` on the hub)" if hub and hub != config.get("model") else ""
    intro = (f"Fine-tuned from `{config.get('model')}`{named} with cftune's `{method}`: "
             f"{_method(method)}.")
    if merged:
        intro += " This folder holds the run's LoRA adapter merged into the base weights."
    body = [f"# {name}", "", intro, "", *_training_sections(config, facts, task, "##"), "",
            *_evaluation(evaluation), *([""] if evaluation else []), *_files(adapter)]
    return front_matter(str(config.get("model")), "peft" if adapter else "transformers", tags,
                        task or config.get("task")) + "\n" + "\n".join(body) + "\n"


def merge_card(facts: dict[str, Any], *, name: str, task: str | None = None,
               evaluation: Sequence[Section] = ()) -> str:
    """The card of a `cftune merge` folder (Wise-FT): `facts` its manifest (setting, base)."""
    setting, base = facts.get("setting") or {}, str(facts.get("base"))
    config, parent = read_run(Path(str(setting.get("finetuned"))))
    # A base found from the run (not given) is the model it trained from, named as it named it
    # (a LoRA adapter records the base's local copy instead, which maps to no hub id).
    spec = (config or {}).get("model", base) if setting.get("base") is None else base
    method = (config or {}).get("method")
    tags = ["cftune", "wise-ft", "merge", *([method] if method else [])]
    how = f", trained with cftune's `{method}`" if method else ""
    body = [f"# {name}", "", f"A Wise-FT merge (Wortsman et al. 2022) of the base `{base}` and "
            f"the fine-tuned model `{setting.get('finetuned')}`{how}: θ = (1 − a)·θ_base + "
            f"a·θ_ft at a = {setting.get('alpha')} (a = 0 is the base, a = 1 the fine-tuned "
            "model), a trade of task gain for less forgetting, without training.", ""]
    if config and parent:
        line = _method(str(method))
        body += ["## The fine-tuned model", "", f"{line[0].upper()}{line[1:]}.", "",
                 *_training_sections(config, parent, task, "###"), ""]
    body += [*_evaluation(evaluation), *([""] if evaluation else []), "## Files", "",
             f"The merged weights and the tokenizer; `{MANIFEST}` (the merge's settings)."]
    return front_matter(spec, "transformers", tags, task or (config or {}).get("task")) + "\n" \
        + "\n".join(body) + "\n"


# ------------------------------------------------------------------------------ folders
def read_run(folder: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(resolved config, manifest) of a finished `cftune train` folder; (None, None) otherwise."""
    if not ((folder / TRAIN_CONFIG).is_file() and (folder / MANIFEST).is_file()):
        return None, None
    facts = read_json(folder / MANIFEST)
    return (read_json(folder / TRAIN_CONFIG), facts) if facts.get("stage") == "train" \
        else (None, None)


def write(folder: Path, text: str) -> None:
    atomic_write_text(Path(folder) / CARD, text)


def refresh(folder: Path, *, name: str | None = None, task: str | None = None,
            evaluation: Sequence[Section] = ()) -> bool:
    """Rewrite the card of a finished train or merge folder that holds its weights (with an
    evaluation, from the runner); False where there is no such folder (a record kept without
    its weights keeps the card it has)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not any(folder.glob("*.safetensors")):
        return False
    facts = read_json(folder / MANIFEST)
    if facts.get("stage") == "merge":
        text = merge_card(facts, name=name or folder.name, task=task, evaluation=evaluation)
    else:
        config, facts = read_run(folder)
        if config is None:
            return False
        text = training_card(config, facts, name=name, task=task, evaluation=evaluation)
    write(folder, text)
    return True


def push(folder: Path, repo: str, ignore: Sequence[str] = ()) -> str:
    """Upload a finished folder to the hub model repo `repo` (made if missing), leaving out the
    `ignore` patterns and hidden files; return the repo's URL. Untested against the hub itself
    (the tests record the calls)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                          ignore_patterns=[*ignore, ".*", "**/.*"],
                          commit_message=f"cftune: upload {Path(folder).name}")
    except Exception as e:  # noqa: BLE001 (network, token, permissions: huggingface_hub and
        # httpx raise several kinds, not all OSError); the user gets one line
        detail = (str(e).strip().splitlines() or [""])[0]
        raise CftuneError(f"upload of {folder} to the hub repo {repo} failed ({type(e).__name__}"
                          f"{': ' + detail if detail else ''}); the folder is finished: rerun "
                          "the same command to retry (token: `hf auth login` or HF_TOKEN)") from None
    print(f"cftune: uploaded {folder} to {url}")
    return str(url)
