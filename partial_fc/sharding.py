"""The class partition across ranks and the Partial FC class sampler.

Both are pure functions of their arguments, so every rank computes the same answer without
communicating, and a checkpoint written on N ranks can be re-cut for M ranks by the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ClassPartition", "SampledClasses", "sample_classes", "step_seed", "con_step_seed"]


@dataclass(frozen=True)
class ClassPartition:
    """Contiguous shards of ``num_classes`` over ``world_size`` ranks.

    The first ``num_classes % world_size`` ranks own one class more than the others, so sizes
    differ by at most one (10 classes on 4 ranks: 3, 3, 2, 2). The same partition shards the class
    centers W, the cluster centers C, the concentrations phi and all per-class counters.

    Attributes:
        num_classes: Total number of identities.
        world_size: Number of ranks.
    """

    num_classes: int
    world_size: int

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be positive, got {self.world_size}")
        if self.num_classes < self.world_size:
            raise ValueError(
                f"num_classes ({self.num_classes}) is smaller than world_size ({self.world_size}): "
                "every rank must own at least one class"
            )

    def size(self, rank: int) -> int:
        """Number of classes owned by ``rank``."""
        base, extra = divmod(self.num_classes, self.world_size)
        return base + (1 if rank < extra else 0)

    def start(self, rank: int) -> int:
        """First class id owned by ``rank``."""
        base, extra = divmod(self.num_classes, self.world_size)
        return rank * base + min(rank, extra)

    def range(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` of the classes owned by ``rank``."""
        s = self.start(rank)
        return s, s + self.size(rank)

    def owner(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Rank owning each class id.

        Args:
            class_ids: ``[N]`` int64 in ``[0, num_classes)``.

        Returns:
            ``[N]`` int64 ranks.
        """
        base, extra = divmod(self.num_classes, self.world_size)
        big = extra * (base + 1)  # classes held by the ranks that own one extra
        small_rank = extra + (class_ids - big) // max(base, 1)
        return torch.where(class_ids < big, class_ids // (base + 1), small_rank)


@dataclass
class SampledClasses:
    """The classes one rank scores this step.

    Attributes:
        index: ``[K]`` int64, sorted local class indices (0-based within the shard) that are scored.
            ``None`` means every local class (sample rate 1), which avoids a gather of W.
        target: ``[N]`` int64, for each sample of the global batch the column of its class in the
            sampled set, or ``-1`` when its class lives on another rank.
        num_sampled: ``K``.
    """

    index: torch.Tensor | None
    target: torch.Tensor
    num_sampled: int


def step_seed(seed: int, step: int, rank: int) -> int:
    """Mixes (seed, step, rank) into one 63-bit generator seed (splitmix64 finaliser).

    Mixing rather than adding keeps nearby (seed, step) pairs from producing correlated streams.
    """
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def con_step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the Con loss's own class sample (``con_sample_rate``) at (seed, step, rank).

    The CE sample's seed :func:`step_seed` mixed once more with a stream tag: deterministic, and a
    stream of its own, so the two samples are independent draws.
    """
    return step_seed(step_seed(seed, step, rank), 0xC0, 0xC0)


def sample_classes(
    global_labels: torch.Tensor,
    class_start: int,
    num_local: int,
    sample_rate: float,
    generator: torch.Generator | None = None,
) -> SampledClasses:
    """Chooses this rank's scored classes: all local positives plus uniform random negatives.

    ``K = max(#positives, ceil(sample_rate * num_local))``: every class of the global batch that this
    rank owns is kept, and negatives are drawn uniformly without replacement from the remaining
    local classes until ``K`` is reached. With ``sample_rate >= 1`` all local classes are kept.

    Args:
        global_labels: ``[N]`` int64 class ids of the gathered batch.
        class_start: First class id of this rank's shard.
        num_local: Number of classes in this rank's shard.
        sample_rate: Fraction of the shard to score, in ``(0, 1]``.
        generator: Random generator on ``global_labels.device`` (seed it with :func:`step_seed` for
            reproducibility); required when ``sample_rate < 1``.

    Returns:
        The sampled classes and the remapped targets.
    """
    local = global_labels - class_start
    is_local = (local >= 0) & (local < num_local)
    if sample_rate >= 1.0:
        target = torch.where(is_local, local, torch.full_like(local, -1))
        return SampledClasses(index=None, target=target, num_sampled=num_local)

    if generator is None:
        raise ValueError("sample_classes needs a generator when sample_rate < 1")
    num_sample = min(num_local, int(math.ceil(sample_rate * num_local)))
    positive = torch.zeros(num_local, dtype=torch.bool, device=global_labels.device)
    positive[local[is_local]] = True
    # Random scores in [0, 1) for negatives and 2 for positives: the top-K then holds every positive
    # and a uniform random subset of negatives, in one pass and without a host sync.
    scores = torch.rand(num_local, generator=generator, device=global_labels.device)
    scores.masked_fill_(positive, 2.0)
    num_positive = int(positive.sum())
    k = max(num_sample, num_positive)
    index = torch.topk(scores, k, sorted=False).indices.sort().values
    remap = torch.full((num_local,), -1, dtype=torch.int64, device=global_labels.device)
    remap[index] = torch.arange(k, device=global_labels.device)
    target = torch.where(is_local, remap[local.clamp(0, num_local - 1)], torch.full_like(local, -1))
    return SampledClasses(index=index, target=target, num_sampled=k)
