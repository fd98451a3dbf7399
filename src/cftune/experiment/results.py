"""The runner's results: one row per evaluated model (its metrics, paired metrics against the base,
its training facts), one row per run group averaging its seeds, and the paired comparisons
`eval.compare` asks for. The rows are what `cftune.results.report` renders; `write_cards` puts
each model's yardsticks on its model card (`cftune.card`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

from cftune import card
from cftune.errors import CftuneError
from cftune.experiment.config import CF_METHODS, WISE_FT, Experiment, Run
from cftune.io import read_json
from cftune.results.metrics import (
    BENCH_PAIRED,
    INSTR_KL,
    INSTR_NLL_PAIRED,
    KL,
    RATIOS,
    TASK,
    TASK_NLL,
)
from cftune.results.metrics import metric as _metric  # `metric` names a loop variable below

# What a model's card shows against the base (`write_cards`): metric, what it measures.
CARD_YARDSTICKS = (
    (TASK, "task accuracy (greedy exact match)"),
    ("paired/task_acc", "Δ task accuracy"),
    (TASK_NLL, "task: NLL of the reference solutions, nats/token"),
    ("paired/task_nll", "Δ task NLL"),
    (KL, "forgetting: KL(base‖model) on held-out CF samples, nats/sample"),
    ("kl_per_token", "forgetting: the same, nats/token"),
    (INSTR_KL, "forgetting: KL(base‖model) on instruction responses, nats/response"),
    (INSTR_NLL_PAIRED, "forgetting: rise of the instruction references' NLL, nats/token"),
    (BENCH_PAIRED, "forgetting: mean Δ benchmark accuracy"),
)
# Against another run (`eval.compare`): a quantity as a fraction of that run's, seed by seed.
CARD_RATIOS = dict(zip(RATIOS, ("task gain", "CF KL", "instruction KL",
                                "instruction reference-NLL rise")))


class Plan(Protocol):
    """What the results read of a runner's plan (`cftune.experiment.plan.Runner`): the runs, the
    models they made, and each model's evaluation stage."""

    exp: Experiment
    runs: list[Run]
    models: dict[str, Path | str]
    out: Path

    def eval_stage(self, name: str) -> Any: ...


