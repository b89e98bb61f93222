"""Data-parallel engines for the backbone: DDP (default) or DeepSpeed ZeRO, behind one interface.

The Partial FC head is never handed to an engine: its class shards and their optimizer state stay
local to their rank (see docs/distributed.md). An engine owns the backbone, its optimizer, and
the backward pass; the trainer owns the head's optimizer and the loss scaler.

Precision:
* DDP: fp32, bf16 autocast, or fp16 autocast with a ``torch.amp.GradScaler`` whose scale covers the
  backbone and the head together (both optimizers are unscaled and skipped together).
* DeepSpeed: the engine runs in fp32 and bf16 comes from autocast, because DeepSpeed's own bf16/fp16
  modes cast BatchNorm buffers and then fail on them. fp16 with DeepSpeed is refused with a clear
  message: its loss scaler cannot cover the head's separate optimizer.

Modules: ``base`` (the interface), ``ddp``, ``deepspeed``, ``zero_checkpoint`` (the backbone
optimizer's checkpoint views). DeepSpeed is imported only when its engine is built.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Engine
from .ddp import DDPEngine
from .deepspeed import DeepSpeedEngine
from .zero_checkpoint import BY_NAME, TorchOptimizerCheckpoint, ZeroOptimizerCheckpoint

__all__ = ["Engine", "DDPEngine", "DeepSpeedEngine", "build_engine", "BY_NAME", "TorchOptimizerCheckpoint",
           "ZeroOptimizerCheckpoint"]


def build_engine(
    kind: str, module: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device, world_size: int,
    precision: str = "fp32", zero_stage: int = 0, micro_batch: int = 1, grad_accumulation: int = 1,
    grad_clip: float = 0.0, find_unused_parameters: bool = False, bucket_cap_mb: float = 25.0,
) -> Engine:
    """Wraps the backbone in the configured data-parallel engine.

    Args:
        kind: ``"ddp"`` or ``"deepspeed"``.
        module: The backbone on ``device``.
        optimizer: The backbone's optimizer.
        device: Its device.
        world_size: Number of ranks.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        zero_stage: DeepSpeed ZeRO stage (0, 1 or 2).
        micro_batch: Per-rank batch (DeepSpeed's config needs it).
        grad_accumulation: Micro-steps per optimizer step.
        grad_clip: Backbone clipping for DeepSpeed (DDP clipping is global, done by the trainer).
        find_unused_parameters: DDP option.
        bucket_cap_mb: DDP option.
    """
    if kind == "ddp":
        return DDPEngine(module, optimizer, device, world_size, find_unused_parameters, bucket_cap_mb)
    if kind == "deepspeed":
        if precision == "fp16":
            raise ValueError(
                "precision.dtype='fp16' is not supported with DeepSpeed here: its loss scaler cannot cover the "
                "head's separate optimizer. Use precision.dtype='bf16', or distributed.engine='ddp' for fp16"
            )
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"distributed.zero_stage must be 0, 1 or 2, got {zero_stage}")
        return DeepSpeedEngine(module, optimizer, zero_stage, micro_batch, grad_accumulation, world_size, grad_clip)
    raise ValueError(f"unknown engine {kind!r}; use 'ddp' or 'deepspeed'")
