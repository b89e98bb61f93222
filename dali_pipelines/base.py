"""Common state and output conversion of the training loaders.

Every loader kind yields ``(images, labels)``: ``images [B, 3, H, W]`` in the
requested dtype and memory format, normalised as ``(x - 127.5) / 127.5``, and
``labels [B] int64``, both on the requested device.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from .sampling import Tail, batches_per_epoch, epoch_order

log = logging.getLogger("dali_pipelines")

Batch = tuple[torch.Tensor, torch.Tensor]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FORMATS = (torch.contiguous_format, torch.channels_last)


class CorruptImageError(ValueError):
    """An image record does not decode (raised only with ``strict=True``)."""


class TrainLoader:
    """Base class: epoch/position bookkeeping and the output contract.

    Args:
        num_samples: Images in the dataset (before sharding).
        batch_size: Per-rank batch size ``B``.
        rank: Global rank (shard id).
        world_size: Number of ranks (shards).
        device: Where batches are delivered.
        seed: Seeds the per-epoch shuffle and flips.
        shuffle: Reshuffle every epoch (else file order).
        flip: Random horizontal flip with probability 0.5.
        tail: ``"drop"`` or ``"pad"`` (see ``sampling.epoch_total``).
        dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``.
        memory_format: ``torch.contiguous_format`` or ``torch.channels_last``.
        image_size: Output height and width.
    """

    kind = "base"

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
        shuffle: bool,
        flip: bool,
        tail: Tail,
        dtype: torch.dtype,
        memory_format: torch.memory_format,
        image_size: int,
    ) -> None:
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if memory_format not in _FORMATS:
            raise TypeError(f"memory_format must be contiguous_format or channels_last, got {memory_format}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.flip = bool(flip)
        self.tail: Tail = tail
        self.dtype = dtype
        self.memory_format = memory_format
        self.image_size = int(image_size)
        self._num_batches = batches_per_epoch(self.num_samples, self.batch_size, self.world_size, tail)
        self.epoch = 0
        self.position = 0
        self.skipped = 0
        self._warned: set[int] = set()

    # -------------------------------------------------------------------------- contract

    def __len__(self) -> int:
        """Batches per full epoch, the same on every rank."""
        return self._num_batches

    @property
    def samples_per_rank(self) -> int:
        """Samples each rank yields per full epoch."""
        return self._num_batches * self.batch_size

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Selects the epoch (its shuffle) and the per-rank sample position to start at.

        Args:
            epoch: Epoch number; the order is a function of ``(seed, epoch)``.
            position: Samples of this epoch this rank already consumed; a
                multiple of ``batch_size`` in ``[0, samples_per_rank]``.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if position < 0 or position > self.samples_per_rank or position % self.batch_size:
            raise ValueError(
                f"position must be a multiple of batch_size={self.batch_size} in "
                f"[0, {self.samples_per_rank}], got {position}; resume from state_dict()"
            )
        self.epoch = int(epoch)
        self.position = int(position)

    def resume(self, epoch: int, position: int) -> None:
        """Alias of ``set_epoch(epoch, position)``."""
        self.set_epoch(epoch, position)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}`` to pass back to ``load_state_dict`` on restart."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores a ``state_dict()``."""
        self.set_epoch(int(state["epoch"]), int(state["position"]))

    def remaining_batches(self) -> int:
        """Batches the next iteration will yield."""
        return (self.samples_per_rank - self.position) // self.batch_size

    def epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [M], flips [M])`` of the remaining samples of the current epoch."""
        idx, flips = epoch_order(
            self.num_samples, batch_size=self.batch_size, rank=self.rank, world_size=self.world_size,
            seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, tail=self.tail,
        )
        if not self.flip:
            flips = np.zeros_like(flips)
        return idx[self.position :], flips[self.position :]

    def __iter__(self) -> Iterator[Batch]:
        """Yields the remaining batches of the current epoch, then moves to the next epoch."""
        for batch in self._iter_batches():
            self.position += self.batch_size
            yield batch
        self.epoch += 1
        self.position = 0

    def _iter_batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    # -------------------------------------------------------------------------- helpers

    def _note_skip(self, where: str, key: int, reason: str) -> None:
        """Counts a skipped record and warns once per record."""
        self.skipped += 1
        if key not in self._warned:
            self._warned.add(key)
            msg = f"skipping undecodable image {where}: {reason}"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, *, layout: str, normalized: bool) -> Batch:
        """Moves a batch to the device and applies dtype/format/normalisation.

        Args:
            images: ``[B, H, W, 3]`` (layout ``"NHWC"``) or ``[B, 3, H, W]`` (``"NCHW"``),
                uint8 when not ``normalized``.
            labels: ``[B]`` integer labels.
        """
        if not normalized and self.device.type == "cpu" and layout == "NHWC":
            images = _normalize_nhwc_numpy(images, self.memory_format == torch.channels_last)
            layout, normalized = "NCHW", True
        images = images.to(self.device, non_blocking=True)
        if layout == "NHWC":
            images = images.permute(0, 3, 1, 2)  # a channels_last view, no copy
        if not normalized:
            images = images.to(torch.float32).sub_(127.5).div_(127.5)
        if images.dtype != self.dtype:
            images = images.to(self.dtype)
        images = images.contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True).to(torch.int64).reshape(-1)
        return images, labels


def _normalize_nhwc_numpy(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 -> ``[B, 3, H, W]`` float32 ``(x - 127.5) / 127.5`` on the CPU.

    numpy rather than torch: torch's OpenMP pool busy-waits after each parallel
    op, which on a small machine steals the cores the decode workers need.
    """
    a = images.numpy()
    if not channels_last:
        a = np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # transpose while 1 byte/px
    y = a.astype(np.float32)
    y -= np.float32(127.5)
    y /= np.float32(127.5)
    t = torch.from_numpy(y)
    return t if not channels_last else t.permute(0, 3, 1, 2)
