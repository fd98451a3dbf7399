"""`cftune report FOLDER`: re-render an experiment's tables and plots from its stored rows
(results.json and comparisons.json), and `write_report`, which the runner calls after the last
stage. Rendering reads only those files and, for the trade-off curves at matched task gain
(frontier.*), the per-item scores of the stages' evals/ (their result.json files, no model), so
a committed experiment re-renders on a fresh clone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cftune.config import field
from cftune.errors import CftuneError
from cftune.io import atomic_write_json, atomic_write_text, read_json
from cftune.results.frontier import frontier
from cftune.results.frontier_plot import plot_frontier
from cftune.results.metrics import MISSING, TASK, TASK_AXES
from cftune.results.plots import plot_tradeoff
from cftune.results.tables import (
    comparisons_markdown,
    frontier_markdown,
    paired_markdown,
    print_table,
    to_csv,
    to_markdown,
)

RESULTS_CSV, RESULTS_MD, TRADEOFF_PNG = "results.csv", "results.md", "tradeoff.png"
FRONTIER_JSON, FRONTIER_PNG, FRONTIER_MD = "frontier.json", "frontier.png", "frontier.md"


# ----------------------------------------------------------------------------- files

def write_frontier(rows: Sequence[dict[str, Any]], folder: str | os.PathLike,
                   evals: Mapping[str, dict[str, Any]] | str | os.PathLike | None = None,
                   reference: str = "full", replicates: int = 1000, seed: int = 0
                   ) -> dict[str, Any] | None:
    """Write frontier.png, frontier.md and, last, frontier.json into `folder` and return
    frontier.json's content, or None, writing nothing, when no family has more than one point.
    Arguments as `cftune.results.frontier.frontier`'s. An evals/ folder is recorded in
    frontier.json (`evals`, relative to `folder`, so it holds on a fresh clone) for
    `cftune report` to find the per-item scores again."""
    result = frontier(rows, evals, reference, replicates, seed)
    if result is None:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result["evals"] = (None if evals is None or isinstance(evals, Mapping)
                       else Path(os.path.relpath(evals, folder)).as_posix())
    plot_frontier(result, folder / FRONTIER_PNG)
    atomic_write_text(folder / FRONTIER_MD, frontier_markdown(result)
                      + f"\n![Trade-off curves at matched task gain]({FRONTIER_PNG})\n")
    atomic_write_json(folder / FRONTIER_JSON, result)
    return result


def write_report(rows: list[dict[str, Any]], folder: str | os.PathLike,
                 title: str = "Task gain vs forgetting", y_name: str = TASK,
                 comparisons: list[dict[str, Any]] = (),
                 evals: str | os.PathLike | None = None,
                 frontier_reference: str = "full") -> dict[str, Path]:
    """Write `results.csv`, `results.md` and `tradeoff.png` into `folder`, then the frontier.*
    files where some family has a curve (`write_frontier`: `evals` is the stages' evals/ folder,
    None for the reported values without intervals); returns the paths written. The frontier
    comes last so that an evaluation it cannot read leaves the results table written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / RESULTS_CSV, "md": folder / RESULTS_MD, "png": folder / TRADEOFF_PNG}
    atomic_write_text(paths["csv"], to_csv(rows))
    atomic_write_text(paths["md"], f"# {title}\n\n" + to_markdown(rows) + (
        f"\nCells: value ± standard error (over seeds for `NAME (n seeds)` rows, with t "
        f"intervals in the CSV); Δ = difference to the base model; {MISSING} = not measured. "
        "`kl` is KL(base‖model) in nats per sample (lower = less forgetting); `task_nll` is the "
        "NLL of the reference solutions in nats per token (lower = better); `bench_paired_avg` "
        "the mean paired Δ accuracy against the base over the benchmarks.\n\n")
        + paired_markdown(rows) + comparisons_markdown(list(comparisons)))
    plot_tradeoff(rows, paths["png"], title=title, y_name=y_name)
    setting = next((r["ablation"] for r in rows if "ablation" in r), None)
    if setting:  # the config varies one setting: its own plot (cftune.results.ablation), and
        # no frontier: its sweep (a temperature, where samples start) is no strength knob
        from cftune.results.ablation import ABLATION_PNG, plot_ablation

        paths["ablation"] = plot_ablation(rows, folder / ABLATION_PNG, setting)
    elif write_frontier(rows, folder, evals, frontier_reference) is not None:
        paths.update({f"frontier_{name.split('.')[1]}": folder / name
                      for name in (FRONTIER_JSON, FRONTIER_PNG, FRONTIER_MD)})
    return paths


@dataclass
class ReportConfig:
    """Settings of `cftune report RUN_DIR`: re-render an experiment's tables and plots from its
    stored results (results.json, comparisons.json) and its evaluations' per-item scores,
    loading no model."""

    folder: str = field("experiments/quickstart", "experiment folder holding results.json")
    plot_y: str = field(TASK, "task metric on the plot's y axis: task_acc | task_nll")
    title: str = field("Task gain vs forgetting", "title of the report and the plot")
    stages: str | None = field(None, "stages folder whose evals/ hold the per-item scores for "
                               "frontier.* (`cftune run --stages`); default: the one recorded "
                               "in FOLDER/frontier.json, else FOLDER")
    frontier_reference: str = field("full", "family whose points are the matched task gains "
                                    "of frontier.* (the family with most points if none)")

    POSITIONAL = "folder"


def evals_folder(folder: Path, stages: str | None) -> Path | None:
    """The evals/ folder behind the rows: the given stages folder's; else the one frontier.json
    recorded; else FOLDER's own where it has one. None: no per-item scores, so the frontier has
    the reported values without intervals (an experiment whose stages are not kept)."""
    if stages is not None:
        evals = Path(stages) / "evals"
        if not evals.is_dir():
            raise CftuneError(f"stages {stages}: it has no evals/ folder; give the folder "
                              "`cftune run --stages` used (the experiment folder without it)")
        return evals
    recorded = folder / FRONTIER_JSON
    path = read_json(recorded).get("evals") if recorded.is_file() else None
    if path:
        evals = folder / path
        if not evals.is_dir():
            raise CftuneError(f"{recorded}: its evaluations, {evals}, are missing; give "
                              "`--stages DIR`, the folder whose evals/ holds them")
        return evals
    own = folder / "evals"
    return own if own.is_dir() else None


def report(config: ReportConfig) -> Path:
    """Re-render `results.md`, `results.csv`, `tradeoff.png` and frontier.* of an experiment
    folder."""
    import json

    folder = Path(config.folder)
    if not (folder / "results.json").is_file():
        raise CftuneError(f"{folder}: no results.json (run `cftune run CONFIG --out {folder}` "
                          f"first)")
    if config.plot_y not in TASK_AXES:
        raise CftuneError(f"plot_y '{config.plot_y}' is not one of {', '.join(TASK_AXES)}")
    rows = json.loads((folder / "results.json").read_text())
    comparisons_file = folder / "comparisons.json"
    comparisons = json.loads(comparisons_file.read_text()) if comparisons_file.is_file() else []
    paths = write_report(rows, folder, config.title, config.plot_y, comparisons,
                         evals_folder(folder, config.stages), config.frontier_reference)
    print_table(rows)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return folder
