"""``pfc ablate``'s command line: :func:`add_arguments` (the options, on any parser), :func:`run`
(a parsed namespace -> a study -> exit code) and :func:`main` (both, for ``pfc ablate ARGS``).

Command-line options override a spec file's (``--spec``) values; see :mod:`train.ablate` for usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .spec import QUICK, StudySpec, Variant, load_spec, parse_variants

__all__ = ["DESCRIPTION", "add_arguments", "run", "main"]

#: The ``--help`` description of ``pfc ablate``.
DESCRIPTION = "Train and evaluate the ablation variants on the synthetic dataset (CPU)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds every option of ``pfc ablate`` to ``p`` (a parser of its own or a subparser)."""
    p.add_argument("--out", required=True, type=Path, help="output directory (results.json, table.md, runs/, data/)")
    p.add_argument("--spec", type=Path, default=None,
                   help="a study spec TOML (dataset, budget, protocol, variants, seeds, jobs; e.g. "
                        "train/studies/cg_study.toml); the options below override it")
    p.add_argument("--variants", nargs="+", default=None,
                   help="presets, groups (paper, s6-options, cg-study) or METHOD:key=value... (default: paper)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: %d)" % StudySpec.steps)
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: %d)" % StudySpec.batch_size)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every run (repeatable)")
    p.add_argument("--config", default=None, help="base recipe (default: %s)" % StudySpec.recipe)
    p.add_argument("--runs-dir", type=Path, default=None, help="run directories (default: OUT/runs); "
                   "point two studies at the same one to share runs")
    p.add_argument("--data", type=Path, default=None, help="dataset directory (default: OUT/data)")
    p.add_argument("--quick", action="store_true", help="a tiny dataset and 3 steps per run (smoke test)")
    p.add_argument("--no-figure", action="store_true", help="do not draw ablation.png")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once, one process each (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job process (default 1 with --jobs > 1)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: collect the finished runs and write results.json, table.md, the figure")
    p.add_argument("--order", choices=("seed", "variant"), default=None,
                   help="outer loop: every variant of a seed first (default), or every seed of a variant")


def resolve(args: argparse.Namespace) -> tuple[StudySpec, list[Variant], list[int]]:
    """The study, variants and seeds of parsed options, spec file included; fills ``args.jobs``,
    ``args.threads`` and ``args.order`` from the spec file where the command line leaves them unset.

    Raises:
        ValueError: Conflicting or invalid options, an unknown variant, a bad ``--set`` (checked by
            building every variant's config, before any data is made or any run starts).
    """
    from .runner import run_config

    run_opts: dict[str, Any] = {}
    if args.spec is not None:
        if args.quick:
            raise ValueError("--quick and --spec exclude each other")
        base, run_opts = load_spec(args.spec)
    else:
        base = QUICK if args.quick else StudySpec()
    variants = parse_variants(args.variants or run_opts.get("variants") or ["paper"])
    changes: dict[str, Any] = {"recipe": args.config or base.recipe,
                               "overrides": base.overrides + tuple(args.overrides)}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    spec = dataclasses.replace(base, **changes)
    seeds = args.seeds if args.seeds is not None else run_opts.get("seeds", [0] if args.quick else [0, 1, 2])
    args.jobs = args.jobs if args.jobs is not None else int(run_opts.get("jobs", 1))
    args.threads = args.threads if args.threads is not None else run_opts.get("threads")
    args.order = args.order or run_opts.get("order", "seed")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {seeds}")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        raise ValueError(f"--jobs and --threads must be >= 1, got {args.jobs}, {args.threads}")
    # Fail on a bad override before any data is made or any run starts.
    for v in variants:
        run_config(spec, v, seeds[0], args.out / "runs", args.out / "data")
    return spec, variants, seeds


def run(args: argparse.Namespace, *, command: Optional[str] = None) -> int:
    """Runs the study of parsed ``pfc ablate`` options; prints the table. Returns the exit code.

    Args:
        command: The command line recorded in ``results.json`` (default: ``pfc`` + ``sys.argv[1:]``,
            right when ``args`` comes from the whole ``pfc`` parser).
    """
    from .runner import run_study

    try:
        spec, variants, seeds = resolve(args)
    except ValueError as e:  # ConfigError is a ValueError
        print(f"pfc ablate: {e}", file=sys.stderr)
        return 2
    if command is None:
        command = "pfc " + " ".join(sys.argv[1:])
    result = run_study(spec, variants, seeds, args.out, runs_dir=args.runs_dir, data_dir=args.data,
                       figure=not args.no_figure, command=command, jobs=args.jobs, threads=args.threads,
                       order=args.order, train=not args.report_only)
    table = args.out / "table.md"
    print(table.read_text() if table.is_file() else "", end="")
    missing = result.get("missing") or []
    print(f"[ablate] {len(result['runs'])} runs in {result.get('wall_s', 0):.0f} s"
          + (f", {len(missing)} not run (--report-only)" if missing else "")
          + f"; results in {args.out / 'results.json'}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``pfc ablate ARGS`` (``argv`` is ARGS, without ``ablate``). Returns the exit code."""
    p = argparse.ArgumentParser(prog="pfc ablate", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args, command="pfc ablate " + " ".join(argv if argv is not None else sys.argv[1:]))
