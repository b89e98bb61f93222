"""Exit codes of ``pfc train`` and how errors and workers' records become them.

docs/launch.md has the table; launch/torchrun.sh and the Slurm scripts pass the codes on:
0 done, 2 bad input or config, 3 diverged, 75 checkpointed on a signal and resumable
(``train.trainer.EXIT_PREEMPTED``), anything else a crash.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3

#: Set by launch/torchrun.sh (and the Slurm scripts): each training process writes its exit code
#: to ``<dir>/round<restart>.rank<rank>`` so the launcher can report the workers' own code
#: (torchrun's agent turns every failure into 1, and a signal to it into its own error).
EXIT_STATUS_DIR_ENV = "PFC_EXIT_STATUS_DIR"


def input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (config, data, checkpoint): a one-line message and exit 2."""
    from dali_pipelines import CorruptImageError, RecordIOError, UnsafePickleError

    from ..checkpoint import CheckpointError
    from ..config import ConfigError

    return (ConfigError, FileNotFoundError, CheckpointError, CorruptImageError, RecordIOError, UnsafePickleError)


def clean_error(prog: str, e: BaseException, code: int) -> int:
    """Prints ``prog: message`` (the traceback too with PFC_TRACEBACK=1) and returns ``code``."""
    if os.environ.get("PFC_TRACEBACK", "") not in ("", "0"):
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    print(f"{prog}: {e}", file=sys.stderr, flush=True)
    return code


def record_exit_status(code: int) -> None:
    """Writes this process's exit code where the launcher looks for it (see EXIT_STATUS_DIR_ENV)."""
    out = os.environ.get(EXIT_STATUS_DIR_ENV)
    if not out:
        return
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0"))
    try:
        path = Path(out) / f"round{int(round_)}.rank{int(rank)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{code}\n")
    except (OSError, ValueError) as e:  # the exit code itself still tells the story
        print(f"pfc train: cannot record the exit status in {out}: {e}", file=sys.stderr)


def workers_exit_code(rc: int, status_dir: Path) -> int:
    """The exit code to report for a launcher that returned ``rc``, from its workers' records.

    The same rule as ``pfc_worker_exit`` in launch/lib.sh (tested against it): among the codes
    of the latest round in ``status_dir``, some 75 and otherwise 0 gives 75, all 2 or all 3
    gives that code, anything else (or nothing recorded) keeps ``rc``.
    """
    if rc == 0 or not status_dir.is_dir():
        return rc
    rounds: dict[int, list[int]] = {}
    for f in status_dir.glob("round*.rank*"):
        head = f.name[len("round"):].split(".", 1)[0]
        try:
            code = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        if head.isdigit():
            rounds.setdefault(int(head), []).append(code)
    codes = set(rounds[max(rounds)]) if rounds else set()
    if 75 in codes and codes <= {0, 75}:
        return 75
    if len(codes) == 1 and codes <= {EXIT_BAD_INPUT, EXIT_DIVERGED}:
        return codes.pop()
    return rc
