"""The `cftune` command: a thin layer that parses flags/YAML into a stage config and calls the library.

Each subcommand is one entry of `COMMANDS`: (config module and class, entry module and function,
summary). The
flags come from the config dataclass, so the CLI, YAML files and the Python API share one set of
names. User mistakes (`CftuneError`) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from cftune import __version__
from cftune.config import add_arguments, from_args
from cftune.errors import CftuneError, did_you_mean

# name -> (config module, config class, module of the function taking it, function, summary).
# The parser reads only the light config modules; a command's own module loads when it runs.
COMMANDS: dict[str, tuple[str, str, str, str, str]] = {
    "generate": ("cftune.generate.config", "GenerateConfig", "cftune.generate.stage", "generate",
                 "sample context-free text from a base model, with its log-probs"),
    "train": ("cftune.train.config", "TrainConfig", "cftune.train.stage", "train",
              "fine-tune on a task while staying close to the base (CFS and baselines)"),
    "merge": ("cftune.merge", "MergeConfig", "cftune.merge", "merge",
              "Wise-FT: interpolate base and fine-tuned weights (or a LoRA adapter)"),
    "eval": ("cftune.evaluate.stage", "EvalConfig", "cftune.evaluate.stage", "evaluate",
             "compare models with their base: KL, zero-shot benchmarks, task accuracy"),
    "run": ("cftune.experiment.execute", "RunConfig", "cftune.experiment.execute", "run",
            "one experiment config -> every stage, a results table and a trade-off plot"),
    "report": ("cftune.results.report", "ReportConfig", "cftune.results.report", "report",
               "re-render an experiment's tables and plot from its stored results"),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one line (no usage block), with a suggestion for a
    mistyped flag."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            flags = [a for a in self._option_string_actions if a.startswith("--")]
            message += did_you_mean(message.split(":", 1)[1].split()[0].split("=")[0], flags)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cftune",
        description="Fine-tune language models without forgetting, using context-free samples.",
    )
    parser.commands = {}  # name -> its subparser (whose flags a "did you mean" picks from)
    parser.add_argument("--version", action="version", version=f"cftune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, cls_name, _, _, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)  # a _Parser too
        parser.commands[name] = p
        cls = getattr(importlib.import_module(module), cls_name)
        positional = getattr(cls, "POSITIONAL", None)  # e.g. `cftune run CONFIG`
        if positional:
            p.add_argument(positional, help=cls.__dataclass_fields__[positional].metadata["help"])
        else:
            p.add_argument("--config", help="YAML file of settings (flags given here override it)")
        add_arguments(p, cls, skip=(positional,))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands.get(args.command, parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if not args.command:
        parser.print_help()
        return 2
    module, cls_name, fn_module, fn_name, _ = COMMANDS[args.command]
    try:
        config = from_args(getattr(importlib.import_module(module), cls_name), args)
        getattr(importlib.import_module(fn_module), fn_name)(config)
    except CftuneError as e:
        print(f"cftune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not a bug: a full disk, a read-only folder
        where = f"{e.filename}: " if e.filename else ""
        # No errno: not the file system but a library that failed to load (an installed
        # package built for another torch, say).
        fix = "free space, permissions" if e.errno is not None else \
            "reinstall the package it names, built for this torch"
        print(f"cftune {args.command}: error: {where}{e.strerror or e} (errno {e.errno}); fix "
              f"that ({fix}) and rerun the same command", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cftune {args.command}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
