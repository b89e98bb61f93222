"""Training: :class:`Trainer` (build + the loop), :func:`run_training` (train, export, summary).

Modules: ``trainer`` (the Trainer and its ``train_step``), ``step`` (micro-step and optimizer step),
``feed`` (epochs and data positions), ``resume`` (which checkpoint, restoring it, ``init_from``),
``saving`` (checkpoint saves, async waits, keep_best), ``nonfinite`` (skipped-step bookkeeping),
``signals`` (SIGTERM/SIGUSR1), ``build`` (loader, backbone, optimizers, scaler, metrics),
``evaluation`` (pair-set evaluation, export), ``state`` (TrainState, exit status).
"""

from __future__ import annotations

import json
from typing import Any

from .saving import lookup_eval as _lookup_eval  # noqa: F401  (tests/unit/test_checkpoint_writer.py)
from .state import EXIT_PREEMPTED, NonFiniteLossError, TrainState
from .trainer import Trainer

__all__ = ["Trainer", "TrainState", "NonFiniteLossError", "EXIT_PREEMPTED", "run_training"]


def run_training(cfg, *, export: bool = True) -> dict[str, Any]:
    """Builds a :class:`Trainer`, trains, exports (rank 0) and writes ``summary.json``.

    Returns:
        The summary (also on ranks other than 0, without the export paths).
    """
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
        if export and not summary["preempted"]:
            summary["export"] = trainer.export()
        if trainer.rank == 0:
            (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    finally:
        trainer.close()
    return summary
