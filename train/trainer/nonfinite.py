"""What a skipped (non-finite) step leaves behind: counters, a warning, and the stop after too many."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .state import NonFiniteLossError, TrainState

log = logging.getLogger("train.trainer")

__all__ = ["note_nonfinite", "last_good_hint"]


def note_nonfinite(state: TrainState, why: str, *, limit: int, metrics, rank: int,
                   last_good: Optional[Path]) -> None:
    """Counts a skipped step; raises :class:`NonFiniteLossError` after ``limit`` in a row."""
    state.skipped_steps += 1
    state.consecutive_nonfinite += 1
    metrics.inc_skipped_steps()
    if rank == 0:
        log.warning("step %d skipped: %s (%d in a row)", state.step, why, state.consecutive_nonfinite)
    if state.consecutive_nonfinite >= limit:
        raise NonFiniteLossError(
            f"{state.consecutive_nonfinite} consecutive steps with non-finite values (limit "
            f"run.max_nonfinite_steps = {limit}); last: {why}. Lower optimizer.lr, set "
            "optimizer.grad_clip, use bf16 instead of fp16, or check the data; " + last_good_hint(last_good)
        )


def last_good_hint(path: Optional[Path]) -> str:
    """Where to resume from after a divergence: a checkpoint that exists (retention keeps it)."""
    if path is not None and (path / "manifest.json").is_file():
        return (f"the last good checkpoint is {path}: a rerun resumes from it (checkpoint.resume = \"auto\") "
                "with a fresh non-finite count")
    return "no checkpoint was saved before the run diverged"
