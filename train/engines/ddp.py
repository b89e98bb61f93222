"""DistributedDataParallel (or the plain module on one process) around the backbone."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .base import Engine

__all__ = ["DDPEngine"]


class DDPEngine(Engine):
    """DistributedDataParallel over the default group (or plain module on one process).

    Args:
        module: The backbone, already on its device.
        optimizer: Its optimizer.
        device: The device (``device_ids`` for CUDA).
        world_size: Number of ranks; DDP is skipped at 1.
        find_unused_parameters: DDP option.
        bucket_cap_mb: DDP gradient bucket size.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 world_size: int, find_unused_parameters: bool = False, bucket_cap_mb: float = 25.0) -> None:
        self.module = module
        self.optimizer = optimizer
        self.wrapped: nn.Module = module
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.wrapped = DDP(
                module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters, bucket_cap_mb=bucket_cap_mb,
                # Rank 0's BatchNorm statistics are broadcast at init and each forward, so every
                # rank holds the same buffers and a checkpoint (written from rank 0) resumes
                # exactly on any rank. (torch 2.13's name for the deprecated broadcast_buffers=True.)
                forward_sync_buffers=True,
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapped(images)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") else contextlib.nullcontext()
