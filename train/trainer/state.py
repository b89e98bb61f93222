"""The run's progress counters (saved in every checkpoint), its exit status and its divergence error."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["TrainState", "NonFiniteLossError", "EXIT_PREEMPTED"]

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after it saved a checkpoint (EX_TEMPFAIL):
#: "not finished, resume me". Slurm scripts requeue on it; see docs/launch.md.
EXIT_PREEMPTED = 75


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint.

    Attributes:
        step: Optimizer steps done (the schedule's clock).
        micro_step: Forward/backward passes done.
        epoch: Current epoch.
        position: Samples of ``epoch`` each rank has consumed (a multiple of the batch size).
        skipped_steps: Optimizer steps skipped because of non-finite values.
        consecutive_nonfinite: Skipped steps in a row (reset by a good step, and on resume).
        skipped_saves: Checkpoint saves left out because the step was non-finite (see
            :meth:`train.trainer.Trainer.save`).
    """

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    position: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    skipped_saves: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
