"""The parts of one optimizer step: a micro-step's forward/backward, and the optimizer step with
its single verdict read. :meth:`train.trainer.Trainer.train_step` strings them together.

Every value that decides control flow (the loss, the global gradient norm, the stop flag) is the
same on every rank by construction (the head's loss is assembled from all-reduced terms; the norm
is all-reduced), so ranks never diverge: no rank skips a step another one takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..optimizer_setup import clip_grads_, global_grad_norm, lr_factor

__all__ = ["StepRunner", "StepResult", "NormStats"]

# Slots of the step's control flags (summed over ranks with the gradient norm, read once).
_BAD_LOSS, _BAD_LABEL, _BAD_EMB, _STOP = range(4)
_NUM_FLAGS = 4


@dataclass
class StepResult:
    """What one optimizer step produced.

    Attributes:
        stepped: Whether the optimizers stepped (``False``: skipped as non-finite).
        grad_norm: The global gradient norm (``nan`` when a micro-step was dropped before it).
        why: What was non-finite when not stepped.
        losses: The last finite micro-step's loss terms (device tensors, 0-d), or ``None``.
        images: Images this rank consumed in the step.
    """

    stepped: bool
    grad_norm: float
    why: str
    losses: Optional[dict[str, torch.Tensor]]
    images: int


class NormStats:
    """Snapshot and restore of the backbone's BatchNorm running statistics: a skipped step's forward
    passes must not leave their (NaN) batch statistics behind. Vectors only, into buffers allocated
    once, with one multi-tensor copy (no host sync)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._snap: Optional[list[torch.Tensor]] = None

    def _buffers(self) -> list[torch.Tensor]:
        bufs = []
        for m in self.module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
                bufs += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        return bufs

    def snapshot(self) -> None:
        bufs, snap = self._buffers(), self._snap
        if snap is None or len(snap) != len(bufs) or any(a.shape != b.shape for a, b in zip(snap, bufs)):
            snap = self._snap = [torch.empty_like(b) for b in bufs]
        if bufs:
            with torch.no_grad():
                torch._foreach_copy_(snap, bufs)

    def restore(self) -> None:
        bufs = self._buffers()
        if bufs and self._snap is not None:
            with torch.no_grad():
                torch._foreach_copy_(bufs, self._snap)


