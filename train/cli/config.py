"""``pfc config``: a recipe with overrides applied, printed as TOML (or the list of recipes)."""

from __future__ import annotations

import argparse
import sys

from .verb import Verb, add_recipe_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument_group("listing").add_argument("--list", action="store_true", help="list the shipped recipes")


def run(args: argparse.Namespace) -> int:
    """Prints the resolved config (or the recipe names); 0, or 2 for a config error."""
    from ..config import ConfigError, config_from_args, dump_toml, list_recipes

    if args.list:
        print("\n".join(list_recipes()))
        return 0
    try:
        print(dump_toml(config_from_args(args)), end="")
    except ConfigError as e:
        print(f"pfc config: {e}", file=sys.stderr)
        return 2
    return 0


VERBS = (Verb(
    "config", help="print a recipe with --set overrides applied, as TOML (or --list the shipped recipes)",
    description="Print the resolved config of a recipe with --set overrides applied, as TOML (what a run "
                "writes to its config.toml), or list the shipped recipes.",
    examples=("pfc config --list", "pfc config --config cpu_demo --set head.method=arcface"),
    add_arguments=add_arguments, run=run),)
