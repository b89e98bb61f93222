import math

import pytest
import torch

from partial_fc.margins import (
    MarginParams,
    apply_margin,
    build_margin,
    cluster_guided_margin,
    list_margins,
)


def _p(m1, m2, m3, n):
    return MarginParams(torch.full((n,), m1), torch.full((n,), m2), torch.full((n,), m3))


def test_arcface_value_and_exact_grad():
    theta = torch.linspace(0.05, 2.5, 40, dtype=torch.float64)
    cos = torch.cos(theta).requires_grad_()
    out = apply_margin(cos, _p(1.0, 0.5, 0.0, 40), "exact")
    inside = theta + 0.5 <= math.pi
    expected = torch.where(inside, torch.cos(theta + 0.5), torch.cos(theta) - 0.5 * math.sin(0.5))
    torch.testing.assert_close(out, expected.to(out.dtype))
    out.sum().backward()
    # d cos(theta + m) / d cos(theta) = sin(theta + m) / sin(theta)
    expected_grad = torch.where(inside, torch.sin(theta + 0.5) / torch.sin(theta), torch.ones_like(theta))
    torch.testing.assert_close(cos.grad, expected_grad.to(cos.dtype))


def test_exact_grad_matches_finite_difference():
    cos = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64, requires_grad=True)
    params = _p(0.9, 0.3, 0.1, 3)
    assert torch.autograd.gradcheck(lambda c: apply_margin(c, params, "exact"), (cos,))


def test_exact_grad_finite_near_zero_angle():
    cos = torch.tensor([1.0, 0.9999999], requires_grad=True)
    apply_margin(cos, _p(1.0, 0.5, 0.0, 2), "exact").sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_straight_through_grad_is_identity():
    cos = torch.tensor([0.1, 0.5, -0.7], requires_grad=True)
    out = apply_margin(cos, _p(1.0, 0.5, 0.0, 3), "straight_through")
    out.sum().backward()
    torch.testing.assert_close(cos.grad, torch.ones(3))
    torch.testing.assert_close(out, apply_margin(cos.detach(), _p(1.0, 0.5, 0.0, 3), "exact"))


def test_cosface_and_combined():
    cos = torch.tensor([0.2, 0.8])
    torch.testing.assert_close(apply_margin(cos, _p(1.0, 0.0, 0.35, 2)), cos - 0.35)
    theta = torch.acos(cos)
    torch.testing.assert_close(apply_margin(cos, _p(0.9, 0.4, 0.15, 2)), torch.cos(0.9 * theta + 0.4) - 0.15)


def test_unknown_grad_mode():
    with pytest.raises(ValueError, match="grad_mode"):
        apply_margin(torch.zeros(1), _p(1, 0.5, 0, 1), "approx")


def test_cg_margin_from_phi():
    lam = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(cluster_guided_margin(lam, 0.4, 0.6), torch.tensor([0.4, 0.45, 0.5, 0.6]))
    torch.testing.assert_close(
        cluster_guided_margin(lam, 0.4, 0.6, "looser_smaller"), torch.tensor([0.6, 0.55, 0.5, 0.4])
    )
    with pytest.raises(ValueError, match="direction"):
        cluster_guided_margin(lam, 0.4, 0.6, "up")


def test_cg_registry_margin_monotonic_and_warmup():
    fn = build_margin("cg_arcface", m=0.5, m_min=0.3, m_max=0.7)
    lam = torch.tensor([0.1, 0.2, float("nan"), 0.9])
    m2 = fn(lam, 4, torch.device("cpu")).m2
    assert m2[0] < m2[1] < m2[3]
    assert float(m2[2]) == pytest.approx(0.5)  # warm-up class keeps the constant margin
    assert getattr(fn, "uses_concentration", False)


def test_cg_reduces_to_arcface_when_range_collapses():
    cos = torch.rand(16) * 2 - 1
    lam = torch.rand(16)
    cg = build_margin("cg_arcface", m_min=0.5, m_max=0.5)(lam, 16, torch.device("cpu"))
    arc = build_margin("arcface", m=0.5)(None, 16, torch.device("cpu"))
    torch.testing.assert_close(apply_margin(cos, cg), apply_margin(cos, arc))


def test_registry():
    assert {"arcface", "cosface", "combined", "cg_arcface"} <= set(list_margins())
    with pytest.raises(ValueError, match="did you mean 'arcface'"):
        build_margin("arcfase")
