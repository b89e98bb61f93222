"""``build_train_loader``: the single entry point of the training data path."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from .base import TrainLoader
from .dataset import FaceRecordDataset
from .sampling import Tail

Kind = Literal["dali", "torch", "synthetic"]


def build_train_loader(
    kind: Kind,
    rec_path: str | os.PathLike[str] | list[str] | None = None,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    shuffle: bool = True,
    flip: bool = True,
    tail: Tail = "drop",
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
    num_workers: int = 2,
    image_size: int = 112,
    strict: bool = False,
    idx_path: str | os.PathLike[str] | None = None,
    dataset: FaceRecordDataset | None = None,
    num_classes: int | None = None,
    num_samples: int | None = None,
    decoder: Literal["auto", "simplejpeg", "pil"] = "auto",
    gpu_options: dict[str, Any] | None = None,
    epoch: int = 0,
    position: int = 0,
) -> TrainLoader:
    """Builds a sharded, resumable training loader.

    Every kind yields ``(images, labels)`` batches with ``images [B, 3, S, S]``
    (``S = image_size``) normalised as ``(x - 127.5) / 127.5`` in ``dtype`` and
    ``memory_format``, and ``labels [B] int64``, both on ``device``. Every rank
    yields ``len(loader)`` full batches per epoch.

    Sharding: a seeded permutation of all images per epoch; rank ``r`` takes
    every ``world_size``-th sample starting at ``r``. ``rank``/``world_size`` are
    the GLOBAL rank and world size, passed in explicitly (torch.distributed is
    never queried here).

    Args:
        kind: ``"dali"`` (DALI decode; CPU when ``device`` is cpu, nvJPEG when
            cuda), ``"torch"`` (DataLoader workers + simplejpeg/PIL) or
            ``"synthetic"`` (random tensors on ``device``).
        rec_path: The training ``.rec``, a shard manifest ``.json`` written by
            ``pack --shards`` or a list of plain ``.rec`` shards (not needed for
            ``synthetic``).
        batch_size: Per-rank batch size ``B``.
        rank: Global rank, the shard id.
        world_size: Global world size, the number of shards.
        device: Where batches are delivered.
        seed: Seed of the per-epoch shuffles and flips.
        shuffle: Reshuffle every epoch; False keeps file order.
        flip: Random horizontal flips (p = 0.5), fixed per (seed, epoch, position).
        tail: ``"drop"`` the samples that do not fill a global batch (default) or
            ``"pad"`` by repeating samples from the start of the epoch order.
        dtype: ``torch.float32`` / ``torch.float16`` / ``torch.bfloat16``.
        memory_format: ``torch.contiguous_format`` or ``torch.channels_last``.
        num_workers: DataLoader workers (torch) or DALI threads (dali).
        image_size: Output side; records of another size are center-cropped/padded.
        strict: Raise ``CorruptImageError`` on an undecodable record instead of
            skipping it (the batch then reuses another of its images; see
            ``loader.skipped``).
        idx_path: The ``.idx`` (default: next to ``rec_path``, else scan).
        dataset: An already opened dataset (instead of ``rec_path``).
        num_classes: Synthetic: label range. Plain files: class count to check.
        num_samples: Synthetic: virtual dataset size (default ``100 * B * world_size``).
        decoder: JPEG decoder of the torch loader.
        gpu_options: DALI mixed-decoder overrides (``dali.GPU_DECODER_DEFAULTS``).
        epoch: Initial epoch.
        position: Initial per-rank sample position within ``epoch`` (resume).

    Returns:
        A ``TrainLoader``: iterable, ``len()`` = batches per epoch, ``set_epoch``,
        ``state_dict``/``load_state_dict``, ``num_classes``, ``class_counts``
        (``[C] int64``) and ``skipped`` (undecodable records seen).

    Raises:
        ValueError: Bad argument combination (message says what to change).
    """
    common: dict[str, Any] = dict(
        batch_size=batch_size, rank=rank, world_size=world_size, device=torch.device(device),
        seed=seed, shuffle=shuffle, flip=flip, tail=tail, dtype=dtype,
        memory_format=memory_format, image_size=image_size,
    )
    loader: TrainLoader
    if kind == "synthetic":
        from .random_loader import SyntheticLoader

        if num_classes is None:
            raise ValueError("kind='synthetic' needs num_classes")
        n = num_samples if num_samples is not None else 100 * batch_size * world_size
        loader = SyntheticLoader(num_classes=num_classes, num_samples=n, **common)
    elif kind in ("dali", "torch"):
        if dataset is None:
            if rec_path is None:
                raise ValueError(f"kind={kind!r} needs rec_path (or dataset)")
            dataset = FaceRecordDataset(rec_path, idx_path, num_classes=num_classes)
        if kind == "dali":
            from .dali import DaliRecordLoader

            loader = DaliRecordLoader(dataset, num_threads=num_workers, strict=strict,
                                      gpu_options=gpu_options, **common)
        else:
            from .torch_loader import TorchRecordLoader

            loader = TorchRecordLoader(dataset, num_workers=num_workers, decoder=decoder,
                                       strict=strict, **common)
    else:
        raise ValueError(f"unknown loader kind {kind!r}; use 'dali', 'torch' or 'synthetic'")
    loader.set_epoch(epoch, position)
    return loader
