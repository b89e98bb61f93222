"""Fused row normalisation + cosine logits + margin + distributed softmax cross-entropy.

The unfused chain (``normalize(W) -> F @ W^T -> clamp -> margin on targets -> * s -> CE``) keeps
four to six ``[N, K]`` buffers alive at its peak (the matmul output saved by ``clamp``, the
margin's scatter, the scaled copy, the exponentials saved for backward, and the gradient chain),
plus a normalised copy of the sampled rows ``[K, D]`` and its gradient chain. With a global batch
``N`` of 1,024 and ``K = 77,000`` sampled classes one ``[N, K]`` fp32 buffer is 316 MB, so these
buffers dominate the head's activation memory.

:func:`fused_margin_cross_entropy` computes the same loss with exactly one ``[N, K]`` buffer, held
as column chunks of ``_CHUNK`` classes: the cosines are clamped, margined, scaled, exponentiated and
normalised to softmax probabilities *in place*, and the backward turns each chunk into the logit
gradient in place again, uses it for its slice of W's gradient and the features' gradient, and
frees it. So at the backward's peak the probabilities still to be consumed and the part of W's
``[K, D]`` gradient already produced add up to one ``[N, K]`` buffer plus one chunk, not both in
full. W's sampled rows are gathered one chunk at a time (forward and again in backward), never as
a ``[K, D]`` copy. The row norms of W are the only other thing kept for the normalisation's
backward. The gradient is the exact gradient of the unfused chain (tests compare both, single
process and on 2-3 gloo ranks, with chunks smaller than ``K``):

* logits ``z = s * c`` off target, ``z = s * margin(c)`` on target, ``c = clamp(f . w / |w|)``;
* ``d loss / d z = (softmax(z) - onehot) / N`` with the softmax over all ranks' classes;
* ``d c / d (f . w/|w|)`` is 0 where the raw cosine left ``[-1, 1]`` (as ``clamp``'s gradient),
  recorded as a short list of positions (rounding-level excursions only);
* ``d loss / d w = (G - w_n (w_n . G)) / |w|`` with ``G = (d loss / d c)^T F`` and ``w_n = w/|w|``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .distributed import ParallelContext, all_reduce_no_grad
from .margins import MarginParams, margin_value_and_derivative

__all__ = ["fused_margin_cross_entropy"]

_TINY = 1e-30
_NORM_EPS = 1e-12
_CHUNK = 4096  # classes per column chunk of the [N, K] buffer (and rows of W gathered at a time)


class _FusedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(fctx, feats, weight, rows, cols, params, grad_mode, s, ctx, index, sparse_grad):
        f = feats.detach()
        w_all = weight.detach()
        k = w_all.shape[0] if index is None else index.numel()
        n = f.shape[0]
        # The cosines live in column chunks of _CHUNK classes: W's rows are gathered one chunk at a
        # time (no [K, D] copy), and backward frees each chunk as soon as it is consumed, so the
        # probabilities and W's growing gradient never both exist in full.
        starts = list(range(0, k, _CHUNK))
        chunks, norms = [], []
        for c0 in starts:
            sl = slice(c0, min(k, c0 + _CHUNK))
            w = w_all[sl] if index is None else w_all.index_select(0, index[sl])
            nrm = w.float().norm(dim=1).clamp_min(_NORM_EPS)
            z = (f @ w.t()).float()  # under autocast the matmul runs in the low precision, like the unfused chain's
            del w
            chunks.append(z.div_(nrm.unsqueeze(0)))
            norms.append(nrm)
        norms = torch.cat(norms) if norms else f.new_zeros(0, dtype=torch.float32)
        # Positions where the raw cosine left [-1, 1] get clamp's zero gradient. A whole-chunk
        # min/max (one vectorised pass) settles the usual case; only then are row extrema taken,
        # and only rows that actually overflow are searched.
        oob = []
        for z in chunks:
            lo, hi = torch.aminmax(z)
            bad = None
            if bool((hi > 1.0) | (lo < -1.0)):  # one host read per chunk (docs/training.md, "Host syncs")
                rmin, rmax = torch.aminmax(z, dim=1)
                bad = torch.nonzero((rmax > 1.0) | (rmin < -1.0)).squeeze(1)
            if bad is not None and bad.numel():
                sub = z.index_select(0, bad)
                r, c = torch.nonzero((sub > 1.0) | (sub < -1.0)).unbind(1)
                oob.append((bad[r], c))
            else:
                oob.append(None)
            z.clamp_(-1.0, 1.0)
        # Target positions, split by chunk (a sample's target column lies in exactly one chunk).
        which = torch.div(cols, _CHUNK, rounding_mode="floor")
        cos_t = torch.empty(rows.numel(), dtype=torch.float32, device=f.device)
        parts = []
        for i, z in enumerate(chunks):
            sel = torch.nonzero(which == i).squeeze(1)
            parts.append((sel, rows[sel], cols[sel] - starts[i]))
            cos_t[sel] = z[rows[sel], cols[sel] - starts[i]]
        value, deriv = margin_value_and_derivative(cos_t, params, grad_mode)
        local_max = torch.full((n,), -torch.inf, dtype=torch.float32, device=f.device)
        for z, (sel, r, c) in zip(chunks, parts):
            z.index_put_((r, c), value[sel])
            z.mul_(s)
            torch.maximum(local_max, z.amax(dim=1), out=local_max)
        gmax = all_reduce_no_grad(local_max, ctx, op=dist.ReduceOp.MAX)
        gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
        local_sum = torch.zeros(n, dtype=torch.float32, device=f.device)
        for z in chunks:
            local_sum += z.sub_(gmax.unsqueeze(1)).exp_().sum(dim=1)
        sumexp = all_reduce_no_grad(local_sum, ctx).clamp_min(_TINY)
        picked = torch.zeros(n, dtype=torch.float32, device=f.device)
        picked[rows] = value * s
        target_logit = all_reduce_no_grad(picked, ctx)
        per_sample = torch.log(sumexp) + gmax - target_logit
        inv = sumexp.reciprocal().unsqueeze(1)
        for z in chunks:
            z.mul_(inv)  # softmax probabilities, kept for backward
        # Saving W itself (not a copy) also makes autograd refuse a backward after W was changed.
        fctx.save_for_backward(feats, weight, norms, deriv, index)
        fctx.chunks, fctx.starts, fctx.parts, fctx.oob = chunks, starts, parts, oob
        fctx.s, fctx.n, fctx.used, fctx.sparse_grad = s, n, False, sparse_grad
        return per_sample.mean()

    @staticmethod
    def backward(fctx, grad_out):
        if fctx.used:
            raise RuntimeError("fused_margin_cross_entropy's backward consumes its buffers and can run only once")
        fctx.used = True
        feats, weight, norms, deriv, index = fctx.saved_tensors
        f = feats.detach()
        k = norms.shape[0]
        scale = grad_out.float() * (fctx.s / fctx.n)
        grad_feats = torch.zeros(f.shape, dtype=torch.float32, device=f.device) if fctx.needs_input_grad[0] else None
        grad_w = torch.empty((k, weight.shape[1]), dtype=weight.dtype, device=weight.device) if fctx.needs_input_grad[1] else None
        for i, c0 in enumerate(fctx.starts):
            g, fctx.chunks[i] = fctx.chunks[i], None  # freed at the end of this iteration
            sel, r, c = fctx.parts[i]
            sl = slice(c0, c0 + g.shape[1])
            g[r, c] -= 1.0  # softmax - onehot: d loss / d logits * N
            g.mul_(scale)
            g[r, c] *= deriv[sel]
            if fctx.oob[i] is not None:
                g[fctx.oob[i]] = 0.0
            nrm = norms[sl].unsqueeze(1)
            w_rows = weight.detach()[sl] if index is None else weight.detach().index_select(0, index[sl])
            w_n = w_rows.float().div(nrm)
            del w_rows
            g_c = g.to(f.dtype)
            if grad_feats is not None:
                grad_feats += (g_c @ w_n.to(f.dtype)).float()
            if grad_w is not None:
                gw = (g_c.t() @ f).float()  # gradient w.r.t. the normalised rows
                gw.sub_(w_n * (w_n * gw).sum(dim=1, keepdim=True)).div_(nrm)
                grad_w[sl] = gw
            del g, g_c, w_n
        fctx.chunks = fctx.parts = fctx.oob = None
        if grad_feats is not None:
            grad_feats = grad_feats.to(feats.dtype)
        if grad_w is not None and index is not None:
            if fctx.sparse_grad:  # row-sparse: the K sampled rows (sorted, unique) only
                grad_w = torch.sparse_coo_tensor(index.unsqueeze(0), grad_w, weight.shape, is_coalesced=True,
                                                 check_invariants=False)
            else:
                grad_w = torch.zeros_like(weight).index_copy_(0, index, grad_w)
        return grad_feats, grad_w, None, None, None, None, None, None, None, None


def fused_margin_cross_entropy(
    feats: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    params: MarginParams,
    grad_mode: str,
    s: float,
    ctx: ParallelContext,
    index: Optional[torch.Tensor] = None,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """Margin softmax cross-entropy over class-sharded, unnormalised class centers.

    Equal (value and gradient) to ``distributed_cross_entropy(s * margin(clamp(feats @
    normalize(W).T)), target, ctx)`` with ``W = weight[index]`` (or ``weight``) and the margin
    applied at ``(rows, cols)``.

    Args:
        feats: ``[N, D]`` L2-normalised features of the global batch.
        weight: ``[K, D]`` class centers, or with ``index`` this rank's whole shard ``[C, D]``
            (not normalised).
        rows: ``[T]`` int64 samples whose class this rank holds.
        cols: ``[T]`` int64 column of each such sample's class among the ``K`` scored rows.
        params: Margin parameters, each ``[T]``.
        grad_mode: ``"exact"`` or ``"straight_through"``.
        s: Logit scale.
        ctx: The parallel context.
        index: Optional ``[K]`` sorted, unique int64 rows of ``weight`` to score. They are gathered
            in forward and again in backward instead of being kept in between.
        sparse_grad: With ``index``: return W's gradient as a row-sparse COO tensor of the ``K``
            rows (else a dense ``[C, D]`` tensor, zero on the other rows).

    Returns:
        Scalar mean loss over the ``N`` samples, identical on every rank. Backward may run once.
    """
    if feats.dim() != 2 or weight.dim() != 2 or feats.shape[1] != weight.shape[1]:
        raise ValueError(f"feats [N, D] and weight [K, D] must share D, got {tuple(feats.shape)} and {tuple(weight.shape)}")
    return _FusedMarginCE.apply(feats, weight, rows, cols, params, grad_mode, float(s), ctx, index, bool(sparse_grad))
