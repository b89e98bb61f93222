"""Losses over class-sharded scores, each equal to its single-process dense counterpart.

Every function here takes tensors for *this rank's* shard of classes plus the gathered (global)
batch and returns the same scalar on every rank. Gradients follow one rule: each rank computes the
gradient of that common scalar with respect to what it holds (its logits, its rows of W, the
gathered features as seen from its shard); summing the feature gradients across ranks -- which the
embedding all-gather's backward does -- gives the exact dense gradient. The building block is
:func:`partial_fc.distributed.all_reduce_sum_local_grad`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import ParallelContext, all_reduce_no_grad, all_reduce_sum_local_grad

__all__ = [
    "distributed_cross_entropy",
    "cluster_aligning_loss",
    "center_loss",
    "center_triplet_loss",
]

_TINY = 1e-30


def distributed_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ctx: ParallelContext,
    sample_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax cross-entropy whose classes are split across ranks.

    ``loss_i = log(sum_{r, c} exp(z_rc)) - z_{i, y_i}`` with the max, the sum of exponentials and the
    target logit combined by all-reduce; the mean is over the samples in ``sample_mask``. Computed
    in fp32 whatever the input dtype. Logits may be ``-inf`` (excluded classes).

    Args:
        logits: ``[N, K]`` this rank's scaled logits for the global batch.
        target: ``[N]`` column of each sample's class in ``logits``, ``-1`` when held elsewhere.
        ctx: The parallel context.
        sample_mask: ``[N]`` bool, samples that count (identical on every rank); all when ``None``.

    Returns:
        Scalar mean loss, identical on every rank. Gradient flows to ``logits``:
        ``(softmax - onehot) / n_valid`` for this rank's columns.
    """
    logits = logits.float()
    with torch.no_grad():
        local_max = logits.max(dim=1).values if logits.shape[1] else logits.new_full((logits.shape[0],), -torch.inf)
        gmax = all_reduce_no_grad(local_max, ctx, op=dist.ReduceOp.MAX)
        gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
    sumexp = all_reduce_sum_local_grad(torch.exp(logits - gmax.unsqueeze(1)).sum(dim=1), ctx)
    has_target = target >= 0
    picked = logits.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1) if logits.shape[1] else logits.new_zeros(target.shape)
    target_logit = all_reduce_sum_local_grad(torch.where(has_target, picked, torch.zeros_like(picked)), ctx)
    per_sample = torch.log(sumexp.clamp_min(_TINY)) + gmax - target_logit
    if sample_mask is None:
        return per_sample.mean()
    count = sample_mask.sum().clamp_min(1).to(per_sample.dtype)
    return torch.where(sample_mask, per_sample, torch.zeros_like(per_sample)).sum() / count


def cluster_aligning_loss(
    weight_rows: torch.Tensor,
    center_rows: torch.Tensor,
    ctx: ParallelContext,
) -> torch.Tensor:
    """Cluster-Aligning loss: mean over the batch's classes of ``1 - cos(W_y, C_y)``.

    Args:
        weight_rows: ``[P, D]`` this rank's class centers W for its classes present in the global
            batch that have a cluster center (``P`` may be 0).
        center_rows: ``[P, D]`` the matching cluster centers C (no gradient).
        ctx: The parallel context.

    Returns:
        Scalar, identical on every rank, averaged over all such classes of all ranks. Gradient flows
        to ``weight_rows`` only.
    """
    cos = F.cosine_similarity(weight_rows.float(), center_rows.detach().float(), dim=1)
    local_sum = (1.0 - cos).sum()
    count = all_reduce_no_grad(torch.tensor(float(cos.numel()), device=cos.device), ctx)
    return all_reduce_sum_local_grad(local_sum, ctx) / count.clamp_min(1.0)


def center_loss(
    features: torch.Tensor,
    target: torch.Tensor,
    centers: torch.Tensor,
    sample_mask: torch.Tensor,
    ctx: ParallelContext,
) -> torch.Tensor:
    """Center loss against cluster centers: mean of ``0.5 * ||f_i - C_{y_i}||^2`` (= ``1 - cos``).

    Args:
        features: ``[N, D]`` L2-normalised global features.
        target: ``[N]`` column of each sample's class in ``centers``, ``-1`` when held elsewhere.
        centers: ``[K, D]`` this rank's (sampled) cluster centers, L2-normalised, no gradient.
        sample_mask: ``[N]`` samples whose class has a cluster center (identical on every rank).
        ctx: The parallel context.

    Returns:
        Scalar, identical on every rank; gradient flows to ``features`` only.
    """
    own = (target >= 0) & sample_mask
    pos = (features * centers.detach()[target.clamp_min(0)]).sum(dim=1)
    local_sum = torch.where(own, 1.0 - pos, torch.zeros_like(pos)).sum()
    count = sample_mask.sum().clamp_min(1).to(pos.dtype)
    return all_reduce_sum_local_grad(local_sum, ctx) / count


def center_triplet_loss(
    features: torch.Tensor,
    target: torch.Tensor,
    centers: torch.Tensor,
    center_valid: torch.Tensor,
    sample_mask: torch.Tensor,
    margin: float,
    ctx: ParallelContext,
) -> torch.Tensor:
    """Triplet loss against cluster centers with the hardest negative center.

    ``loss_i = relu(margin + cos(f_i, C_neg) - cos(f_i, C_{y_i}))`` where ``C_neg`` is the most
    similar valid, non-target center among the sampled centers of all ranks. The positive term is
    computed on the owner rank and the negative term on the rank holding the hardest negative (ties
    go to the lowest rank), so each gradient piece is counted once.

    Args:
        features: ``[N, D]`` L2-normalised global features.
        target: ``[N]`` column of each sample's class in ``centers``, ``-1`` when held elsewhere.
        centers: ``[K, D]`` this rank's sampled cluster centers, no gradient.
        center_valid: ``[K]`` bool, centers that exist.
        sample_mask: ``[N]`` samples whose class has a cluster center (identical on every rank).
        margin: Cosine margin.
        ctx: The parallel context.

    Returns:
        Scalar, identical on every rank; gradient flows to ``features`` only.
    """
    sims = features @ centers.detach().t()
    excluded = ~center_valid.unsqueeze(0).expand_as(sims).clone()
    has_t = target >= 0
    rows = torch.nonzero(has_t).squeeze(1)
    excluded[rows, target[rows]] = True
    neg = sims.masked_fill(excluded, -torch.inf)
    local_best, local_arg = neg.max(dim=1) if neg.shape[1] else (sims.new_full((sims.shape[0],), -torch.inf), None)
    with torch.no_grad():
        gbest = all_reduce_no_grad(local_best, ctx, op=dist.ReduceOp.MAX)
        is_best = (local_best == gbest) & torch.isfinite(gbest)
        rank_key = torch.where(is_best, torch.full_like(gbest, float(ctx.rank)), torch.full_like(gbest, float("inf")))
        winner = all_reduce_no_grad(rank_key, ctx, op=dist.ReduceOp.MIN) == float(ctx.rank)
        has_neg = torch.isfinite(gbest)
    pos = sims.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
    zero = torch.zeros_like(pos)
    piece = torch.where(winner & is_best, torch.where(torch.isfinite(local_best), local_best, zero), zero)
    piece = piece - torch.where(has_t, pos, zero)
    value = all_reduce_sum_local_grad(piece, ctx)
    active = sample_mask & has_neg
    per_sample = torch.where(active, F.relu(margin + value), zero)
    return per_sample.sum() / active.sum().clamp_min(1).to(per_sample.dtype)
