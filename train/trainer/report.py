"""What a run reports: the start line, each log step's metrics (one flat dict for the loggers of
train/metrics, read from the device only here), and the summary of :meth:`Trainer.fit`."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from .step import StepResult

log = logging.getLogger("train.trainer")

__all__ = ["log_start", "report_step", "summary"]


def log_start(t) -> None:
    """The run's first log line (rank 0); ``t`` is the :class:`Trainer`."""
    cfg, d = t.cfg, t.derived
    if t.rank == 0:
        log.info("training %s: %d optimizer steps (%d micro-steps per epoch), global batch %d, %d rank(s), "
                 "%s, %s engine, %s, head %s on %d classes", cfg.run.name, d.total_steps, d.steps_per_epoch,
                 d.global_batch, t.world, t.device, cfg.distributed.engine, cfg.precision.dtype,
                 cfg.head.method, cfg.head.num_classes)


def report_step(t, last: Optional[StepResult], norm: float, lrs: dict, timer, window: list) -> None:
    """A log step: reads the step's device values (losses, phase times) into one flat dict for the
    metrics loggers (train/metrics), and logs a line on rank 0."""
    from ..metrics import step_metrics

    ips = window[0] / max(time.perf_counter() - window[1], 1e-9)  # this rank's throughput
    losses = {k: float(v.detach()) for k, v in last.losses.items()} if last is not None else {}
    flat = step_metrics(step=t.state.step, epoch=t.state.epoch, losses=losses, lr=lrs,
                        timings=timer.collect(), images_per_s=ips, grad_norm=norm,
                        loss_scale=t.scaler.get_scale() if t.scaler.is_enabled() else 1.0,
                        head_stats=t.head.last_stats)
    t.metrics.log(flat, skipped_records=int(getattr(t.loader, "skipped", 0)),
                  consecutive_nonfinite=t.state.consecutive_nonfinite)
    window[:] = [0, time.perf_counter()]
    if t.rank == 0 and losses:
        log.info("step %d/%d epoch %d loss %.4f (ce %.4f con %.4f ali %.4f) lr %.4g %.0f img/s/rank "
                 "grad-norm %.3f", t.state.step, t.derived.total_steps, t.state.epoch,
                 losses["loss"], losses["ce"], losses["con"], losses["ali"], lrs["backbone"], ips, norm)


def summary(t, last: Optional[StepResult], preempted: bool, seconds: float) -> dict[str, Any]:
    """What :meth:`Trainer.fit` returns (and ``run_training`` writes to summary.json); evaluates at the end
    of a run that was not preempted."""
    s, total = t.state, t.derived.total_steps
    summary: dict[str, Any] = {"run_dir": str(t.run_dir), "preempted": preempted,
                               "resumed_from": str(t.resumed_from) if t.resumed_from else None,
                               "train_seconds": round(seconds, 2)}
    if preempted:
        if t.rank == 0:
            log.warning("stopped by %s at step %d/%d; run again to resume from %s",
                        t.stop.signal_name or "a signal on another rank", s.step, total,
                        t.last_good_checkpoint or "step 0 (no checkpoint was saved)")
    else:
        summary["eval"] = t.evaluate()
    good = t.last_good_checkpoint
    summary.update(step=s.step, total_steps=total, skipped_steps=s.skipped_steps, skipped_saves=s.skipped_saves,
                   checkpoint=str(good) if good else None,
                   skipped_records=int(getattr(t.loader, "skipped", 0)))
    if last is not None:
        summary["final_loss"] = {k: float(v.detach()) for k, v in last.losses.items()}
    summary["metrics_url"] = t.metrics.url
    if t.initialized_from is not None:
        summary["initialized_from"] = str(t.initialized_from)
    if t.best is not None:
        summary["best"] = {**t.best, "path": str(t.ckpt_root / "best")}
    return summary
