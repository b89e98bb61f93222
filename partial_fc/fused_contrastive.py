"""Fused supervised cluster contrastive loss (Con) over class-sharded cluster centers.

The unfused Con term gathers the sampled cluster centers ``[K, D]``, builds the logits
``F C^T / tau`` ``[N, K]``, a masked copy of them, and the distributed cross-entropy keeps more
``[N, K]`` buffers for its backward. At 2M classes on 8 ranks (``N = 1,024``, ``K = 77,247``) each
of those buffers is 316 MiB.

The cluster centers are a buffer of the Cluster-Center Bank (no gradient), so the only gradients
are those w.r.t. the ``[N, D]`` features and a scalar learnable temperature. Both are computed in
forward with an *online* softmax over column chunks of the sampled centers:

* per chunk: gather the centers and scale them, ``S_c = C_c / tau_c`` (``[chunk, D]``); logits
  ``z = F S_c^T`` (``[N, chunk]``), ``-inf`` where the center is invalid; update a running row max
  ``m``, a running sum of exponentials ``l = sum_k exp(z_k - m)`` and a running ``[N, D]``
  numerator ``A = sum_k exp(z_k - m) C_k / tau_k`` (and for a learnable tau
  ``B = sum_k exp(z_k - m) z_k``), rescaling all of them by ``exp(m_old - m_new)`` when the max
  grows;
* across ranks: all-reduce MAX of ``m``, rescale, all-reduce SUM of ``l``; the target logit is an
  all-reduced ``[N]`` vector that only the owner rank fills.

Only the feature gradient ``[N, D]`` and the temperature gradient (a scalar) live from forward to
backward, which scales them by the incoming gradient. The FLOPs are those of the unfused chain
(two ``N x K x D`` matmuls); the second one simply runs in forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .distributed import ParallelContext, all_reduce_no_grad

__all__ = ["fused_cluster_contrastive", "CON_CHUNK"]

CON_CHUNK = 8192  # sampled centers per chunk: [N, 8192] fp32 is 32 MiB at N = 1,024
_TINY = 1e-30  # the same clamp of the sum of exponentials as partial_fc.losses.distributed_cross_entropy


class _FusedClusterContrastive(torch.autograd.Function):
    @staticmethod
    def forward(fctx, feats, tau, centers, index, target, valid, sample_mask, ctx, chunk):
        f = feats.detach()
        n, d = f.shape
        device = f.device
        k = valid.shape[0]
        need_f = fctx.needs_input_grad[0]
        need_tau = fctx.needs_input_grad[1]
        tau_d = tau.detach().float()
        scalar_tau = tau_d.dim() == 0

        m = torch.full((n,), -torch.inf, device=device)
        l = torch.zeros(n, device=device)
        a = torch.zeros(n, d, device=device) if need_f else None
        b = torch.zeros(n, device=device) if need_tau else None  # running sum_k exp(z_k - m) z_k
        picked_z = torch.zeros(n, device=device)  # target logit (owner rank only)
        owner = target >= 0
        any_invalid = bool((~valid).any()) if k else False  # one check, not one masked pass per chunk
        for c0 in range(0, k, chunk):
            c1 = min(k, c0 + chunk)
            cen = (centers[c0:c1] if index is None else centers.index_select(0, index[c0:c1])).detach().float()
            # C_k / tau_k: the temperature is folded into the [c, D] centers, not the [N, c] logits.
            scaled = cen / (tau_d if scalar_tau else tau_d[c0:c1].unsqueeze(1))
            del cen
            # Under autocast the logits' matmul runs in the low precision (like the margin CE's);
            # the softmax state below is fp32.
            z = (f @ scaled.t()).float()  # [N, c]
            if any_invalid:
                z.masked_fill_(~valid[c0:c1].unsqueeze(0), -torch.inf)
            r = torch.nonzero(owner & (target >= c0) & (target < c1)).squeeze(1)
            if r.numel():
                picked_z[r] = z[r, target[r] - c0]
            m_new = torch.maximum(m, z.amax(dim=1))
            # Rows with no valid center yet keep m = -inf; 0 stands in so exp() gives 0, not NaN.
            safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            alpha = torch.exp(m - safe)
            e = z.sub_(safe.unsqueeze(1)).exp_()  # in place: exp(z - m), 0 at invalid centers
            e_sum = e.sum(dim=1)
            l.mul_(alpha).add_(e_sum)
            if b is not None:
                # sum_k e_k z_k = sum_k e_k log(e_k) + m sum_k e_k (xlogy: 0 where e = 0).
                b.mul_(alpha).add_(torch.xlogy(e, e).sum(dim=1) + safe * e_sum)
            if a is not None:
                a.mul_(alpha.unsqueeze(1)).add_((e.to(f.dtype) @ scaled.to(f.dtype)).float())
            m = m_new
            del z, e, scaled

        gmax = all_reduce_no_grad(m, ctx, op=dist.ReduceOp.MAX)
        gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
        scale = torch.exp(m - gmax)  # 0 on rows where this rank has no valid center
        sumexp = all_reduce_no_grad(l * scale, ctx)
        target_logit = all_reduce_no_grad(torch.where(owner, picked_z, torch.zeros_like(picked_z)), ctx)
        per_sample = torch.log(sumexp.clamp_min(_TINY)) + gmax - target_logit
        if sample_mask is None:
            weight = torch.full((n,), 1.0 / max(n, 1), device=device)
        else:
            count = sample_mask.sum().clamp_min(1).float()
            weight = torch.where(sample_mask, 1.0 / count, torch.zeros((), device=device))
        loss = torch.where(weight > 0, per_sample, torch.zeros_like(per_sample)).mul(weight).sum()

        grad_f = grad_tau = None
        # d loss_i / d z_ik = w_i (p_ik - onehot_ik), p_ik = exp(z_ik - M_i) / L_i: this rank's share.
        coef = weight * scale / sumexp.clamp_min(_TINY)
        if a is not None:
            grad_f = a.mul_(coef.unsqueeze(1))
            r = torch.nonzero(owner & (weight > 0)).squeeze(1)
            if r.numel():
                col = target[r]
                cen = (centers[col] if index is None else centers.index_select(0, index[col])).detach().float()
                tau_t = tau_d if scalar_tau else tau_d[col].unsqueeze(1)
                grad_f.index_add_(0, r, -(cen / tau_t) * weight[r].unsqueeze(1))
        if b is not None:
            # d z_ik / d tau = -z_ik / tau (one scalar tau).
            # Masked samples may have a -inf target logit (no center): keep them out of 0 * inf.
            owned = torch.where(owner & (weight > 0), picked_z, torch.zeros_like(picked_z))
            grad_tau = -((coef * b).sum() - (weight * owned).sum()) / tau_d
        fctx.save_for_backward(grad_f, grad_tau)
        fctx.feats_dtype, fctx.tau_dtype = feats.dtype, tau.dtype
        return loss

    @staticmethod
    def backward(fctx, grad_out):
        grad_f, grad_tau = fctx.saved_tensors
        g = grad_out.float()
        gf = None if grad_f is None else (grad_f * g).to(fctx.feats_dtype)
        gt = None if grad_tau is None else (grad_tau * g).to(fctx.tau_dtype)
        return gf, gt, None, None, None, None, None, None, None


def fused_cluster_contrastive(
    feats: torch.Tensor,
    centers: torch.Tensor,
    target: torch.Tensor,
    tau: torch.Tensor,
    valid: torch.Tensor,
    ctx: ParallelContext,
    sample_mask: Optional[torch.Tensor] = None,
    index: Optional[torch.Tensor] = None,
    chunk: int = CON_CHUNK,
) -> torch.Tensor:
    """Supervised cluster contrastive loss over this rank's sampled cluster centers, fused.

    Equal (value and gradients) to ``distributed_cross_entropy((feats @ C.T / tau).masked_fill(
    ~valid, -inf), target, ctx, sample_mask)`` with ``C = centers[index]`` (or ``centers``), but no
    ``[N, K]`` buffer and no ``[K, D]`` copy of the centers is ever built: the centers are read in
    chunks of ``chunk`` rows with an online softmax (see the module docstring).

    Gradient contract: the feature gradient is this rank's contribution
    ``w_i (sum_{k local} p_ik C_k / tau_k - [y_i local] C_{y_i} / tau_{y_i})`` with
    ``w_i = mask_i / count`` and ``p`` the softmax over all ranks' valid centers; summing it across
    ranks (the embedding all-gather's backward does) gives the exact gradient. A 0-d ``tau`` that
    requires grad gets this rank's contribution ``-sum_i w_i (sum_k p_ik z_ik - [y_i local]
    z_{i y_i}) / tau`` (``z`` the logits); the caller sums it across ranks. The centers get
    no gradient. Both gradients are computed in forward (only ``[N, D]`` and a scalar are kept), so
    the centers may change after the call (the bank's in-place update) without affecting backward.

    Args:
        feats: ``[N, D]`` L2-normalised features of the global batch (any float dtype; the
            similarity matmuls follow autocast, the softmax state is fp32).
        centers: ``[C, D]`` this rank's cluster centers (with ``index``) or ``[K, D]`` already
            selected ones (without).
        target: ``[N]`` int64 column of each sample's class among the ``K`` centers, ``-1`` when
            its class lives on another rank.
        tau: ``[K]`` per-center temperature (no gradient), or a 0-d temperature shared by all
            centers (which may require grad: the learnable temperature).
        valid: ``[K]`` bool, centers that exist; the others are excluded (logit ``-inf``).
        ctx: The parallel context.
        sample_mask: ``[N]`` bool, samples that count (identical on every rank); the loss is the
            mean over them, counted globally. All samples when ``None``.
        index: Optional ``[K]`` int64 rows of ``centers`` to use.
        chunk: Centers per chunk (the transients are ``[N, chunk]`` and ``[chunk, D]``).

    Returns:
        Scalar fp32 mean loss, identical on every rank (0 when no sample counts).

    Raises:
        ValueError: For inconsistent shapes, a ``[K]`` tau that requires grad, or ``chunk < 1``.
        TypeError: For non-integer ``target``/``index`` or non-bool ``valid``/``sample_mask``.
    """
    if feats.dim() != 2 or centers.dim() != 2 or feats.shape[1] != centers.shape[1]:
        raise ValueError(
            f"feats [N, D] and centers [C, D] must share D, got {tuple(feats.shape)} and {tuple(centers.shape)}"
        )
    n = feats.shape[0]
    if target.shape != (n,):
        raise ValueError(f"target must be [N] with N={n}, got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor, got {target.dtype}")
    if valid.dim() != 1 or valid.dtype != torch.bool:
        raise TypeError(f"valid must be a [K] bool tensor, got {valid.dtype} of shape {tuple(valid.shape)}")
    k = valid.shape[0]
    if index is not None:
        if index.shape != (k,) or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"index must be an integer [K] tensor with K={k} (valid's length), got "
                             f"{index.dtype} of shape {tuple(index.shape)}")
    elif centers.shape[0] != k:
        raise ValueError(f"centers has {centers.shape[0]} rows but valid has {k}: pass index= to select K rows")
    if tau.dim() not in (0, 1) or (tau.dim() == 1 and tau.shape != (k,)):
        raise ValueError(f"tau must be 0-d or [K] with K={k}, got shape {tuple(tau.shape)}")
    if tau.dim() == 1 and tau.requires_grad:
        raise ValueError("a [K] tau cannot be learned here: pass the learnable temperature as a 0-d tensor")
    if sample_mask is not None and (sample_mask.shape != (n,) or sample_mask.dtype != torch.bool):
        raise TypeError(f"sample_mask must be a [N] bool tensor with N={n}, got {sample_mask.dtype} "
                        f"of shape {tuple(sample_mask.shape)}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of centers, got {chunk}")
    return _FusedClusterContrastive.apply(feats, tau, centers, index, target.long(), valid, sample_mask, ctx, int(chunk))
