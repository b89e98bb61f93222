"""Per-epoch, per-rank sample order shared by every loader kind.

The order is a pure function of ``(num_samples, batch_size, world_size, rank,
seed, epoch, shuffle, tail)``, so DALI, the PyTorch fallback and a resumed run
all see the same samples in the same order, and the flip decision of each
sample is fixed by its position in the epoch.

The epoch's global permutation is never materialised: it is a keyed bijection
of ``[0, N)`` (a 4-round Feistel network on the smallest even-bit power-of-two
domain >= N, with cycle walking back into ``[0, N)``) evaluated only at the
positions a rank owns, and each flip is one bit of a hash of the position. A
rank's memory is therefore proportional to its own share, ``N / world_size``,
not to N (at WebFace42M's 42.5M images and 8 ranks: ~48 MB instead of ~700 MB).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_CHUNK = 1 << 18  # positions evaluated per step: bounds the temporaries


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on ``uint64`` arrays (wrapping arithmetic); a bijection."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> int:
    """A 64-bit key from integers (seed, epoch, stream), mixed like splitmix64."""
    h = 0x6A09E667F3BCC909
    for p in parts:
        h = (h ^ (int(p) & _M64)) * _GOLDEN & _M64
        h = int(_mix64(np.array([h], dtype=np.uint64))[0])
    return h


def _feistel(x: np.ndarray, half_bits: int, keys: list[int]) -> np.ndarray:
    """One pass of the keyed Feistel bijection on ``[0, 2**(2*half_bits))``."""
    mask = np.uint64((1 << half_bits) - 1)
    hb = np.uint64(half_bits)
    left, right = x >> hb, x & mask
    for k in keys:
        f = _mix64(right ^ np.uint64(k)) & mask
        left, right = right, left ^ f
    return (left << hb) | right


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Image of ``positions`` (each in ``[0, n)``) under the epoch's permutation of ``[0, n)``.

    A pure function of ``(n, seed, epoch)``; evaluating it at all of ``[0, n)``
    gives a permutation. Cycle walking: values that land outside ``[0, n)`` are
    mapped again until they are inside (the domain is < 4n, so few steps).

    Args:
        positions: ``[M]`` integers in ``[0, n)``.

    Returns:
        ``[M] int64``.
    """
    bits = max(2, int(n - 1).bit_length())
    half = (bits + 1) // 2
    keys = [_key(seed, epoch, 0x5EED, r) for r in range(4)]
    out = np.empty(len(positions), dtype=np.int64)
    un = np.uint64(n)
    with np.errstate(over="ignore"):
        for lo in range(0, len(positions), _CHUNK):
            y = _feistel(np.asarray(positions[lo : lo + _CHUNK], dtype=np.uint64), half, keys)
            out_of = np.flatnonzero(y >= un)
            while out_of.size:
                y[out_of] = _feistel(y[out_of], half, keys)
                out_of = out_of[y[out_of] >= un]
            out[lo : lo + _CHUNK] = y.astype(np.int64)
    return out


def flip_bits(positions: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """``[M] bool`` flip decision of each global epoch position (a hash bit, p = 0.5)."""
    k = np.uint64(_key(seed, epoch, 0xF11B))
    out = np.empty(len(positions), dtype=bool)
    with np.errstate(over="ignore"):
        for lo in range(0, len(positions), _CHUNK):
            p = np.asarray(positions[lo : lo + _CHUNK], dtype=np.uint64)
            out[lo : lo + _CHUNK] = (_mix64(p * np.uint64(_GOLDEN) ^ k) >> np.uint64(63)).astype(bool)
    return out

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

    The global order is a permutation of ``[0, N)`` keyed by ``(seed, epoch)``
    (``permute``); rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of it,
    so shards are disjoint (except for ``pad`` repeats) and together cover the
    kept samples. Only this rank's positions are evaluated.

    Returns:
        ``(indices [M] int64, flips [M] bool)`` with
        ``M = batches_per_epoch(...) * batch_size``.
    """
    _check(num_samples, batch_size, rank, world_size, tail)
    total = epoch_total(num_samples, batch_size, world_size, tail)
    pos = np.arange(rank, total, world_size, dtype=np.int64)
    # ``pad`` repeats the start of the order: position p >= N shows sample order[p - N].
    wrapped = pos % num_samples if total > num_samples else pos
    order = permute(wrapped, num_samples, seed, epoch) if shuffle else wrapped
    # Flips are drawn per global position, so they do not depend on world_size.
    flips = flip_bits(pos, seed, epoch)
    return order, flips