def _same_samples(rows: list[dict[str, Any]], out: Path) -> None:
    """Every model's KL on one held-out CF set, or the report refuses: its items are samples,
    and a KL on other samples pairs with nothing. The instruction KL's items are prompts, the
    same in every draw of the base's responses, so models scored on other draws (responses
    drawn again on another CPU: seeded sampling is not bitwise portable) still pair prompt by
    prompt, each per-prompt estimate unbiased, with the draws' noise added: said, not refused.
    The responses are now kept with an experiment (`evaluate.responses`), so this is rare."""
    for metric in ("kl", "instr_kl"):
        sets: dict[str, list[str]] = {}
        unknown = []  # scored before the digest was recorded: on which set, nothing says
        for r in rows:
            if metric not in r["metrics"]:
                continue
            digest = r["metrics"][metric].get("samples_digest")
            if digest is None:
                if r["run"] != "base":  # the base's KL is 0 on any set
                    unknown.append(r["run"])
            else:
                sets.setdefault(digest, []).append(r["run"])
        groups = "; ".join(", ".join(runs) for runs in sets.values())
        if metric == "kl" and len(sets) > 1:
            raise CftuneError(f"{out}: kl was scored on {len(sets)} different sets of the "
                              f"held-out CF samples ({groups}); delete the evals/ folders of one "
                              "group to re-score them on the current set")
        if metric == "instr_kl" and (len(sets) > 1 or sets and unknown):
            if unknown:
                groups += f"; unrecorded: {', '.join(unknown)}"
            print(f"cftune run: note: {out}: instr_kl was scored on different draws of the base's "
                  f"instruction responses ({groups}): compared prompt by prompt, with the draws' "
                  "noise in the intervals", file=sys.stderr)


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by run group (a run's copies over seeds; a run name is its own group too)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["group"], []).append(r)
        if r["run"] != r["group"]:
            out.setdefault(r["run"], []).append(r)
    return out


def _training_facts(folder: Path) -> dict[str, Any]:
    """Steps, tokens processed and training wall time of a finished run (from its log; all
    None where the run's folder is gone)."""
    from cftune.io import iter_jsonl

    if not (folder / "manifest.json").is_file():
        return {"steps": None, "tokens": None, "wall_time_s": None, "stream_capped": None}
    m = read_json(folder / "manifest.json")
    log = folder / "training_log.jsonl"
    lines = [r for r in iter_jsonl(log) if "tokens_per_s" in r] if log.is_file() else []
    tokens = round(sum(r["tokens_per_s"] * r["seconds"] for r in lines)) if lines else None
    pool = m.get("cf_pool") or {}
    return {"steps": m.get("steps"), "tokens": tokens, "wall_time_s": m.get("seconds"),
            "stream_capped": pool.get("capped")}


def collect(runner: Plan) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, comparisons): a row per evaluated model with its metrics and its paired
    metrics against the base; with several seeds, a row per run group (`NAME (n seeds)`)
    averaging the seeds evaluated; and the paired comparisons `eval.compare` asks for.
    Every run of the config evaluated so far is in, whichever runs `--only` ran."""
    from cftune.results.compare import paired_metrics, seed_metrics, seed_ratios

    results, rows = {}, []
    pending = [name for name in runner.models if not runner.eval_stage(name).done()]
    if pending:
        print(f"cftune run: {len(pending)} run(s) not evaluated yet, not in the report: "
              f"{', '.join(pending)}")
    for name, model in runner.models.items():
        if name in pending:
            continue
        results[name] = read_json(runner.eval_stage(name).folder / "result.json")
        run = next((r for r in runner.runs if r.name == name), None)
        row = {"run": name, "method": "base" if run is None else
               (run.method if run.method == WISE_FT else run.settings.get("method", run.method)),
               "group": run.group if run else "base", "seed": run.seed if run else None,
               "parent": run.of if run else None, "alpha": run.alpha if run else None,
               "metrics": dict(results[name]["metrics"]), "steps": None, "tokens": None,
               "wall_time_s": None, "stream_capped": None}
        if run is not None and run.family:  # the frontier family it joins (results.frontier)
            row["family"] = run.family
        if run is not None and run.method != WISE_FT:
            row.update(_training_facts(Path(model)))
            if row["stream_capped"] is not None and row["method"] == "contextual":
                row["metrics"]["stream_capped"] = {
                    "value": row["stream_capped"], "stderr": None, "ci95": None, "n": None}
        if run is not None:
            row["metrics"].update(paired_metrics([results["base"]], [results[name]]))
        if runner.exp.ablation and run is not None and run.method in CF_METHODS:
            cfg = runner.exp.train_config(run)
            row.update(ablation=runner.exp.ablation,
                       x=runner.exp.setting_value(run, runner.exp.ablation),
                       curve=cfg.method + (f" ({cfg.cfs_mode})" if cfg.method == "cfs" else ""))
        rows.append(row)
    _same_samples(rows, runner.out)
    groups = _groups(rows)
    if len(runner.exp.seeds) > 1:
        for group, members in groups.items():
            if group == "base" or len(members) < 2:  # a one-seed run is its own row
                continue
            first = members[0]
            rows.append({**{k: first.get(k) for k in ("method", "alpha", "ablation", "x",
                                                      "curve") if k in first},
                         "run": f"{group} ({len(members)} seeds)", "group": group,
                         "seeds": [m["seed"] for m in members],
                         "parent": first["parent"] and first["parent"].rsplit("-s", 1)[0],
                         "metrics": {**seed_metrics([m["metrics"] for m in members]),
                                     **paired_metrics([results["base"]],
                                                      [results[m["run"]] for m in members])},
                         "steps": first.get("steps"), "tokens": None, "wall_time_s": None})
    comparisons = []
    for a, b in runner.exp.eval.compare:
        if a not in groups or b not in groups:
            print(f"cftune run: comparison {b} vs {a} skipped: "
                  f"{a if a not in groups else b} is not evaluated yet")
            continue
        ref, model = ([results[m["run"]] for m in groups[g]] for g in (a, b))
        metrics = paired_metrics(ref, model, with_kl=True)
        seeds = [[m["seed"] for m in groups[g]] for g in (a, b)]
        if seeds[0] == seeds[1]:  # the same seeds on both sides: ratios seed by seed
            metrics.update(seed_ratios(results["base"], ref, model))
        comparisons.append({"ref": a, "model": b, "metrics": metrics})
    return rows, comparisons


def _card_row(label: str, m: dict[str, Any]) -> dict[str, Any]:
    return {"yardstick": label, "value": m["value"], "ci95": m.get("ci95"), "n": m.get("n")}


def card_evaluation(row: dict[str, Any], comparisons: list[dict[str, Any]]
                    ) -> list[tuple[str, list[dict[str, Any]]]]:
    """A model's yardsticks for its card: against the base (task gain, forgetting, each
    benchmark), then every `eval.compare` pair in which it, or its run group, is the model."""
    rows = [_card_row(label, _metric(row, name)) for name, label in CARD_YARDSTICKS
            if _metric(row, name)]
    for name in sorted(n for n in row["metrics"] if n.startswith("bench/") and _metric(row, n)):
        bench = name.removeprefix("bench/")
        rows.append(_card_row(f"{bench} accuracy", _metric(row, name)))
        if _metric(row, f"paired/{bench}"):
            rows.append(_card_row(f"Δ {bench} accuracy", _metric(row, f"paired/{bench}")))
    sections = [("Against the base", rows)] if rows else []
    for c in comparisons:
        if c["model"] not in (row["run"], row.get("group")):
            continue
        ref = c["ref"]
        found = [_card_row(f"{CARD_RATIOS[n]} as a fraction of {ref}'s", m)
                 for n, m in c["metrics"].items() if n in CARD_RATIOS and m.get("value") is not None]
        found += [_card_row(f"Δ {n.removeprefix('paired/')} (model − {ref})", m)
                  for n, m in sorted(c["metrics"].items())
                  if n.startswith("paired/") and m.get("value") is not None]
        over = "" if c["model"] == row["run"] else f" (its run group `{c['model']}`, over seeds)"
        if found:
            sections.append((f"Against `{ref}`{over}", found))
    return sections


def write_cards(runner: Plan, rows: list[dict[str, Any]], comparisons: list[dict[str, Any]]
                ) -> int:
    """Rewrite the model card (README.md, `cftune.card`) of every evaluated model folder that
    holds its weights with its evaluation; return how many were written."""
    written = 0
    for row in rows:
        folder = runner.models.get(row["run"])
        if isinstance(folder, Path) and card.refresh(
                folder, name=row["run"], task=runner.exp.task.train,
                evaluation=card_evaluation(row, comparisons)):
            written += 1
    return written
