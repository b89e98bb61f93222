"""Checkpoint scheduling for a run: finite-only saves (synchronous or staged for the async writer),
waiting for a save in flight, and ``checkpoint.keep_best``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from partial_fc.distributed import all_reduce_no_grad

from .state import TrainState

log = logging.getLogger("train.trainer")

__all__ = ["CheckpointSaver", "lookup_eval"]


class CheckpointSaver:
    """Writes the run's checkpoints and keeps the best one.

    Args:
        cfg: The resolved config (``checkpoint`` section, data batch size, backbone).
        run: The :class:`train.trainer.Trainer` whose engine, head, head optimizer, scaler, parallel
            context and device are saved from (read at each save).
    """

    def __init__(self, cfg, run) -> None:
        self.cfg, self.run = cfg, run
        self.root: Path = cfg.checkpoint_dir
        #: The newest checkpoint known to hold a finite, resumable state (saved or resumed from).
        self.last_good: Optional[Path] = None
        self.best: Optional[dict] = None
        if cfg.checkpoint.keep_best:
            from ..checkpoint import read_best

            self.best = read_best(self.root)
        self.writer = None
        if cfg.checkpoint.async_save:
            from ..checkpoint import AsyncCheckpointWriter

            self.writer = AsyncCheckpointWriter(self.root, run.head.ctx, cfg.distributed.timeout_s)
        self._last_saved: tuple[Optional[int], Optional[Path]] = (None, None)

    def wait(self, collective: bool = True) -> None:
        """Completes an asynchronous save in progress (a no-op when there is none)."""
        if self.writer is not None:
            if collective:
                self.writer.wait()
            else:
                self.writer.wait(collective=False)

    def _refusal(self, state: TrainState) -> Optional[str]:
        if state.consecutive_nonfinite > 0:
            return f"the last {state.consecutive_nonfinite} step(s) were non-finite"
        if not self._state_is_finite():
            return "the model, head or optimizer state holds non-finite values"
        return None

    def save(self, state: TrainState, wait: bool = False) -> Optional[Path]:
        """Writes a checkpoint of the current step (collective); ``None`` when left out as non-finite.

        With ``checkpoint.async_save`` the call returns once the state is staged (copied to host
        memory) and a thread writes it; ``wait=True`` (or :meth:`wait`) completes it.
        """
        from ..checkpoint import save_checkpoint

        r, rank = self.run, self.run.rank
        why = self._refusal(state)
        if why is not None:
            state.skipped_saves += 1
            if rank == 0:
                log.warning("checkpoint of step %d not written: %s; the last good checkpoint is %s",
                            state.step, why, self.last_good or "none (nothing saved yet)")
            return None
        extra = {"train_state": state.to_dict(), "world_size": r.world, "batch_size": self.cfg.data.batch_size,
                 "global_position": state.position * r.world, "backbone": self.cfg.backbone.name,
                 "embedding_size": self.cfg.backbone.num_features}
        kwargs = dict(backbone=r.engine.module, backbone_optimizer=r.engine.optimizer_state_for_checkpoint(),
                      scaler=r.scaler if r.scaler.is_enabled() else None, extra_state=extra,
                      keep_last=self.cfg.checkpoint.keep_last or None, finite=True)
        if self.writer is not None:
            path = self.writer.save(state.step, r.head, r.head_opt, **kwargs)
            if rank == 0:
                log.info("checkpoint step %d -> %s (staged in %.3f s, writing in the background)", state.step,
                         path, self.writer.last_stall_s)
            if wait:
                self.writer.wait()
        else:
            path = save_checkpoint(self.root, state.step, r.head, r.head_opt, **kwargs)
            if rank == 0:
                log.info("checkpoint step %d -> %s", state.step, path)
        self.last_good = path
        self._last_saved = (state.step, path)
        return path

    def _state_is_finite(self) -> bool:
        """Whether every floating tensor of the state a checkpoint holds is finite, on every rank."""
        r = self.run
        tensors = list(r.engine.module.state_dict().values()) + list(r.head.state_dict().values())
        for opt in (r.head_opt, r.engine.optimizer):
            if opt is not None:
                # getattr: an engine's optimizer wrapper may keep its state elsewhere (then unchecked).
                tensors += [v for st in getattr(opt, "state", {}).values() for v in st.values()
                            if isinstance(v, torch.Tensor)]
        # One fp32 sum per tensor instead of isfinite(t): NaN and inf propagate through a sum, and
        # no temporary as large as the tensor is made (the head shard can be gigabytes). A finite
        # tensor whose sum overflows fp32 (entries ~1e30) is garbage anyway and is refused too.
        sums = []
        for t in tensors:
            if t.is_sparse:
                t = t.coalesce().values()
            if t.is_floating_point() and t.numel():
                sums.append(t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
                            .to(torch.float64))
        ok = torch.isfinite(torch.stack(sums)).all().to(r.device, torch.float32).reshape(1) if sums else \
            torch.ones(1, device=r.device)
        return bool(all_reduce_no_grad(ok, r.ctx, op=dist.ReduceOp.MIN).item() > 0)

    def update_best(self, results: dict[str, dict], state: TrainState) -> None:
        """``checkpoint.keep_best``: after an evaluation, keeps this step's checkpoint as ``best``
        when the figure improved. Collective (rank 0 evaluates, every rank learns the figure)."""
        key, r = self.cfg.checkpoint.keep_best, self.run
        value = lookup_eval(results, key) if r.rank == 0 else float("nan")
        if r.world > 1:
            t = torch.tensor([value], dtype=torch.float64, device=r.device)
            dist.broadcast(t, src=0)
            value = float(t.item())  # an evaluation step: not an ordinary step
        if not math.isfinite(value):
            return
        maximize = self.cfg.checkpoint.keep_best_mode == "max"
        if self.best is not None and not (value > self.best["value"] if maximize else value < self.best["value"]):
            return
        if self._last_saved[0] == state.step:
            self.wait()
            path = self._last_saved[1]
        else:
            path = self.save(state, wait=True)
        if path is None:  # the state was not finite: nothing to keep
            return
        self.best = {"metric": key, "value": value, "step": state.step, "source": path.name}
        if r.rank == 0:
            from ..checkpoint import keep_as_best

            keep_as_best(path, self.root, self.best)
            log.info("best %s = %.6g at step %d: kept as %s", key, value, state.step, self.root / "best")
        if r.world > 1:
            dist.barrier()


def lookup_eval(results: dict, key: str) -> float:
    """The figure ``"<pair set>/<figure>[/<sub>]"`` of an evaluation (``nan`` when not evaluated).

    Raises:
        ValueError: The key names nothing in the results (the message lists what there is).
    """
    node: Any = results
    for part in key.split("/"):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        if isinstance(node, dict):  # numeric keys such as FAR targets: 1e-4 == 0.0001
            try:
                match = [k for k in node if float(k) == float(part)]
            except ValueError:
                match = []
            if match:
                node = node[match[0]]
                continue
        if not results:
            return float("nan")

        def keys(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    yield from keys(v, f"{prefix}{k}/")
                elif isinstance(v, (int, float)):
                    yield f"{prefix}{k}"

        raise ValueError(f"checkpoint.keep_best = {key!r} is not an evaluation figure; there are: "
                         + ", ".join(keys(results)))
    if not isinstance(node, (int, float)):
        raise ValueError(f"checkpoint.keep_best = {key!r} names a group, not a number")
    return float(node)


