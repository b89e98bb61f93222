"""The `pfc` command: one entry point with subcommands (also `python -m train`)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Optional, Sequence


def _demo(argv: Sequence[str]) -> int:
    """Runs the built-in default job: 2 CPU ranks under torchrun."""
    p = argparse.ArgumentParser(prog="pfc demo", description="Run the built-in 2-rank CPU demo under torchrun.")
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) on this machine")
    args, rest = p.parse_known_args(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "train.head_demo", *rest]
    print("[pfc] running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


COMMANDS = {"demo": _demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatches ``pfc <command> [args]``.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when ``None``).

    Returns:
        The process exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(sorted(COMMANDS))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"pfc: unknown command {argv[0]!r}; commands: {known}", file=sys.stderr)
            return 2
        print(f"usage: pfc <command> [options]\ncommands: {known}")
        return 0
    return COMMANDS[argv[0]](argv[1:])
