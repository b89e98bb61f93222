"""Fused row normalisation + cosine logits + margin + distributed softmax cross-entropy.

The unfused chain (``normalize(W) -> F @ W^T -> clamp -> margin on targets -> * s -> CE``) keeps
four to six ``[N, K]`` buffers alive at its peak (the matmul output saved by ``clamp``, the
margin's scatter, the scaled copy, the exponentials saved for backward, and the gradient chain),
plus a normalised copy of the sampled rows ``[K, D]`` and its gradient chain. With a global batch
``N`` of 1,024 and ``K = 77,000`` sampled classes one ``[N, K]`` fp32 buffer is 316 MB, so these
buffers dominate the head's activation memory.

:func:`fused_margin_cross_entropy` computes the same loss with exactly one ``[N, K]`` buffer: the
cosines are clamped, margined, scaled, exponentiated and normalised to softmax probabilities *in
place*, and the backward turns those probabilities into the logit gradient in place again. The
row norms of W are the only thing kept for the normalisation's backward. The gradient is the exact
gradient of the unfused chain (tests compare both, single process and on 2-3 gloo ranks):

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
_CHUNK = 8192  # rows of W per backward chunk  # F.normalize's default eps: the same clamp of the row norm


class _FusedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(fctx, feats, weight, rows, cols, params, grad_mode, s, ctx, index, sparse_grad):
        # With an index, W's rows are gathered here and dropped after the matmul; backward gathers
        # them again (chunk by chunk), so no [K, D] copy lives from forward to backward.
        rows_w = weight.detach() if index is None else weight.detach().index_select(0, index)
        norms = rows_w.float().norm(dim=1).clamp_min(_NORM_EPS)  # [K]
        # Under autocast the matmul runs in the low precision, like the unfused chain's.
        buf = (feats.detach() @ rows_w.t()).float()  # [N, K], divided by |w| below
        del rows_w
        buf.div_(norms.unsqueeze(0))
        n, k = buf.shape
        # Positions where the raw cosine left [-1, 1] get clamp's zero gradient. Row extrema avoid
        # a full-size mask; only rows that actually overflow are searched.
        if k:
            rmin, rmax = torch.aminmax(buf, dim=1)
            bad = torch.nonzero((rmax > 1.0) | (rmin < -1.0)).squeeze(1)
        else:
            bad = torch.zeros(0, dtype=torch.int64, device=buf.device)
        if bad.numel():
            sub = buf.index_select(0, bad)
            r, c = torch.nonzero((sub > 1.0) | (sub < -1.0)).unbind(1)
            oob = (bad[r], c)
        else:
            oob = None
        buf.clamp_(-1.0, 1.0)
        value, deriv = margin_value_and_derivative(buf[rows, cols], params, grad_mode)
        buf.index_put_((rows, cols), value)
        buf.mul_(s)
        local_max = buf.amax(dim=1) if k else buf.new_full((n,), -torch.inf)
        gmax = all_reduce_no_grad(local_max, ctx, op=dist.ReduceOp.MAX)
        gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
        buf.sub_(gmax.unsqueeze(1)).exp_()
        sumexp = all_reduce_no_grad(buf.sum(dim=1), ctx)
        picked = torch.zeros(n, dtype=buf.dtype, device=buf.device)
        picked[rows] = value * s
        target_logit = all_reduce_no_grad(picked, ctx)
        per_sample = torch.log(sumexp.clamp_min(_TINY)) + gmax - target_logit
        buf.div_(sumexp.clamp_min(_TINY).unsqueeze(1))  # softmax probabilities, kept for backward
        # Saving W itself (not a copy) also makes autograd refuse a backward after W was changed.
        fctx.save_for_backward(feats, weight, norms, buf, rows, cols, deriv, index)
        fctx.oob, fctx.s, fctx.n, fctx.used, fctx.sparse_grad = oob, s, n, False, sparse_grad
        return per_sample.mean()

    @staticmethod
    def backward(fctx, grad_out):
        if fctx.used:
            raise RuntimeError("fused_margin_cross_entropy's backward reuses its buffer in place and can run only once")
        fctx.used = True
        feats, weight, norms, g, rows, cols, deriv, index = fctx.saved_tensors
        g[rows, cols] -= 1.0  # softmax - onehot: d loss / d logits * N
        g.mul_(grad_out.float() * (fctx.s / fctx.n))
        g[rows, cols] *= deriv
        if fctx.oob is not None:
            g[fctx.oob] = 0.0
        # Rows of W are processed in chunks so the normalised rows and the projection's
        # temporaries never exist for all K rows at once (only the [K, D] gradient itself does).
        f = feats.detach()
        k = norms.shape[0]
        grad_feats = torch.zeros(f.shape, dtype=torch.float32, device=f.device) if fctx.needs_input_grad[0] else None
        grad_w = torch.empty((k, weight.shape[1]), dtype=weight.dtype, device=weight.device) if fctx.needs_input_grad[1] else None
        for c0 in range(0, k, _CHUNK):
            sl = slice(c0, min(k, c0 + _CHUNK))
            nrm = norms[sl].unsqueeze(1)
            w_rows = weight.detach()[sl] if index is None else weight.detach().index_select(0, index[sl])
            w_n = w_rows.float().div(nrm)
            g_c = g[:, sl].to(f.dtype)
            if grad_feats is not None:
                grad_feats += (g_c @ w_n.to(f.dtype)).float()
            if grad_w is not None:
                gw = (g_c.t() @ f).float()  # gradient w.r.t. the normalised rows
                gw.sub_(w_n * (w_n * gw).sum(dim=1, keepdim=True)).div_(nrm)
                grad_w[sl] = gw
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
