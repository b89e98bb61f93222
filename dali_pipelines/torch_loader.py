"""PyTorch fallback loader: RecordIO reader + CPU JPEG decode in DataLoader workers.

A worker decodes a whole batch per task (one IPC message per batch instead of
per image) into a shared-memory uint8 NHWC buffer and flips it there. The
float conversion (transpose, normalise, dtype) happens in the consuming
process, on the target device: shipping uint8 moves 4x fewer bytes than
float32, and measured on a 2-core machine this beat normalising in the
workers (``normalize_in_workers=True``) per CPU-second (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .base import Batch, CorruptImageError, TrainLoader
from .dataset import FaceRecordDataset
from .decode import Backend, fit_size, get_decoder

BatchSpec = tuple[np.ndarray, np.ndarray, int]  # (indices [B], flips [B], ring slot or -1)
Failure = tuple[int, str, str]  # (image index, location, reason)


class BatchDecoder(Dataset[tuple[torch.Tensor | int, torch.Tensor, list[Failure]]]):
    """Maps a batch spec ``(indices [B], flips [B], slot)`` to a decoded batch.

    With a ``ring`` (shared-memory ``[R, B, S, S, 3]`` uint8, created before the
    workers fork) and ``slot >= 0``, the batch is decoded into ``ring[slot]`` and
    only the slot number travels back: no per-batch shared-memory segment, file
    descriptor passing or page faults.

    Args:
        dataset: The image records.
        image_size: Output side; other sizes are center-cropped/padded.
        backend: JPEG decoder (see ``decode.get_decoder``).
        normalize: Return float32 NCHW normalised images instead of uint8 NHWC.
        channels_last: With ``normalize``, return channels_last memory format.
        strict: Raise ``CorruptImageError`` on an undecodable record instead of
            substituting another image of the same batch.
        ring: Optional shared output buffers (see above).
    """

    def __init__(self, dataset: FaceRecordDataset, image_size: int = 112, backend: Backend = "auto",
                 normalize: bool = True, channels_last: bool = False, strict: bool = False,
                 ring: torch.Tensor | None = None) -> None:
        self.ring = ring
        self.dataset = dataset
        self.image_size = image_size
        self.backend = backend
        self.normalize = normalize
        self.channels_last = channels_last
        self.strict = strict

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, spec: BatchSpec) -> tuple[torch.Tensor | int, torch.Tensor, list[Failure]]:  # type: ignore[override]
        indices, flips = spec[0], spec[1]
        slot = spec[2] if len(spec) > 2 else -1
        decode = get_decoder(self.backend)
        s = self.image_size
        use_ring = self.ring is not None and slot >= 0 and not self.normalize
        if use_ring:
            assert self.ring is not None
            out_t = self.ring[slot, : len(indices)]
        else:
            out_t = torch.empty((len(indices), s, s, 3), dtype=torch.uint8)
        out = out_t.numpy()
        ok = np.ones(len(indices), dtype=bool)
        failures: list[Failure] = []
        for j, i in enumerate(indices):
            try:
                img = decode(self.dataset.encoded_image(int(i)))
                if img.ndim != 3 or img.shape[2] != 3:
                    raise ValueError(f"decoded to shape {img.shape}, expected [H, W, 3]")
                out[j] = fit_size(img, s)
            except Exception as e:  # any decoder failure means "this record is bad"
                where = self.dataset.where(int(i))
                if self.strict:
                    raise CorruptImageError(
                        f"cannot decode image {where}: {e}; pass strict=False to skip such records"
                    ) from e
                ok[j] = False
                failures.append((int(i), where, f"{type(e).__name__}: {e}"))
        labels = np.array(self.dataset.labels[np.asarray(indices, dtype=np.int64)], dtype=np.int64)
        if failures:
            good = np.nonzero(ok)[0]
            if good.size == 0:
                raise CorruptImageError(
                    f"no image of a batch decodes (first: {failures[0][1]}: {failures[0][2]})"
                )
            # Keep the batch size fixed (ranks must agree): reuse a good sample.
            for j in np.nonzero(~ok)[0]:
                out[j] = out[good[0]]
                labels[j] = labels[good[0]]
        flips = np.asarray(flips, dtype=bool)
        if flips.any():
            out[flips] = out[flips, :, ::-1]
        images = out_t
        if self.normalize:
            images = images.permute(0, 3, 1, 2)  # channels_last view of NHWC
            if not self.channels_last:
                # Transpose while still uint8: 4x fewer bytes to move than in float.
                images = images.contiguous()
            images = images.to(torch.float32).sub_(127.5).div_(127.5)
        return (slot if use_ring else images), torch.from_numpy(labels), failures


class _SpecSampler:
    """Sampler whose batch specs are replaced every epoch (keeps workers persistent)."""

    def __init__(self) -> None:
        self.specs: Sequence[BatchSpec] = []

    def __iter__(self) -> Iterator[BatchSpec]:
        return iter(list(self.specs))

    def __len__(self) -> int:
        return len(self.specs)


class TorchRecordLoader(TrainLoader):
    """Fallback loader; see ``build_train_loader(kind="torch")`` for arguments.

    Args:
        dataset: The image records.
        num_workers: DataLoader worker processes (0: decode in the caller).
        decoder: JPEG decoder backend.
        strict: Raise on undecodable records instead of skipping them.
        prefetch_factor: Batches each worker keeps in flight.
        normalize_in_workers: Convert to float in the workers (CPU device only).
        **kwargs: ``TrainLoader`` arguments.
    """

    kind = "torch"

    def __init__(self, dataset: FaceRecordDataset, *, num_workers: int = 2, decoder: Backend = "auto",
                 strict: bool = False, prefetch_factor: int = 4, normalize_in_workers: bool = False,
                 **kwargs: object) -> None:
        super().__init__(len(dataset), **kwargs)  # type: ignore[arg-type]
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        on_cpu = self.device.type == "cpu" and normalize_in_workers
        self._decoder = BatchDecoder(
            dataset, self.image_size, decoder, normalize=on_cpu,
            channels_last=self.memory_format == torch.channels_last, strict=strict,
        )
        self._normalized = on_cpu
        self._ring_slots = 0
        if self.num_workers > 0 and not on_cpu:
            # A slot is reused only after the batch that used it was consumed: at
            # most prefetch_factor * num_workers tasks are in flight, plus the one
            # being converted. An abandoned epoch is drained by the DataLoader
            # (persistent workers finish stale tasks before acknowledging the reset).
            self._ring_slots = self.prefetch_factor * self.num_workers + 2
            ring = torch.empty((self._ring_slots, self.batch_size, self.image_size, self.image_size, 3),
                               dtype=torch.uint8).share_memory_()
            self._decoder.ring = ring
        self._sampler = _SpecSampler()
        self._dl: DataLoader | None = None  # type: ignore[type-arg]

    @property
    def num_classes(self) -> int:
        """Classes in the dataset."""
        return self.dataset.num_classes

    @property
    def class_counts(self) -> np.ndarray:
        """``[num_classes] int64`` images per class."""
        return self.dataset.class_counts

    def batch_specs(self) -> list[BatchSpec]:
        """The remaining batches of the current epoch as ``(indices, flips, slot)``."""
        idx, flips = self.epoch_plan()
        b, r = self.batch_size, self._ring_slots
        return [(idx[i : i + b], flips[i : i + b], (k % r) if r else -1)
                for k, i in enumerate(range(0, len(idx), b))]

    def _iter_batches(self) -> Iterator[Batch]:
        self._sampler.specs = self.batch_specs()
        if not self._sampler.specs:
            return
        if self._dl is None:
            kw: dict[str, object] = {}
            if self.num_workers > 0:
                # Workers outlive epochs (no fork + warm-up per epoch); the sampler
                # is read in this process, so swapping its specs is enough.
                kw = {"prefetch_factor": self.prefetch_factor, "persistent_workers": True}
            self._dl = DataLoader(
                self._decoder, batch_size=None, sampler=self._sampler, num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda" and not self._ring_slots,
                **kw,  # type: ignore[arg-type]
            )
        for images, labels, failures in self._dl:
            if isinstance(images, int):
                assert self._decoder.ring is not None
                images = self._decoder.ring[images]  # converted (copied) by _finish below
            for i, where, reason in failures:
                self._note_skip(where, int(self.dataset.image_keys[i]), reason)
            if self._normalized:
                yield self._finish(images, labels, layout="NCHW", normalized=True)
            else:
                yield self._finish(images, labels, layout="NHWC", normalized=False)
