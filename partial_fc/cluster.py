"""Cluster-Center Bank, the PCL concentration phi, and its global statistics.

The bank is sharded exactly like the class centers: each rank holds the cluster centers and
counters of the classes it owns and updates them from the gathered (global) batch, so no extra
communication is needed for the update itself. Only the statistics that normalise phi across all
classes (percentile range, mean) need small all-reduces; see :func:`concentration_stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import ParallelContext, all_gather_no_grad, all_reduce_no_grad

__all__ = [
    "ClusterBank", "ConcentrationStats", "concentration_stats", "normalized_concentration", "COUNT_NORMS",
    "class_permutation", "permuted_phi", "offline_refresh",
]

#: How phi uses the class size Z: ``"log"`` (PCL: mean distance / log(Z + alpha)) or ``"none"``
#: (mean distance only).
COUNT_NORMS = ("log", "none", "size")


class ClusterBank(nn.Module):
    """Per-class cluster centers and concentration estimates for one shard of classes.

    Update rule for a class ``y`` present in a batch with features ``F_y`` (``k`` rows, L2-normalised):

    * first observation: ``C_y = normalize(mean(F_y))``;
    * later: ``C_y <- normalize(m_c * C_y + (1 - m_c) * mean(F_y))``.

    Concentration (PCL form, ``alpha = 10``): ``phi_y = mean_dist_y / log(Z_y + alpha)``, which is
    ``sum_z ||f_z - C_y|| / (Z_y log(Z_y + alpha))`` with the sum replaced by an online estimate:
    ``mean_dist_y`` is a momentum (``m_phi``) running mean of the batch-mean distance
    ``||f - C_y||`` to the center *before* this batch's update (the center the loss used); on a first
    observation with at least two samples it is measured to the freshly initialised center, and a
    single first sample gives no distance (its distance to itself would be 0). ``Z_y`` is the
    dataset's image count for the class when known (``class_counts``), else the number of features
    observed so far. Classes without a distance yet have no phi (NaN); see
    :func:`normalized_concentration` for how they are treated. With ``count_norm="none"``,
    ``phi_y = mean_dist_y`` (no class-size term: a control for whether phi tracks cluster
    looseness or class size). With ``count_norm="size"``, ``phi_y = 1 / log(Z_y + alpha)``: the
    class-size term alone, no distance (a control: a margin that follows only the class size, in
    the spirit of label-distribution-aware margins). It keeps the NaN pattern of the PCL form
    (no phi before a distance was observed), so the warm-up behaves the same.

    Buffers (all local to the shard, all in ``state_dict``):
        centers: ``[C, D]`` fp32 cluster centers (zero rows until first observed).
        counts: ``[C]`` int64, features observed.
        mean_dist: ``[C]`` fp32, running mean distance to the center.
        dist_obs: ``[C]`` int64, features that contributed to ``mean_dist``.
        class_counts: ``[C]`` int64, dataset image count per class (0 = unknown).

    Args:
        num_local: Classes in this shard.
        embedding_size: Feature dimension ``D``.
        momentum: ``m_c`` for the centers.
        phi_momentum: ``m_phi`` for the running mean distance.
        alpha: PCL smoothing constant.
        count_norm: ``"log"`` (PCL), ``"none"`` or ``"size"``; see :data:`COUNT_NORMS`.
        class_counts: Optional ``[C]`` dataset counts for this shard.
        device: Device of the buffers.
    """

    def __init__(
        self,
        num_local: int,
        embedding_size: int,
        momentum: float = 0.9,
        phi_momentum: float = 0.9,
        alpha: float = 10.0,
        class_counts: Optional[torch.Tensor] = None,
        device: Optional[torch.device] = None,
        count_norm: str = "log",
    ) -> None:
        super().__init__()
        if count_norm not in COUNT_NORMS:
            raise ValueError(f"count_norm must be one of {COUNT_NORMS}, got {count_norm!r}")
        self.count_norm = count_norm
        if not 0.0 <= momentum < 1.0 or not 0.0 <= phi_momentum < 1.0:
            raise ValueError("bank momentum and phi momentum must be in [0, 1)")
        if alpha <= 0:
            raise ValueError(f"concentration alpha must be positive, got {alpha}")
        self.momentum = momentum
        self.phi_momentum = phi_momentum
        self.alpha = alpha
        self.register_buffer("centers", torch.zeros(num_local, embedding_size, device=device))
        self.register_buffer("counts", torch.zeros(num_local, dtype=torch.int64, device=device))
        self.register_buffer("mean_dist", torch.zeros(num_local, device=device))
        self.register_buffer("dist_obs", torch.zeros(num_local, dtype=torch.int64, device=device))
        cc = torch.zeros(num_local, dtype=torch.int64, device=device)
        if class_counts is not None:
            if class_counts.shape != (num_local,):
                raise ValueError(
                    f"class_counts for this shard must have shape ({num_local},), got {tuple(class_counts.shape)}"
                )
            cc.copy_(class_counts)
        self.register_buffer("class_counts", cc)

    @torch.no_grad()
    def update(self, features: torch.Tensor, local_targets: torch.Tensor) -> None:
        """Updates the centers and distance statistics of the local classes present in a batch.

        Args:
            features: ``[N, D]`` L2-normalised features of the global batch (detached).
            local_targets: ``[N]`` int64 local class index of each sample, ``-1`` if not local.
        """
        sel = local_targets >= 0
        if not bool(sel.any()):
            return
        t = local_targets[sel]
        f = features[sel].to(self.centers.dtype)
        classes, inv = torch.unique(t, return_inverse=True)
        k = torch.bincount(inv, minlength=classes.numel())
        means = torch.zeros(classes.numel(), f.shape[1], device=f.device, dtype=f.dtype)
        means.index_add_(0, inv, f)
        means /= k.unsqueeze(1).to(f.dtype)

        first = self.counts[classes] == 0
        old = self.centers[classes]
        fresh = F.normalize(means, dim=1)
        ref = torch.where(first.unsqueeze(1), fresh, old)
        dist_sum = torch.zeros(classes.numel(), device=f.device, dtype=f.dtype)
        dist_sum.index_add_(0, inv, (f - ref[inv]).norm(dim=1))
        batch_dist = dist_sum / k.to(f.dtype)
        has_dist = ~first | (k >= 2)

        m = self.momentum
        self.centers[classes] = torch.where(first.unsqueeze(1), fresh, F.normalize(m * old + (1 - m) * means, dim=1))
        prev_obs = self.dist_obs[classes]
        mp = self.phi_momentum
        blended = torch.where(prev_obs == 0, batch_dist, mp * self.mean_dist[classes] + (1 - mp) * batch_dist)
        self.mean_dist[classes] = torch.where(has_dist, blended, self.mean_dist[classes])
        self.dist_obs[classes] = prev_obs + torch.where(has_dist, k, torch.zeros_like(k))
        self.counts[classes] += k

    @torch.no_grad()
    def assign(
        self,
        local_index: torch.Tensor,
        centers: torch.Tensor,
        mean_dist: torch.Tensor,
        counts: torch.Tensor,
    ) -> None:
        """Overwrites the state of some classes (an offline refresh over a full pass of the data).

        Args:
            local_index: ``[K]`` local class indices.
            centers: ``[K, D]`` new centers (normalised here).
            mean_dist: ``[K]`` mean distance of the class's features to its center.
            counts: ``[K]`` number of features behind each estimate.
        """
        self.centers[local_index] = F.normalize(centers.to(self.centers.dtype), dim=1)
        self.mean_dist[local_index] = mean_dist.to(self.mean_dist.dtype)
        self.counts[local_index] = counts.to(torch.int64)
        self.dist_obs[local_index] = counts.to(torch.int64)

    def phi(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Concentration of the local classes (NaN where no estimate exists yet).

        Args:
            index: Optional ``[K]`` local class indices; all local classes when ``None``.

        Returns:
            ``[K]`` (or ``[C]``) fp32.
        """
        sl = slice(None) if index is None else index
        if self.count_norm == "none":
            phi = self.mean_dist[sl].clone()
        else:
            z = torch.where(self.class_counts[sl] > 0, self.class_counts[sl], self.counts[sl]).to(self.mean_dist.dtype)
            dist = self.mean_dist[sl] if self.count_norm == "log" else torch.ones_like(self.mean_dist[sl])
            phi = dist / torch.log(z + self.alpha)
        return torch.where(self.dist_obs[sl] > 0, phi, torch.full_like(phi, float("nan")))

    def valid(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Whether each class has a cluster center (has been observed at least once)."""
        sl = slice(None) if index is None else index
        return self.counts[sl] > 0


def class_permutation(num_classes: int, seed: int) -> torch.Tensor:
    """A fixed random permutation of ``[0, num_classes)`` from ``seed`` (the same on every rank).

    The phi-shuffle control gives class ``y`` the concentration of class ``perm[y]``: the
    distribution of phi (and so of margins and temperatures) is unchanged, its link to the class
    is gone.

    Returns:
        ``[num_classes]`` int64 on the CPU.
    """
    gen = torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + 0x5A1F) & 0x7FFFFFFFFFFFFFFF)
    return torch.randperm(num_classes, generator=gen)


@torch.no_grad()
def permuted_phi(phi_local: torch.Tensor, source: torch.Tensor, ranges: list[tuple[int, int]],
                 ctx: ParallelContext) -> torch.Tensor:
    """The phi of each local class's source class ``source[i]`` (any rank's), for the shuffle.

    Every rank's phi is all-gathered (padded to the largest shard): ``O(C)`` floats per call, a
    cost accepted for a study control (never on in the default configuration).

    Args:
        phi_local: ``[C_local]`` phi of this shard (NaN where unknown).
        source: ``[C_local]`` int64 global class whose phi each local class takes.
        ranges: ``[(start, end)]`` class range of every rank, in rank order.
        ctx: The parallel context.

    Returns:
        ``[C_local]`` fp32.
    """
    if not ctx.is_distributed:
        return phi_local[source.to(phi_local.device)]
    width = max(e - s for s, e in ranges)
    padded = torch.full((width,), float("nan"), device=phi_local.device, dtype=phi_local.dtype)
    padded[: phi_local.numel()] = phi_local
    gathered = all_gather_no_grad(padded, ctx).view(ctx.world_size, width)
    full = torch.cat([gathered[r, : e - s] for r, (s, e) in enumerate(ranges)])
    return full[source.to(full.device)]


@torch.no_grad()
def offline_refresh(bank: "ClusterBank", class_start: int, num_classes: int, batches, ctx: ParallelContext) -> dict:
    """Recomputes the bank from a full pass over the data (PCL's offline estimate).

    Centers are the normalised means of every class's L2-normalised features; ``mean_dist`` is
    the mean distance of those features to that center; ``counts`` their number. Each rank passes
    the features of its own part of the data; per-class sums are all-reduced as dense ``[C, D]``
    and ``[C]`` tensors (``O(C * D)`` per rank: a study control, not meant for millions of
    classes). Classes with no feature keep their old state.

    Args:
        bank: This rank's shard of the bank.
        class_start: First global class of the shard.
        num_classes: Classes on all ranks together.
        batches: Iterable of ``(features [B, D], labels [B] global int64)``.
        ctx: The parallel context.

    Returns:
        ``{"features": n, "classes": k}``: features seen on this rank, classes assigned here.
    """
    dev = bank.centers.device
    d = bank.centers.shape[1]
    sums = torch.zeros(num_classes, d, device=dev, dtype=torch.float64)
    counts = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    kept = []
    for feats, labels in batches:
        f = F.normalize(feats.to(dev, torch.float64), dim=1)
        y = labels.to(dev, torch.int64)
        if f.ndim != 2 or f.shape[1] != d or y.shape != (f.shape[0],):
            raise ValueError(f"offline_refresh: expected features [B, {d}] and labels [B], got "
                             f"{tuple(f.shape)} and {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"offline_refresh: labels outside [0, {num_classes})")
        sums.index_add_(0, y, f)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        kept.append((f, y))
    sums = all_reduce_no_grad(sums, ctx)
    counts = all_reduce_no_grad(counts, ctx)
    centers = F.normalize(sums, dim=1)
    dist_sum = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    for f, y in kept:
        dist_sum.index_add_(0, y, (f - centers[y]).norm(dim=1))
    dist_sum = all_reduce_no_grad(dist_sum, ctx)
    n_local = bank.centers.shape[0]
    sl = slice(class_start, class_start + n_local)
    seen = torch.nonzero(counts[sl] > 0).squeeze(1)
    c = counts[sl][seen]
    bank.assign(seen, centers[sl][seen].float(), (dist_sum[sl][seen] / c).float(), c.round().long())
    return {"features": int(sum(f.shape[0] for f, _ in kept)), "classes": int(seen.numel())}


@dataclass(frozen=True)
class ConcentrationStats:
    """Global statistics of phi over all classes that have an estimate (all ranks agree).

    Attributes:
        lo: Lower clipping bound (the ``percentiles[0]``-th percentile).
        hi: Upper clipping bound (the ``percentiles[1]``-th percentile).
        mean_clipped: Mean of ``clip(phi, lo, hi)``, the normaliser of the adaptive temperature.
        min: Smallest phi.
        max: Largest phi (the value given to classes without an estimate).
        mean: Mean phi.
        num_known: Number of classes with an estimate.
    """

    lo: float
    hi: float
    mean_clipped: float
    min: float
    max: float
    mean: float
    num_known: int


def _hist_quantile(hist: torch.Tensor, lo: float, hi: float, q: float) -> torch.Tensor:
    """Quantile (torch.quantile's linear convention) from a histogram over [lo, hi].

    Computed on the histogram's device in float64 without reading it (a 0-d tensor).
    """
    hist = hist.double()
    n = hist.sum()
    pos = q * (n - 1.0)
    cum = torch.cumsum(hist, 0)
    b = torch.searchsorted(cum, pos.reshape(1), right=True).reshape(()).clamp(max=hist.numel() - 1)
    before = torch.where(b > 0, cum[(b - 1).clamp_min(0)], torch.zeros_like(pos))
    count = hist[b].clamp_min(1.0)
    width = (hi - lo) / hist.numel()
    # Values inside a bin are taken as evenly spread; the error is below one bin width.
    return lo + width * (b.double() + ((pos - before + 0.5) / count).clamp(0.0, 1.0))


def concentration_stats(
    phi_local: torch.Tensor,
    ctx: ParallelContext,
    percentiles: tuple[float, float] = (10.0, 90.0),
    bins: int = 4096,
) -> Optional[ConcentrationStats]:
    """Global percentile range and means of phi, from sharded phi, with three small all-reduces.

    The percentiles come from a ``bins``-bin histogram all-reduced across ranks (a gather of every
    class's phi would move 8 MB per step at 2M classes); they are exact at 0 and 100 and within
    ``(max - min) / bins`` otherwise.

    Args:
        phi_local: ``[C_local]`` phi of this shard, NaN where unknown.
        ctx: The parallel context.
        percentiles: ``(low, high)`` percentiles in ``[0, 100]`` used for clipping.
        bins: Histogram resolution.

    Returns:
        The statistics, or ``None`` when no class on any rank has an estimate yet.
    """
    plo, phi_p = percentiles
    if not 0.0 <= plo <= phi_p <= 100.0:
        raise ValueError(f"concentration percentiles must satisfy 0 <= low <= high <= 100, got {percentiles}")
    known = phi_local[~torch.isnan(phi_local)].float()
    dev = phi_local.device
    if known.numel():
        ext = torch.stack([known.max(), -known.min()])
    else:
        ext = torch.tensor([-math.inf, -math.inf], device=dev)
    ext = all_reduce_no_grad(ext, ctx, op=dist.ReduceOp.MAX)
    # Two host reads in all (train/host_syncs.py): the range, which torch.histc takes as numbers,
    # then every statistic together.
    gmax, gmin = ext.tolist()
    gmin = -gmin
    if not math.isfinite(gmax):
        return None
    span_hi = gmax if gmax > gmin else gmin + 1e-12
    hist = torch.histc(known, bins=bins, min=gmin, max=span_hi) if known.numel() else torch.zeros(bins, device=dev)
    summed = torch.cat([hist.double(), known.double().sum().reshape(1)])
    summed = all_reduce_no_grad(summed, ctx)
    hist, total = summed[:-1], summed[-1]
    n = hist.sum()
    lo_t = torch.full((), gmin if plo < 100 else gmax, dtype=torch.float64, device=dev)
    hi_t = torch.full((), gmax if phi_p > 0 else gmin, dtype=torch.float64, device=dev)
    if 0 < plo < 100:
        lo_t = _hist_quantile(hist, gmin, span_hi, plo / 100)
    if 0 < phi_p < 100:
        hi_t = _hist_quantile(hist, gmin, span_hi, phi_p / 100)
    lo_t, hi_t = lo_t.clamp(gmin, gmax), hi_t.clamp(gmin, gmax)
    hi_t = torch.maximum(hi_t, lo_t)
    clipped_sum = all_reduce_no_grad(known.double().clamp(lo_t, hi_t).sum().reshape(1), ctx)
    lo, hi, csum, total, n = torch.stack([lo_t, hi_t, clipped_sum[0], total, n]).tolist()
    return ConcentrationStats(
        lo=lo,
        hi=hi,
        mean_clipped=csum / n,
        min=gmin,
        max=gmax,
        mean=total / n,
        num_known=int(n),
    )


def normalized_concentration(phi: torch.Tensor, stats: ConcentrationStats, unknown: str = "nan") -> torch.Tensor:
    """lambda = (clip(phi, lo, hi) - lo) / (hi - lo), in [0, 1].

    Args:
        phi: ``[K]`` concentrations, NaN where unknown.
        stats: Global statistics from :func:`concentration_stats`.
        unknown: ``"nan"`` keeps NaN for unknown classes (the CG margin then uses its warm-up
            margin); ``"max"`` treats them as the largest phi (lambda = 1).

    Returns:
        ``[K]`` fp32.
    """
    span = stats.hi - stats.lo
    if span <= 0:
        lam = torch.full_like(phi, 0.5)  # all classes equally concentrated: the middle margin
    else:
        lam = (phi.clamp(stats.lo, stats.hi) - stats.lo) / span
    nan = torch.isnan(phi)
    if unknown == "max":
        return torch.where(nan, torch.ones_like(lam), lam)
    if unknown == "nan":
        return torch.where(nan, phi, lam)
    raise ValueError(f"unknown= must be 'nan' or 'max', got {unknown!r}")
