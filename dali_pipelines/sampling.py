"""Per-epoch, per-rank sample order shared by every loader kind.

The order is a pure function of ``(num_samples, batch_size, world_size, rank,
seed, epoch, shuffle, tail)``, so DALI, the PyTorch fallback and a resumed run
all see the same samples in the same order, and the flip decision of each
sample is fixed by its position in the epoch.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Tail = Literal["drop", "pad"]


def _check(num_samples: int, batch_size: int, rank: int, world_size: int, tail: str) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if tail not in ("drop", "pad"):
        raise ValueError(f"tail must be 'drop' or 'pad', got {tail!r}")
    if num_samples < 1:
        raise ValueError("the dataset has no samples")


def epoch_total(num_samples: int, batch_size: int, world_size: int, tail: Tail) -> int:
    """Samples per epoch summed over ranks after tail handling.

    ``drop`` keeps the largest multiple of ``batch_size * world_size`` (the last
    samples of the shuffled order are dropped, different ones each epoch);
    ``pad`` rounds up, repeating samples from the start of the order.
    """
    _check(num_samples, batch_size, 0, world_size, tail)
    g = batch_size * world_size
    if tail == "drop":
        total = (num_samples // g) * g
        if total == 0:
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of {batch_size} x "
                f"{world_size} ranks; lower batch_size or use tail='pad'"
            )
        return total
    return -(-num_samples // g) * g


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, tail: Tail) -> int:
    """Batches each rank yields per full epoch (identical on every rank)."""
    return epoch_total(num_samples, batch_size, world_size, tail) // (batch_size * world_size)


def epoch_order(
    num_samples: int,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    tail: Tail = "drop",
) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices and flip flags one rank sees in one epoch.

    The global order is a permutation seeded by ``(seed, epoch)``; rank ``r``
    takes positions ``r, r + W, r + 2W, ...`` of it, so shards are disjoint
    (except for ``pad`` repeats) and together cover the kept samples.

    Returns:
        ``(indices [M] int64, flips [M] bool)`` with
        ``M = batches_per_epoch(...) * batch_size``.
    """
    _check(num_samples, batch_size, rank, world_size, tail)
    total = epoch_total(num_samples, batch_size, world_size, tail)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    else:
        order = np.arange(num_samples, dtype=np.int64)
    order = np.resize(order, total) if total > num_samples else order[:total]
    # Flips are drawn per global position, so they do not depend on world_size.
    flips = np.random.default_rng([seed, epoch, 1]).random(total) < 0.5
    return order[rank::world_size].astype(np.int64), flips[rank::world_size]
