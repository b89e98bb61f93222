"""Epoch bookkeeping: micro-batches from the loader, across epoch boundaries, counted in the state."""

from __future__ import annotations

import torch

from .state import TrainState

__all__ = ["EpochFeed"]


class EpochFeed:
    """Hands out the next micro-batch and keeps ``state.epoch``/``state.position`` current.

    The loader's order is a function of ``(seed, epoch, position)``, so the feed starts where the
    state says (a resumed run continues mid-epoch). The next epoch starts lazily, when a batch is
    asked for after the last one: a run that stops at the end of an epoch saves ``position`` =
    the epoch's length and its resume starts the next epoch, exactly as the uninterrupted run does.
    A gradient-accumulation step may span an epoch boundary.

    Args:
        loader: The train loader (``set_epoch(epoch, position)``, iterable of ``(images, labels)``).
        state: The run's counters (updated in place).
        device: Where the batch goes.
        batch_size: The configured per-rank batch (every rank needs equal batches).
    """

    def __init__(self, loader, state: TrainState, device: torch.device, batch_size: int) -> None:
        self.loader, self.state, self.device, self.batch_size = loader, state, device, batch_size
        self._it = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(images [B, 3, H, W], labels [B])`` on the device; advances ``state.position``."""
        while True:
            if self._it is None:
                self.loader.set_epoch(self.state.epoch, self.state.position)
                self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is not None:
                break
            self._it = None
            self.state.epoch += 1
            self.state.position = 0
        images = batch[0].to(self.device, non_blocking=True)
        labels = batch[1].to(self.device, non_blocking=True)
        if images.shape[0] != self.batch_size:
            # The head's all-gathers need equal batches on every rank; the loaders pad or drop the
            # tail, so this is a host-side shape check (the head's own collective check is off, see
            # PartialFCHead.defer_input_checks).
            raise ValueError(f"the loader delivered a batch of {images.shape[0]} images, "
                             f"data.batch_size is {self.batch_size}")
        self.state.position += images.shape[0]
        return images, labels
