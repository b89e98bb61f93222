"""``pfc ablate``: the ablation study (options and run in train/ablate/cli.py)."""

from __future__ import annotations

import argparse

from .verb import Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..ablate.cli import add_arguments as add

    add(p.add_argument_group("study"))


def run(args: argparse.Namespace) -> int:
    from ..ablate.cli import run as run_study

    return run_study(args, command=args.command_line)


VERBS = (Verb(
    "ablate", help="train and evaluate the ablation variants on the synthetic dataset (CPU; docs/results.md)",
    description="Train and evaluate the ablation variants on the synthetic dataset (CPU) and write "
                "results.json, table.md and the figure to --out. Options override a --spec file's values.",
    examples=("pfc ablate --out runs/ablate --quick",
              "pfc ablate --out runs/ablate --variants paper --seeds 0 1 2 --jobs 2",
              "pfc ablate --out runs/cg --spec train/studies/cg_study.toml --report-only"),
    add_arguments=add_arguments, run=run),)
