"""Optimizers, the learning-rate schedule, and the global gradient norm across backbone and head.

The backbone and the head get separate optimizers: the backbone's parameters are replicated (or
ZeRO-sharded by DeepSpeed), while the head's class centers are sharded by class and must never be
averaged across ranks. The schedule counts *optimizer* steps (after gradient accumulation).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from partial_fc.distributed import ParallelContext, all_reduce_no_grad
from partial_fc.optim import SparseRowAdamW, SparseRowSGD

__all__ = ["build_optimizer", "lr_factor", "global_grad_norm", "clip_grads_", "param_groups"]


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Splits parameters into decayed (weights) and non-decayed (biases, norms, 1-d) groups.

    Decaying BatchNorm/LayerNorm scales and biases hurts face recognition models and buys nothing.
    """
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    name: str, groups: list[dict], lr: float, momentum: float = 0.9, betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8, rows: str = "dense",
) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over ``groups`` (each group may carry its own ``weight_decay``).

    Args:
        name: ``"sgd"`` or ``"adamw"``.
        groups: Parameter groups.
        lr: Base learning rate (the schedule multiplies it).
        momentum: SGD momentum.
        betas: AdamW betas.
        eps: AdamW epsilon.
        rows: ``"dense"`` (torch's SGD / AdamW) or ``"lazy"`` (the row optimizers of
            :mod:`partial_fc.optim`, for the head's row-sparse gradient; ``head.row_update``).
    """
    for g in groups:
        g.setdefault("base_lr", lr)
    if rows == "lazy":
        if name == "sgd":
            return SparseRowSGD(groups, lr=lr, momentum=momentum)
        if name == "adamw":
            return SparseRowAdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    elif rows != "dense":
        raise ValueError(f"unknown row update {rows!r}; use 'lazy' or 'dense'")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'")


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str = "poly", power: float = 2.0,
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from ``1/warmup`` to 1 over ``warmup_steps``, then ``poly`` (``(1 - t)^power``),
    ``cosine`` or ``constant`` decay to ``min_ratio`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "poly":
        f = (1.0 - t) ** power
    elif decay == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown decay {decay!r}; use 'poly', 'cosine' or 'constant'")
    return min_ratio + (1.0 - min_ratio) * f


def _sq_norm(params: Iterable[torch.Tensor]) -> Optional[torch.Tensor]:
    # A row-sparse gradient may hold a row several times (accumulated micro-steps): coalesce
    # first so each row's norm is that of its summed gradient.
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


def global_grad_norm(
    replicated: Iterable[torch.Tensor], sharded: Iterable[torch.Tensor], ctx: ParallelContext,
    device: torch.device, flags: Optional[torch.Tensor] = None,
):
    """L2 norm of all gradients of the model: replicated backbone + class-sharded head.

    The backbone's gradients are identical on every rank after DDP's all-reduce, so they count
    once; the head's shard norms are summed over ranks. Every rank gets the same value, so every
    rank clips by the same factor and skips the same non-finite steps.

    Args:
        flags: Optional ``[F]`` float tensor of per-rank values (stop request, non-finite loss, bad
            input) summed over ranks in the same all-reduce as the norm, so the step's control
            values cost no collective of their own.

    Returns:
        Scalar fp32 tensor on ``device`` (inf/nan when any gradient is non-finite); with ``flags``,
        ``(norm, summed flags [F])``.
    """
    rep = _sq_norm(replicated)
    sh = _sq_norm(sharded)
    sh = sh if sh is not None else torch.zeros((), device=device)
    if flags is not None:
        packed = torch.cat([sh.to(device).float().reshape(1), flags.to(device).float().reshape(-1)])
        packed = all_reduce_no_grad(packed, ctx, op=dist.ReduceOp.SUM)
        sh, flags = packed[0], packed[1:]
    else:
        sh = all_reduce_no_grad(sh.to(device), ctx, op=dist.ReduceOp.SUM)
    total = sh + (rep.to(device) if rep is not None else 0.0)
    return total.sqrt() if flags is None else (total.sqrt(), flags)


def clip_grads_(params: Iterable[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scales gradients in place so the global norm is at most ``max_norm`` (no-op when below)."""
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.device))
