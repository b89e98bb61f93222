"""DeepSpeed ZeRO stage 0/1/2 around the backbone (fp32 engine; bf16 via autocast)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .base import Engine
from .zero_checkpoint import TorchOptimizerCheckpoint, ZeroOptimizerCheckpoint

__all__ = ["DeepSpeedEngine"]


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 0/1/2 around the backbone (fp32 engine; bf16 via autocast).

    Args:
        module: The backbone.
        optimizer: A torch optimizer over the backbone (DeepSpeed wraps it).
        zero_stage: 0, 1 or 2.
        micro_batch: Per-rank batch size.
        grad_accumulation: Micro-steps per optimizer step.
        grad_clip: Max norm of the backbone's gradients (0 = off); DeepSpeed clips them itself.
    """

    clips_own_grads = True

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, zero_stage: int, micro_batch: int,
                 grad_accumulation: int, world_size: int, grad_clip: float = 0.0) -> None:
        try:
            import deepspeed
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise ImportError(
                "distributed.engine='deepspeed' needs DeepSpeed: pip install --no-build-isolation "
                "'partial-fc[deepspeed]' (after torch)"
            ) from e
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accumulation,
            "train_batch_size": micro_batch * grad_accumulation * world_size,
            "zero_optimization": {"stage": zero_stage},
            # ZeRO wraps our torch.optim SGD/AdamW; DeepSpeed only pre-approves its own optimizers.
            # Parity with DDP is checked in tests/integration/test_train.py.
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": grad_clip,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.module = self.ds.module
        self.zero_stage = zero_stage
        self.replicated_grads = zero_stage == 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.ds(images)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps itself; the trainer passes the
        # undivided micro-step loss to it (see StepRunner.micro_step in train/trainer/step.py).
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes after its own step

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    @property
    def checkpoint_optimizer(self):
        if self.zero_stage > 0:
            return ZeroOptimizerCheckpoint(self.optimizer, self.module)
        return TorchOptimizerCheckpoint(self.optimizer, self.module)

    def micro_step_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed synchronises at its own accumulation boundary

    def nonfinite_loss(self, loss: torch.Tensor) -> Optional[str]:
        # DeepSpeed reduces and partitions gradients inside its backward, where a NaN could not be
        # dropped again: the loss is read here (one read per micro-step under DeepSpeed,
        # docs/training.md) and the backward skipped.
        if bool(torch.isfinite(loss.detach())):
            return None
        return f"loss is {float(loss.detach())}"

    def micro_backward(self, loss: torch.Tensor, scaler, accum: int, last: bool) -> None:
        self.backward(loss)  # DeepSpeed divides by its accumulation steps itself
        if not last:
            self.step()  # a no-op until its boundary (it counts micro-steps)

    def skip_micro_backward(self, last: bool) -> None:
        # Keeps DeepSpeed's micro-step count: a backward of zero (see null_step).
        zero = sum(p.sum() * 0.0 for p in self.module.parameters())
        self.backward(zero)
        if not last:
            self.step()

    def null_step(self, clear_grads: bool) -> None:
        """Lets DeepSpeed pass its step boundary without changing the backbone.

        DeepSpeed owns the backbone's step and counts micro-steps itself, so a skipped step
        cannot simply not call it: the step runs with learning rate 0 (on zero gradients when
        ``clear_grads``; parameters unchanged; SGD momentum / Adam moments see one such step).
        """
        if clear_grads:
            self.optimizer.zero_grad()
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        self.step()
        for g, lr in zip(self.optimizer.param_groups, saved):
            g["lr"] = lr

    def weights_loaded(self) -> None:
        # ZeRO-1/2 keeps an fp32 master copy of this rank's partition, separate from the module's
        # parameters; without this the next step would start from the old weights again.
        if self.zero_stage > 0:
            self.optimizer.refresh_fp32_params()
