"""The engine interface: what the trainer may ask of the data-parallel wrapper around the backbone."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

from .zero_checkpoint import TorchOptimizerCheckpoint

__all__ = ["Engine"]


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

    @property
    def checkpoint_optimizer(self):
        """What the checkpoint saves and loads the backbone optimizer through: an object with
        ``state_dict()`` (collective when its ``collective`` is True: every rank calls it, rank 0's
        result is saved) and ``load_state_dict(state)`` (every rank)."""
        return TorchOptimizerCheckpoint(self.optimizer, self.module)

    def optimizer_state_for_checkpoint(self):
        """What ``save_checkpoint`` gets as ``backbone_optimizer``: the checkpoint view itself, or,
        when gathering its state is collective (ZeRO-1/2), the gathered state (every rank calls this)."""
        view = self.checkpoint_optimizer
        return view.state_dict() if view.collective else view

    def weights_loaded(self) -> None:
        """Called after the backbone's weights were replaced (resume, ``model.init_from``)."""

    # ---------------------------------------------- what one training step asks of the engine
    # The defaults are DDP's; DeepSpeed overrides them (it owns the backward's reduction, its own
    # micro-step count and the backbone's clipping). The trainer has no engine-specific branch.
    def micro_step_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Entered around a micro-step's forward and backward: gradients are reduced only on the
        optimizer step's last micro-step."""
        return contextlib.nullcontext() if last else self.no_sync()

    def nonfinite_loss(self, loss: torch.Tensor) -> Optional[str]:
        """Why this micro-step's backward must not run, or ``None``. The default reads nothing: a
        non-finite loss is a device flag read with the step's verdict, and the step's gradients are
        dropped then."""
        return None

    def micro_backward(self, loss: torch.Tensor, scaler, accum: int, last: bool) -> None:
        """Backward of one micro-step's loss (scaled by the fp16 loss scaler, averaged over ``accum``)."""
        scaler.scale(loss / accum).backward()

    def skip_micro_backward(self, last: bool) -> None:
        """Called instead of :meth:`micro_backward` for a micro-step whose loss is not finite."""

    def null_step(self, clear_grads: bool) -> None:
        """Called instead of the optimizer step when the step is skipped (non-finite). Nothing to do
        for a torch optimizer: the trainer simply does not step it."""

    def grad_norm_params(self) -> list[torch.nn.Parameter]:
        """Backbone parameters whose gradients enter the global norm (none when partitioned)."""
        return list(self.module.parameters()) if self.replicated_grads else []

    def clip_params(self) -> list[torch.nn.Parameter]:
        """Backbone parameters the trainer clips with the global norm (none when the engine clips)."""
        return [] if self.clips_own_grads else list(self.module.parameters())
