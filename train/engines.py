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
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

__all__ = ["Engine", "DDPEngine", "DeepSpeedEngine", "build_engine"]


class Engine:
    """Common interface: ``engine(images) -> embeddings``, ``backward``, ``step``, ``no_sync``."""

    module: nn.Module  # the unwrapped backbone
    optimizer: torch.optim.Optimizer
    clips_own_grads = False  # True when the engine clips the backbone itself (DeepSpeed)
    replicated_grads = True  # backbone gradients identical on all ranks after backward

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


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
        self.replicated_grads = zero_stage == 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.ds(images)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps itself; the trainer passes the
        # undivided micro-step loss to it (see Trainer._micro_step).
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes after its own step

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


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
