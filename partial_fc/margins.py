"""Angular margins applied to the target logit, behind a small registry.

Every margin is expressed in the combined form ``cos(m1 * theta + m2) - m3`` with per-sample
``(m1, m2, m3)`` tensors, so ArcFace (1, m, 0), CosFace (1, 0, m), the combined margin and the
cluster-guided ArcFace (per-class m2) share one implementation and one gradient.

Gradient modes (``grad_mode``):

* ``"exact"`` (default): the true derivative of ``cos(m1*theta + m2) - m3`` with respect to
  ``cos(theta)``: ``m1 * sin(m1*theta + m2) / sin(theta)``. It diverges as theta -> 0, so
  ``sin(theta)`` is clamped from below by ``SIN_EPS`` -- the only deviation from the exact value.
* ``"straight_through"``: the margin shifts the forward value only and the gradient passes through
  as if the logit were ``cos(theta)`` (the widely used Partial FC v2 implementation applies its
  margin under ``no_grad``, which amounts to this).

Where ``m1*theta + m2 > pi`` the target logit would start to *increase* with theta; there we use the
conventional linear extension ``cos(theta) - m3 - m2 * sin(m2)`` (derivative 1), which keeps the
target logit below ``cos(theta)``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

__all__ = [
    "GRAD_MODES",
    "SIN_EPS",
    "MarginParams",
    "apply_margin",
    "margin_value_and_derivative",
    "register_margin",
    "build_margin",
    "list_margins",
    "cluster_guided_margin",
]

GRAD_MODES = ("exact", "straight_through")
SIN_EPS = 1e-4


@dataclass(frozen=True)
class MarginParams:
    """Per-sample margin parameters, each broadcastable to ``[n]``."""

    m1: torch.Tensor
    m2: torch.Tensor
    m3: torch.Tensor


def _margin_value(cos: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, m3: torch.Tensor):
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    u = m1 * theta + m2
    inside = u <= math.pi
    value = torch.where(inside, torch.cos(u) - m3, cos - m3 - m2 * torch.sin(m2))
    return value, theta, u, inside


class _ExactMargin(torch.autograd.Function):
    @staticmethod
    def forward(fctx, cos, m1, m2, m3):
        value, theta, u, inside = _margin_value(cos, m1, m2, m3)
        fctx.save_for_backward(theta, u, inside, m1)
        return value

    @staticmethod
    def backward(fctx, grad):
        theta, u, inside, m1 = fctx.saved_tensors
        # d cos(m1*theta + m2) / d cos(theta) = m1 sin(u) / sin(theta); clamp sin(theta) near 0.
        deriv = m1 * torch.sin(u) / torch.sin(theta).clamp_min(SIN_EPS)
        deriv = torch.where(inside, deriv, torch.ones_like(deriv))
        return grad * deriv, None, None, None


def apply_margin(cos: torch.Tensor, params: MarginParams, grad_mode: str = "exact") -> torch.Tensor:
    """Applies the combined margin to target cosines.

    Args:
        cos: ``[n]`` target cosines (fp32), in ``[-1, 1]``.
        params: Per-sample ``(m1, m2, m3)``, each ``[n]`` or scalar tensors.
        grad_mode: ``"exact"`` or ``"straight_through"`` (see module docstring).

    Returns:
        ``[n]`` target logits before the scale ``s``.
    """
    m1, m2, m3 = (p.to(cos.dtype).expand_as(cos) for p in (params.m1, params.m2, params.m3))
    if grad_mode == "exact":
        return _ExactMargin.apply(cos, m1, m2, m3)
    if grad_mode == "straight_through":
        with torch.no_grad():
            value, _, _, _ = _margin_value(cos, m1, m2, m3)
        return cos + (value - cos.detach())
    raise ValueError(f"unknown margin grad_mode {grad_mode!r}; choose one of {GRAD_MODES}")


@torch.no_grad()
def margin_value_and_derivative(
    cos: torch.Tensor, params: MarginParams, grad_mode: str = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The margin's value and its derivative with respect to ``cos`` (for fused kernels).

    The same numbers :func:`apply_margin` produces in forward and backward, for code that computes
    its own gradient (see :mod:`partial_fc.fused`).

    Args:
        cos: ``[n]`` target cosines (fp32), in ``[-1, 1]``.
        params: Per-sample ``(m1, m2, m3)``.
        grad_mode: ``"exact"`` or ``"straight_through"`` (derivative 1).

    Returns:
        ``(value [n], derivative [n])``.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"unknown margin grad_mode {grad_mode!r}; choose one of {GRAD_MODES}")
    m1, m2, m3 = (p.to(cos.dtype).expand_as(cos) for p in (params.m1, params.m2, params.m3))
    value, theta, u, inside = _margin_value(cos, m1, m2, m3)
    if grad_mode == "straight_through":
        return value, torch.ones_like(value)
    deriv = m1 * torch.sin(u) / torch.sin(theta).clamp_min(SIN_EPS)
    return value, torch.where(inside, deriv, torch.ones_like(deriv))


def cluster_guided_margin(
    lam: torch.Tensor, m_min: float, m_max: float, direction: str = "looser_larger"
) -> torch.Tensor:
    """CG-ArcFace: per-class additive angular margin from the normalised concentration.

    ``m = m_min + lambda * (m_max - m_min)`` with ``lambda = (phi - phi_lo) / (phi_hi - phi_lo)``
    (``"looser_larger"``: a looser cluster -- larger phi -- gets a larger margin), or with
    ``1 - lambda`` for ``"looser_smaller"``.

    Args:
        lam: ``[n]`` values in ``[0, 1]``.
        m_min: Margin at lambda = 0.
        m_max: Margin at lambda = 1.
        direction: ``"looser_larger"`` or ``"looser_smaller"``.

    Returns:
        ``[n]`` margins in radians.
    """
    if direction == "looser_smaller":
        lam = 1.0 - lam
    elif direction != "looser_larger":
        raise ValueError(
            f"unknown CG margin direction {direction!r}; use 'looser_larger' or 'looser_smaller'"
        )
    return m_min + lam * (m_max - m_min)


# --- registry -------------------------------------------------------------------------------------
# A margin builder takes the head's options and returns a function
# (lam: Optional[Tensor [n]], n, device) -> MarginParams; lam is None for phi-independent margins.
MarginFn = Callable[[Optional[torch.Tensor], int, torch.device], MarginParams]
_REGISTRY: Dict[str, Callable[..., MarginFn]] = {}


def register_margin(name: str):
    """Decorator registering a margin builder under ``name``."""

    def wrap(builder: Callable[..., MarginFn]) -> Callable[..., MarginFn]:
        if name in _REGISTRY:
            raise ValueError(f"margin {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return wrap


def list_margins() -> list[str]:
    """Names of the registered margins."""
    return sorted(_REGISTRY)


def build_margin(name: str, **options) -> MarginFn:
    """Builds the registered margin ``name`` with the head's margin options.

    Args:
        name: A registered margin (see :func:`list_margins`).
        **options: ``m``, ``m1``, ``m2``, ``m3``, ``m_min``, ``m_max``, ``direction``; each builder
            takes what it needs and ignores the rest.
    """
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        raise ValueError(
            f"unknown margin {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; registered: {list_margins()}"
        )
    return _REGISTRY[name](**options)


def _const(value: float, n: int, device: torch.device) -> torch.Tensor:
    return torch.full((n,), float(value), device=device)


@register_margin("arcface")
def _arcface(m: float = 0.5, **_) -> MarginFn:
    return lambda lam, n, dev: MarginParams(_const(1.0, n, dev), _const(m, n, dev), _const(0.0, n, dev))


@register_margin("cosface")
def _cosface(m: float = 0.4, **_) -> MarginFn:
    return lambda lam, n, dev: MarginParams(_const(1.0, n, dev), _const(0.0, n, dev), _const(m, n, dev))


@register_margin("combined")
def _combined(m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, **_) -> MarginFn:
    return lambda lam, n, dev: MarginParams(_const(m1, n, dev), _const(m2, n, dev), _const(m3, n, dev))


@register_margin("cg_arcface")
def _cg_arcface(
    m: float = 0.5, m_min: float = 0.4, m_max: float = 0.6, direction: str = "looser_larger", **_
) -> MarginFn:
    def params(lam: Optional[torch.Tensor], n: int, dev: torch.device) -> MarginParams:
        # lam is NaN for classes still in warm-up (no concentration yet): they keep the constant m.
        if lam is None:
            m2 = _const(m, n, dev)
        else:
            m2 = torch.where(
                torch.isnan(lam), torch.full_like(lam, m), cluster_guided_margin(lam, m_min, m_max, direction)
            )
        return MarginParams(_const(1.0, n, dev), m2, _const(0.0, n, dev))

    params.uses_concentration = True  # the head computes lambda only for margins that ask for it
    return params
