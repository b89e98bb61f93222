"""Row-wise ("lazy") optimizers for the class-center shard: they touch only the sampled rows.

With Partial FC only ``K = sample_rate * C`` rows of a rank's ``[C, D]`` shard of W take part in a
step. The head hands them a *sparse* gradient (a COO tensor whose values are ``[K, D]``; see
``PartialFCConfig.row_update``), and these optimizers read the sampled rows of W and of their
state, update them, and write them back -- no dense ``[C, D]`` gradient, and no pass over the
unsampled rows.

Semantics for rows that were not sampled in a step ("lazy", the Partial FC convention):

* SGD: the momentum buffer of an unsampled row is neither decayed nor applied, and weight decay
  is not applied to it; the row is left bit-for-bit unchanged. On a sampled row the update is
  exactly torch's ``SGD(momentum, weight_decay)``: ``g += wd * w; buf = m * buf + g;
  w -= lr * buf`` (a row's buffer starts at zero, so its first update equals torch's ``buf = g``).
* AdamW: the moments of an unsampled row are frozen and decoupled weight decay is not applied.
  Bias correction uses the optimizer's global step count (as torch's ``SparseAdam`` does), so a
  sampled row's update is exactly torch's ``AdamW`` update at that step.

Dense gradients (sample rate 1, or a replicated scalar such as the learnable temperature) take the
same formulas over the whole tensor, i.e. they reproduce torch's SGD / AdamW exactly. State is
kept as tensors shaped like the parameter (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq`` and a
scalar ``step``), the same keys torch uses, so checkpoints save and reshard them row by row.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = ["SparseRowSGD", "SparseRowAdamW", "sparse_rows"]


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique row indices and summed row gradients of a sparse COO gradient.

    Gradient accumulation over micro-steps concatenates sparse gradients; coalescing sums the
    duplicate rows so each row is updated once with its total gradient.

    Args:
        grad: Sparse COO ``[C, D]`` (one sparse dimension).

    Returns:
        ``(index [U] int64, values [U, D])``.
    """
    if grad.sparse_dim() != 1:
        raise ValueError(f"row optimizers expect a row-sparse gradient (1 sparse dim), got {grad.sparse_dim()}")
    if not grad.is_coalesced():
        idx = grad._indices()[0]
        # One micro-step's gradient already has sorted unique rows (the sampler sorts them):
        # use it as is instead of paying for a coalesced [K, D] copy.
        if idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all()):
            return idx, grad._values()
    g = grad.coalesce()
    return g.indices()[0], g.values()


_CHUNK = 16384  # rows updated at a time: bounds the gathered copies to a few [16384, D] buffers


class _RowOptimizer(torch.optim.Optimizer):
    """Shared plumbing: iterate parameters, split sparse (row) and dense gradients."""

    def _update(self, p, rows, grad, group, state) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Updates every parameter that has a gradient (sparse: only its rows)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    rows, values = sparse_rows(p.grad)
                    state = self._init_state(p, group)
                    self._begin(state)
                    for c0 in range(0, rows.numel(), _CHUNK):
                        sl = slice(c0, c0 + _CHUNK)
                        self._update(p, rows[sl], values[sl].to(p.dtype), group, state)
                else:
                    state = self._init_state(p, group)
                    self._begin(state)
                    self._update(p, None, p.grad.to(p.dtype), group, state)
        return loss

    def _begin(self, state: dict) -> None:
        """Per-step bookkeeping before the row chunks are updated (AdamW's step count)."""


def _read(t: torch.Tensor, rows) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


def _write(t: torch.Tensor, rows, value: torch.Tensor) -> None:
    if rows is None:
        if value.data_ptr() != t.data_ptr():
            t.copy_(value)
    else:
        t.index_copy_(0, rows, value)


class SparseRowSGD(_RowOptimizer):
    """Momentum SGD that updates only the rows present in a row-sparse gradient.

    Args:
        params: Parameters or parameter groups (groups may set ``lr``, ``momentum``,
            ``weight_decay``).
        lr: Learning rate.
        momentum: Momentum factor in ``[0, 1)``; 0 keeps no state.
        weight_decay: L2 penalty added to the gradient of the sampled rows.

    State per parameter: ``momentum_buffer`` shaped like the parameter (when momentum > 0).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"SparseRowSGD: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SparseRowSGD: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"SparseRowSGD: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _init_state(self, p, group) -> dict:
        state = self.state[p]
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update(self, p, rows, grad, group, state) -> None:
        w = _read(p, rows)
        if group["weight_decay"]:
            grad = grad.add(w, alpha=group["weight_decay"])
        if group["momentum"] > 0:
            buf_full = state["momentum_buffer"]
            buf = _read(buf_full, rows)
            buf.mul_(group["momentum"]).add_(grad)
            _write(buf_full, rows, buf)
            grad = buf
        if rows is None:
            p.add_(grad, alpha=-group["lr"])
        else:  # w is a gathered copy of the sampled rows
            p.index_copy_(0, rows, w.add_(grad, alpha=-group["lr"]))


class SparseRowAdamW(_RowOptimizer):
    """AdamW (decoupled weight decay) that updates only the rows present in a row-sparse gradient.

    Args:
        params: Parameters or parameter groups (groups may set ``lr``, ``betas``, ``eps``,
            ``weight_decay``).
        lr: Learning rate.
        betas: ``(beta1, beta2)``.
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay applied to the sampled rows.

    State per parameter: ``step`` (0-d float tensor, the optimizer steps taken), ``exp_avg`` and
    ``exp_avg_sq`` shaped like the parameter.
    """

    def __init__(self, params: Iterable, lr: float, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"SparseRowAdamW: need lr >= 0, eps > 0, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"SparseRowAdamW: betas must be two values in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, p, group) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _begin(self, state: dict) -> None:
        state["step"] += 1

    def _update(self, p, rows, grad, group, state) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        t = float(state["step"])
        w = _read(p, rows)  # the parameter itself (dense) or a gathered copy of its rows
        m_full, v_full = state["exp_avg"], state["exp_avg_sq"]
        m, v = _read(m_full, rows), _read(v_full, rows)
        w.mul_(1.0 - lr * wd)
        m.lerp_(grad, 1.0 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        _write(m_full, rows, m)
        _write(v_full, rows, v)
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        denom = (v.sqrt() / (bc2**0.5)).add_(eps)
        w.addcdiv_(m, denom, value=-lr / bc1)
        _write(p, rows, w)
