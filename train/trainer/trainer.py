"""The training loop: data -> backbone (data-parallel engine) -> Partial FC head -> two optimizers.

One optimizer step (:meth:`Trainer.train_step`), with gradient accumulation over ``A`` micro-steps::

    for each micro-step:  images, labels = feed.next()
                          emb = engine(images)            (autocast)
                          out = head(emb, labels)         (all-gather, sharded softmax, Con, Ali, bank)
                          backward(out["loss"] / A)       (gradients reduced on the last micro-step only)
    unscale (fp16) -> global grad norm (backbone + all head shards) -> clip -> skip if non-finite
    -> backbone step + head step -> learning rate of the next step

:meth:`Trainer.fit` is the loop around it; its collaborators live next to this module: the epoch
feed (``feed.py``), the step's parts (``step.py``), resume and ``init_from`` (``resume.py``),
checkpoint saves and keep_best (``saving.py``), non-finite bookkeeping (``nonfinite.py``), stop
signals (``signals.py``), building (``build.py``), evaluation and export (``evaluation.py``).

Determinism: on CPU with a fixed seed, a run stopped after a checkpoint and resumed produces the
same weights as an uninterrupted one (tests/integration/test_train.py): the checkpoint holds the
backbone, head shards, both optimizers, the loss scaler, every RNG, the head's sampler clock and
the data position, and the loaders' order and flips are functions of (seed, epoch, position).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from partial_fc.distributed import ParallelContext

from ..dist_env import init_distributed
from . import build, report
from .evaluation import evaluate_pair_sets, export_backbone
from .feed import EpochFeed
from .nonfinite import note_nonfinite
from .resume import start
from .saving import CheckpointSaver
from .signals import StopRequest
from .state import TrainState
from .step import NormStats, StepResult, StepRunner

log = logging.getLogger("train.trainer")

__all__ = ["Trainer"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Builds everything from a :class:`train.config.TrainConfig` and runs it.

    The process group is initialised here from the launcher's environment (torchrun or Slurm;
    a plain ``python`` process is a world of one), never at import.

    Args:
        cfg: The configuration (frozen; never modified; the head's class count is taken from the
            dataset with :meth:`TrainConfig.resolve`).
        handle_signals: Install SIGTERM/SIGUSR1 handlers that make the run save a checkpoint at
            the next step boundary and stop (see :data:`EXIT_PREEMPTED`). Only possible from the
            main thread.
    """

    def __init__(self, cfg, *, handle_signals: bool = True) -> None:
        from ..config import derive, write_resolved
        from ..logging_utils import setup_logging

        self.denv, self.device = init_distributed(cfg.run.device, cfg.distributed.backend, cfg.distributed.timeout_s)
        self.ctx = ParallelContext.from_group(None)
        self.rank, self.world = self.ctx.rank, self.ctx.world_size
        self.run_dir = cfg.run_dir
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        self.log_file = setup_logging(self.run_dir, self.rank)
        self.amp_dtype = _DTYPES[cfg.precision.dtype]
        build.seed_everything(cfg.run.seed)
        self.loader = build.build_loader(cfg, self.rank, self.world, self.device)
        self.cfg = cfg = cfg.resolve(int(self.loader.num_classes))
        self.derived = derive(cfg, world_size=self.world, num_samples=int(self.loader.num_samples),
                              cuda_available=self.device.type == "cuda")
        self.engine, self.head, self.head_opt, self.scaler = build.build_model(cfg, self.derived, self.loader,
                                                                               self.device, self.world)
        self.state = TrainState()
        self.ckpt_root = cfg.checkpoint_dir
        self.saver = CheckpointSaver(cfg, self)
        self.resumed_from: Optional[Path] = None
        self.initialized_from: Optional[Path] = None
        start(self)
        # Only now, with the checkpoint (or init_from) accepted: a refused resume leaves the run
        # directory's config.toml/derived.toml as they were (they describe the checkpoints in it).
        if self.rank == 0:
            write_resolved(cfg, self.run_dir, self.derived)
        self.metrics = build.build_metrics(cfg, self.derived, self.denv, self.rank, self.world, self.device,
                                           self.state.step)
        self.pair_sets = build.load_pair_sets(cfg, self.rank)
        self.stop = StopRequest(self.ctx, self.device)
        if handle_signals:
            self.stop.install()
        self.steps = StepRunner(self.engine, self.head, self.head_opt, self.scaler, cfg, self.derived, self.ctx,
                                self.device, self.amp_dtype, self.stop)
        self.norm_stats = NormStats(self.engine.module)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------------------ one step
    def train_step(self, feed: EpochFeed, timer) -> StepResult:
        """One optimizer step: forward and backward of each micro-batch, then both optimizers or neither.

        A micro-step with a loss the engine cannot drop later (DeepSpeed) drops the whole step;
        otherwise the step's single host read (:meth:`StepRunner.optimizer_step`) decides. A skipped
        step leaves the weights and the BatchNorm statistics as they were.
        """
        accum = self.cfg.optimizer.grad_accumulation
        losses: Optional[dict] = None
        dropped: Optional[str] = None  # why a micro-step was dropped
        images = 0
        for i in range(accum):
            with timer.phase("data"):
                x, y = feed.next()
            if i == 0:
                self.norm_stats.snapshot()
            out, why = self.steps.micro_step(x, y, last=i == accum - 1, timer=timer)
            self.state.micro_step += 1
            images += x.shape[0]
            if out is None:
                dropped = why
            else:
                losses = out
        with timer.phase("optimizer"):
            if dropped is not None:
                self.steps.drop_step()
                stepped, norm, why = False, float("nan"), dropped
            else:
                stepped, norm, why = self.steps.optimizer_step(self.state.step + 1)
        if not stepped:
            self.norm_stats.restore()
        self.state.step += 1
        return StepResult(stepped, norm, why, losses, images)

    # ------------------------------------------------------------------------------ the loop
    def fit(self, on_step: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
        """Trains until ``derived.total_steps`` optimizer steps (or a stop signal).

        Args:
            on_step: Called as ``on_step(step, images)`` after every optimizer step, with the
                step number and the images this rank consumed in it (benchmarks time steps with it).

        Returns:
            A summary dict (run directory, steps, skipped steps, final losses, evaluation,
            ``"preempted"`` when stopped by a signal).
        """
        from ..metrics import StepTimer

        cfg, total = self.cfg, self.derived.total_steps
        timer, feed = StepTimer(self.device), EpochFeed(self.loader, self.state, self.device, cfg.data.batch_size)
        self.engine.train(True)
        self.head.train(True)
        report.log_start(self)
        window = [0, time.perf_counter()]  # images, start of the logging window
        last: Optional[StepResult] = None
        preempted = False
        self.steps.set_lr(self.state.step)  # the schedule's value at the (possibly resumed) first step
        t_start = time.perf_counter()
        while self.state.step < total and not preempted:
            result = self.train_step(feed, timer)
            last = result if result.losses is not None else last
            window[0] += result.images
            if on_step is not None:
                on_step(self.state.step, result.images)
            self._after_step(result)
            lrs = self.steps.set_lr(self.state.step)  # the learning rate of the next step
            if self.state.step % cfg.run.log_every == 0 or self.state.step == total:
                report.report_step(self, last, result.grad_norm, lrs, timer, window)
            else:
                timer.reset()  # drops this step's phase times without reading the device
            if self._due(cfg.checkpoint.every_steps):
                self.save()
            if self._due(cfg.evaluation.every_steps):
                self.evaluate()
            preempted = self.stop.agreed()
        self.save()
        self.wait_for_checkpoint()  # complete before evaluating, exporting or exiting (75 after a signal)
        return report.summary(self, last, preempted, time.perf_counter() - t_start)

    def _after_step(self, result: StepResult) -> None:
        if result.stepped:
            self.state.consecutive_nonfinite = 0
        else:
            note_nonfinite(self.state, result.why, limit=self.cfg.run.max_nonfinite_steps, metrics=self.metrics,
                           rank=self.rank, last_good=self.last_good_checkpoint)

    def _due(self, every: int) -> bool:
        return bool(every) and self.state.step % every == 0 and self.state.step < self.derived.total_steps

    # ------------------------------------------------------------------------------ checkpoints
    @property
    def last_good_checkpoint(self) -> Optional[Path]:
        """The newest checkpoint known to hold a finite, resumable state (saved or resumed from)."""
        return self.saver.last_good

    @property
    def best(self) -> Optional[dict]:
        return self.saver.best

    def save(self, wait: bool = False) -> Optional[Path]:
        """Writes a checkpoint of the current step (collective: every rank calls it).

        Never saves what a resume should not start from: while the latest step was skipped as
        non-finite, or when any tensor of the state is not finite, the save is left out (counted
        in ``skipped_saves``, logged) and ``None`` returned, so retention keeps the last good one.
        With ``checkpoint.async_save``, ``wait=True`` (or :meth:`wait_for_checkpoint`) completes it.
        """
        return self.saver.save(self.state, wait=wait)

    def wait_for_checkpoint(self) -> None:
        """Completes an asynchronous save in progress (collective; a no-op when there is none)."""
        self.saver.wait()

    # ------------------------------------------------------------------------------ evaluation, export
    def evaluate(self) -> dict[str, dict]:
        """Rank 0 evaluates every pair set; the other ranks wait. Returns ``{set: figures}``."""
        results: dict[str, dict] = {}
        if self.rank == 0 and self.pair_sets:
            results = evaluate_pair_sets(self.engine.module, self.pair_sets, self.cfg, self.device, self.amp_dtype,
                                         self.state.step, self.metrics)
        self._barrier()
        if self.cfg.checkpoint.keep_best:
            self.saver.update_best(results, self.state)
        return results

    def export(self) -> dict[str, Any]:
        """Rank 0 writes the backbone (state dict, and ONNX when enabled) and checks ONNX parity."""
        out = export_backbone(self.engine.module, self.cfg, self.run_dir, self.state.step) if self.rank == 0 else {}
        self._barrier()
        return out

    def close(self) -> None:
        """Completes a checkpoint still being written, stops the metrics endpoint and leaves the
        process group."""
        # Local only: on an error path another rank may be gone; rank 0 still commits when every
        # rank's files arrived, else the previous checkpoint stays the newest.
        self.saver.wait(collective=False)
        self.metrics.close()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
