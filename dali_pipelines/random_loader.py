"""Synthetic-tensor loader: random batches made on the device, for throughput runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .base import Batch, TrainLoader


class SyntheticLoader(TrainLoader):
    """Yields random normalised images and random labels, generated on the device.

    A fixed pool of batches is generated once per epoch and cycled, so the
    loader costs (almost) nothing and measures the consumer alone.

    Args:
        num_classes: Labels are drawn from ``[0, num_classes)``.
        num_samples: Virtual dataset size (sets ``len()``).
        pool: Distinct batches generated per epoch.
        **kwargs: ``TrainLoader`` arguments.
    """

    kind = "synthetic"

    def __init__(self, *, num_classes: int, num_samples: int, pool: int = 4, **kwargs: Any) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(num_samples, **kwargs)
        self.num_classes = int(num_classes)
        self.class_counts = np.bincount(
            np.arange(self.num_samples) % self.num_classes, minlength=self.num_classes
        ).astype(np.int64)
        self.pool = max(1, int(pool))

    def _iter_batches(self) -> Iterator[Batch]:
        g = torch.Generator(device=self.device)
        g.manual_seed(hash((self.seed, self.epoch, self.rank)) & 0x7FFFFFFF)
        s, b = self.image_size, self.batch_size
        batches = []
        for _ in range(min(self.pool, self.remaining_batches())):
            x = torch.rand((b, 3, s, s), generator=g, device=self.device).mul_(2).sub_(1)
            x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
            y = torch.randint(0, self.num_classes, (b,), generator=g, device=self.device)
            batches.append((x, y))
        for k in range(self.remaining_batches()):
            yield batches[k % len(batches)]
