"""The ``pfc`` command (also ``python -m train``): one argparse tree with one sub-command per verb.

    pfc --help               every verb with its one-line help
    pfc <verb> --help        the verb's description, options in titled groups, examples

Each verb is a :class:`~train.cli.verb.Verb` (name, help, description, examples, add_arguments,
run) declared in ``VERBS`` of its module here: train.py (train), data.py (synth, pack: the data
layer's dali_pipelines/cli.py), evaluate.py (eval: train/evaluate/cli.py), export.py, plan.py,
ablate.py (train/ablate/cli.py), config.py, demo.py. exit_status.py holds the exit codes of
``pfc train`` and the launcher's record of them.

Nothing heavy is imported to list the verbs: verb modules import the standard library only, and
:func:`main` fills in the options of the one verb it parses (``add_arguments`` may import what the
options need, e.g. the recipe list); ``run`` imports torch, the trainer, DALI. :func:`build_parser`
with no argument fills in every verb (tests walk it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterable, Optional, Sequence

from .exit_status import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STATUS_DIR_ENV, record_exit_status,
                          workers_exit_code)
from .verb import HelpFormatter, UsageError, Verb

__all__ = ["main", "build_parser", "verbs", "Verb", "UsageError", "EXIT_BAD_INPUT", "EXIT_DIVERGED",
           "EXIT_STATUS_DIR_ENV", "workers_exit_code"]

#: The modules of this package that declare verbs, in the order ``pfc --help`` lists them.
_VERB_MODULES = ("train", "data", "evaluate", "export", "plan", "ablate", "config", "demo")

_EXAMPLES = ("pfc demo                                   the README's main job (synthetic data, 2 CPU ranks)",
             "pfc train --config cpu_demo --set optimizer.lr=0.05",
             "pfc <verb> --help                          a verb's options and examples")


def verbs() -> dict[str, Verb]:
    """Every verb by name, in ``pfc --help`` order."""
    out: dict[str, Verb] = {}
    for name in _VERB_MODULES:
        for v in importlib.import_module(f"{__name__}.{name}").VERBS:
            out[v.name] = v
    return out


def build_parser(fill: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The ``pfc`` parser; the verbs named in ``fill`` (default: all) get their options.

    The sub-parsers are in ``parser.verb_parsers`` (name -> parser).
    """
    table = verbs()
    fill = set(table if fill is None else fill)
    parser = argparse.ArgumentParser(
        prog="pfc", formatter_class=HelpFormatter,
        description="Partial FC: distributed face-recognition training at millions of identities.",
        epilog="examples:\n" + "\n".join("  " + e for e in _EXAMPLES))
    sub = parser.add_subparsers(title="verbs", dest="verb", metavar="<verb>", required=True)
    parser.verb_parsers = {}
    for name, v in table.items():
        p = sub.add_parser(name, prog=f"pfc {name}", help=v.help, description=v.description,
                           epilog=v.epilog, formatter_class=HelpFormatter)
        if name in fill:
            v.add_arguments(p)
        p.set_defaults(pfc_run=v.run)
        parser.verb_parsers[name] = p
    return parser


def _dispatch(argv: list[str]) -> int:
    parser = build_parser(fill=[argv[0]])
    args = parser.parse_args(argv)
    args.command_line = "pfc " + " ".join(argv)
    try:
        return args.pfc_run(args)
    except UsageError as e:
        parser.verb_parsers[argv[0]].error(str(e))  # usage + "pfc <verb>: error: ...", exit 2
        raise  # not reached: error() exits


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``pfc <verb> [options]``.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when ``None``).

    Returns:
        The process exit code (argparse raises SystemExit for ``--help`` and bad options).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    known = verbs()
    if not argv or argv[0] in ("-h", "--help"):
        print(build_parser(fill=()).format_help(), end="")
        return 0
    if argv[0] not in known:
        print(f"pfc: unknown verb {argv[0]!r}; verbs: {', '.join(known)} (pfc --help)", file=sys.stderr)
        return 2
    if argv[0] != "train":
        return _dispatch(argv)
    code = 1  # an exception escaping `pfc train` is a crash
    try:
        code = _dispatch(argv)
    except SystemExit as e:  # argparse: 0 for --help, 2 for bad arguments
        code = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        record_exit_status(code)  # for the launcher (exit_status.EXIT_STATUS_DIR_ENV)
    return code