class StepRunner:
    """Runs micro-steps and optimizer steps on the engine (backbone), the head and its optimizer.

    Args:
        engine: The backbone's data-parallel engine (train/engines).
        head: The Partial FC head (``defer_input_checks`` on: its checks are device flags).
        head_opt: The head's optimizer.
        scaler: The fp16 loss scaler (disabled otherwise).
        cfg: The resolved config (optimizer, schedule, head sections).
        derived: Derived figures (total and warm-up steps).
        ctx: The parallel context; ``device``: the training device; ``amp_dtype``: autocast dtype.
        stop: The :class:`train.trainer.signals.StopRequest` whose flag rides on the verdict.
    """

    def __init__(self, engine, head, head_opt, scaler, cfg, derived, ctx, device, amp_dtype, stop) -> None:
        self.engine, self.head, self.head_opt, self.scaler = engine, head, head_opt, scaler
        self.cfg, self.derived, self.ctx, self.device, self.amp_dtype = cfg, derived, ctx, device, amp_dtype
        self.stop = stop
        self.flags: Optional[torch.Tensor] = None  # [non-finite loss, bad label, bad embedding]
        self.bad_loss: Optional[torch.Tensor] = None

    def set_lr(self, step: int) -> dict[str, float]:
        """Sets the schedule's learning rate of ``step`` on both optimizers; returns it by name."""
        s, d = self.cfg.schedule, self.derived
        f = lr_factor(step, d.total_steps, d.warmup_steps, s.decay, s.power, s.min_lr_ratio)
        lrs = {}
        for name, opt in (("backbone", self.engine.optimizer), ("head", self.head_opt)):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            lrs[name] = opt.param_groups[0]["lr"]
        return lrs

    def zero_grads(self) -> None:
        self.engine.zero_grad()
        self.head_opt.zero_grad(set_to_none=True)

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, last: bool, timer) -> tuple[Optional[dict], str]:
        """Forward and backward of one micro-batch: ``(loss terms, "")``, or ``(None, why)`` when its
        loss is not finite and the engine cannot drop it later (DeepSpeed)."""
        accum = self.cfg.optimizer.grad_accumulation
        why = ""
        with self.engine.micro_step_context(last):
            with timer.phase("forward"):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                    emb = self.engine(images)
                    try:
                        out = self.head(emb, labels)
                    except FloatingPointError as e:  # non-finite embeddings: raised on every rank
                        out, why = None, str(e)
                if out is not None:
                    self._note_flags(out["loss"])
                    why = self.engine.nonfinite_loss(out["loss"]) or ""
                    out = None if why else out
            with timer.phase("backward"):
                if out is None:
                    self.engine.skip_micro_backward(last)
                else:
                    self.engine.micro_backward(out["loss"], self.scaler, accum, last)
        return out, why

    def _note_flags(self, loss: torch.Tensor) -> None:
        # No host read here: a non-finite loss (the same on every rank) or bad input is a device
        # flag that optimizer_step reads with the norm, and the step is then skipped on every rank
        # (its NaN gradients are dropped).
        loss = loss.detach()
        inputs = self.head.input_flags if self.head.input_flags is not None else \
            torch.zeros(2, dtype=torch.bool, device=loss.device)
        bad = torch.stack([~torch.isfinite(loss), *inputs])
        first = self.flags is None
        self.flags = bad if first else self.flags | bad
        # A non-finite loss of this step, for the message (read only when skipping).
        self.bad_loss = loss if first else torch.where(bad[0], loss, self.bad_loss)

    def drop_step(self) -> None:
        """Passes the optimizer step of a step whose micro-step was dropped (nothing changes)."""
        self.engine.null_step(clear_grads=False)
        self.zero_grads()
        self.flags = self.bad_loss = None

    def optimizer_step(self, step: int) -> tuple[bool, float, str]:
        """Unscale, global norm, clip, then step both optimizers or neither.

        The step's control values (the norm, a non-finite loss, bad input, a stop request) travel
        in the norm's all-reduce and reach the host in one read: the only device sync of an
        ordinary step (docs/training.md, "Host syncs").

        Args:
            step: The number of this step (for the message about a bad label).

        Returns:
            ``(stepped, norm, why)``; ``why`` says what was non-finite when not stepped.
        """
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.engine.optimizer)
            self.scaler.unscale_(self.head_opt)
        flags = torch.zeros(_NUM_FLAGS, device=self.device)
        if self.flags is not None:
            flags[:3] = self.flags.float()
        flags[_STOP] = 1.0 if self.stop.requested else 0.0
        norm, flags = global_grad_norm(self.engine.grad_norm_params(), [self.head.weight], self.ctx, self.device,
                                       flags=flags)
        if self.head.log_tau is not None and self.head.log_tau.grad is not None:
            # log_tau is replicated and its gradient identical on every rank: counted once.
            norm = torch.sqrt(norm**2 + self.head.log_tau.grad.detach().float().pow(2).sum())
        verdict = torch.cat([norm.reshape(1).float(), flags]).tolist()  # THE host read of the step
        norm_f, flags_f = verdict[0], verdict[1:]
        self.stop.seen = flags_f[_STOP] > 0
        why = self._why(norm_f, flags_f, step)
        finite = math.isfinite(norm_f) and flags_f[_BAD_EMB] == 0 and flags_f[_BAD_LOSS] == 0
        if finite:
            self._clip_and_step(norm)
        else:
            self.engine.null_step(clear_grads=True)
        if self.scaler.is_enabled():
            self.scaler.update()
        self.zero_grads()
        self.flags = self.bad_loss = None
        return finite, norm_f, why

    def _why(self, norm: float, flags: list[float], step: int) -> str:
        if flags[_BAD_LABEL] > 0:
            raise self.head.input_error() or ValueError(
                f"a label outside [0, {self.cfg.head.num_classes}) in step {step}: check the dataset's class "
                "count against head.num_classes")
        if flags[_BAD_EMB] > 0:
            return str(self.head.input_error() or "non-finite embeddings")
        if flags[_BAD_LOSS] > 0:
            return f"loss is {float(self.bad_loss)}" if self.bad_loss is not None else "loss is not finite"
        return f"gradient norm is {norm}"

    def _clip_and_step(self, norm: torch.Tensor) -> None:
        clip = self.cfg.optimizer.grad_clip
        if clip > 0:
            params = [p for p in self.head.parameters() if p.grad is not None] + self.engine.clip_params()
            clip_grads_(params, norm, clip)
        if self.scaler.is_enabled():
            self.scaler.step(self.engine.optimizer)
            self.scaler.step(self.head_opt)
        else:
            self.engine.step()
            self.head_opt.step()
