"""Loss functions at their numeric edges and their gradient contracts (partial_fc.fused, .losses).

Both tests close gaps a mutation run found: the fused cross-entropy without its max subtraction,
and cluster_aligning_loss without the ``.detach()`` of the cluster centers, survived every other
test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from partial_fc.distributed import ParallelContext
from partial_fc.fused import fused_margin_cross_entropy
from partial_fc.losses import cluster_aligning_loss
from partial_fc.margins import MarginParams

D = 16


def _signs(n: int, g: torch.Generator) -> torch.Tensor:
    """``[n, D]`` unit vectors with entries +-1/4: exact in bf16, and so are their dot products."""
    return (torch.randint(0, 2, (n, D), generator=g).float() * 2 - 1) * 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [128.0, 400.0])
def test_fused_ce_does_not_overflow_at_large_scale(dtype, s):
    """Logits of 128..400 (far beyond exp's fp32 range, 88.7): finite, and equal to an fp64 dense
    reference (F.cross_entropy over s * arcface-margin cosines), loss and gradients."""
    g = torch.Generator().manual_seed(5)
    n, k, m2 = 6, 10, 0.5
    feats = _signs(n, g)
    w = _signs(k, g)
    w[:n] = feats  # every sample has a non-target class at cosine 1: a logit of s
    target = torch.randint(n, k, (n,), generator=g)
    cos64 = feats.double() @ w.double().t()
    assert (cos64[torch.arange(n), target].abs() < 1).all()  # the margin's derivative is finite there
    rows, cols = torch.arange(n), target.clone()
    params = MarginParams(torch.ones(n), torch.full((n,), m2), torch.zeros(n))

    f = feats.clone().requires_grad_()
    wp = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = fused_margin_cross_entropy(f, wp, rows, cols, params, "exact", s, ParallelContext())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all() and torch.isfinite(wp.grad).all()

    f64 = feats.double().requires_grad_()
    w64 = w.double().requires_grad_()
    cos = f64 @ F.normalize(w64, dim=1).t()
    theta_t = torch.acos(cos[rows, cols])
    logits = cos.index_put((rows, cols), torch.cos(theta_t + m2)) * s
    want = F.cross_entropy(logits, target)
    want.backward()
    assert math.isfinite(float(want.detach())) and float(want.detach()) > 1.0  # a hard batch: the margin costs a lot
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(f.grad.double(), f64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wp.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_cluster_aligning_loss_sends_no_gradient_to_the_centers():
    """The centers are a target (an EMA of features), never trained by this loss, even when the
    caller passes a tensor that requires grad."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, D, generator=g, requires_grad=True)
    centers = torch.randn(5, D, generator=g, requires_grad=True)
    loss = cluster_aligning_loss(w, centers, ParallelContext())
    loss.backward()
    assert centers.grad is None
    assert w.grad is not None and w.grad.abs().sum() > 0
    want = (1 - F.cosine_similarity(w.detach(), centers.detach(), dim=1)).mean()
    torch.testing.assert_close(loss.detach(), want)
