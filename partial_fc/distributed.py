"""Process-group context and the collectives the model-parallel head is built on.

Every collective here works with gloo (CPU) and NCCL (GPU); the device always comes from the
tensors passed in. Nothing here creates a process group: callers pass one in (or ``None`` for the
default group), and when ``torch.distributed`` is not initialised every function degrades to the
single-process identity so the same head code runs on a laptop without any set-up.

Gradient contracts (the reason this module exists):

* :func:`all_gather_with_grad` -- forward concatenates every rank's ``[B, ...]`` slice into
  ``[world_size * B, ...]`` (rank order). Backward reduce-scatters (sums) the incoming gradient, so
  each rank receives, for its own slice, the sum over all ranks of the gradient that rank computed
  for that slice. When every rank back-propagates the *same* scalar loss (the distributed softmax
  makes it so), that sum is exactly ``d loss / d local_slice``. Data-parallel engines (DDP,
  DeepSpeed) then *average* the backbone gradients over ranks, which divides by ``world_size``;
  ``grad_scale=world_size`` cancels that so the backbone sees the gradient of the global mean loss.
* :func:`all_reduce_sum_local_grad` -- forward is the sum over ranks; backward sends the gradient to
  the local summand only. Correct under the same "every rank back-propagates the same scalar"
  condition, because then ``d loss / d x_r`` is the same expression evaluated on every rank and rank
  ``r`` is the only one holding ``x_r``.
* :func:`all_gather_no_grad`, :func:`all_reduce_no_grad` -- no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "ParallelContext",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_no_grad",
    "all_reduce_sum_local_grad",
    "check_equal_batch_sizes",
]


@dataclass(frozen=True)
class ParallelContext:
    """Who this process is inside the model-parallel group of the head.

    Attributes:
        rank: Rank inside ``group`` (0 when not distributed).
        world_size: Number of ranks in ``group`` (1 when not distributed).
        group: The process group, or ``None`` for the default group / single process.
    """

    rank: int = 0
    world_size: int = 1
    group: Optional[dist.ProcessGroup] = None

    @property
    def is_distributed(self) -> bool:
        """True when collectives actually communicate (world size above one)."""
        return self.world_size > 1

    @classmethod
    def from_group(cls, group: Optional[dist.ProcessGroup] = None) -> "ParallelContext":
        """Builds the context for ``group`` (default group), or a single process if uninitialised.

        Args:
            group: A process group, or ``None`` for the default one.

        Returns:
            The context; ``rank=0, world_size=1`` when ``torch.distributed`` is not initialised.
        """
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not initialised")
            return cls()
        return cls(rank=dist.get_rank(group), world_size=dist.get_world_size(group), group=group)


def _gather_into(out: torch.Tensor, inp: torch.Tensor, ctx: ParallelContext) -> None:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; keep older torch working.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp.contiguous(), group=ctx.group)


def _reduce_scatter_into(out: torch.Tensor, inp: torch.Tensor, ctx: ParallelContext) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)


def all_gather_no_grad(local: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Concatenates every rank's tensor along dim 0, without gradient.

    Args:
        local: ``[B, ...]``, the same shape on every rank.
        ctx: The parallel context.

    Returns:
        ``[world_size * B, ...]`` in rank order.
    """
    if not ctx.is_distributed:
        return local.detach()
    out = local.new_empty((ctx.world_size * local.shape[0], *local.shape[1:]))
    _gather_into(out, local.detach(), ctx)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """Autograd all-gather; see :func:`all_gather_with_grad` for the contract."""

    @staticmethod
    def forward(fctx, local: torch.Tensor, ctx: ParallelContext, grad_scale: float) -> torch.Tensor:
        fctx.ctx = ctx
        fctx.grad_scale = grad_scale
        fctx.local_rows = local.shape[0]
        out = local.new_empty((ctx.world_size * local.shape[0], *local.shape[1:]))
        _gather_into(out, local, ctx)
        return out

    @staticmethod
    def backward(fctx, grad_global: torch.Tensor):
        ctx: ParallelContext = fctx.ctx
        grad_local = grad_global.new_empty((fctx.local_rows, *grad_global.shape[1:]))
        _reduce_scatter_into(grad_local, grad_global, ctx)
        if fctx.grad_scale != 1.0:
            grad_local.mul_(fctx.grad_scale)
        return grad_local, None, None


def all_gather_with_grad(
    local: torch.Tensor, ctx: ParallelContext, grad_scale: float = 1.0
) -> torch.Tensor:
    """All-gathers ``local`` along dim 0 with a gradient (the embedding all-gather).

    Forward: ``[B, ...]`` on each rank -> ``[world_size * B, ...]`` (rank order) on every rank.
    Backward: reduce-scatter with SUM, so rank ``r`` receives ``sum_q grad_q[r*B:(r+1)*B]``, i.e.
    the gradient of the common loss with respect to its own slice, then multiplied by
    ``grad_scale``. Pass ``grad_scale=world_size`` when a data-parallel engine averages the
    backbone's gradients (DDP, DeepSpeed): the average then equals the gradient of the global loss.

    Args:
        local: ``[B, ...]`` with equal ``B`` on all ranks (check with
            :func:`check_equal_batch_sizes` first: unequal sizes would fail inside the collective).
        ctx: The parallel context.
        grad_scale: Factor applied to the gradient returned to ``local``.

    Returns:
        ``[world_size * B, ...]``.
    """
    if not ctx.is_distributed:
        return _ScaleGrad.apply(local, grad_scale) if grad_scale != 1.0 else local
    return _AllGatherWithGrad.apply(local, ctx, grad_scale)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        fctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(fctx, grad: torch.Tensor):
        return grad * fctx.scale, None


def all_reduce_no_grad(
    tensor: torch.Tensor, ctx: ParallelContext, op: "dist.ReduceOp.RedOpType" = dist.ReduceOp.SUM
) -> torch.Tensor:
    """Returns the all-reduced copy of ``tensor`` (the input is not modified), without gradient.

    Args:
        tensor: Any shape, identical on every rank.
        ctx: The parallel context.
        op: ``dist.ReduceOp.SUM``, ``MAX`` or ``MIN``.
    """
    out = tensor.detach().clone()
    if ctx.is_distributed:
        dist.all_reduce(out, op=op, group=ctx.group)
    return out


def all_reduce_sum_local_grad(local: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum over ranks whose gradient flows to the local summand only.

    Forward: ``sum_r local_r``. Backward: the incoming gradient goes unchanged to ``local`` on this
    rank. This is the exact gradient whenever every rank back-propagates the same scalar built from
    the sum (which is how the head uses it): rank ``r`` alone holds ``local_r`` and computes
    ``d loss / d sum`` identically to every other rank.

    Args:
        local: Any shape, identical on every rank.
        ctx: The parallel context.

    Returns:
        Tensor of the same shape holding the global sum.
    """
    if not ctx.is_distributed:
        return local
    total = all_reduce_no_grad(local, ctx)
    return local + (total - local.detach())


def check_equal_batch_sizes(local_batch: int, device: torch.device, ctx: ParallelContext) -> None:
    """Raises the same ``ValueError`` on every rank if batch sizes differ across ranks.

    The embedding all-gather needs equal sizes; without this check a mismatch hangs or crashes
    inside the collective with an unhelpful message. Costs one tiny all-gather.

    Args:
        local_batch: This rank's batch size.
        device: Device for the size tensor (the collective backend's device).
        ctx: The parallel context.
    """
    if not ctx.is_distributed:
        return
    sizes = all_gather_no_grad(torch.tensor([local_batch], dtype=torch.int64, device=device), ctx)
    sizes_list = sizes.tolist()
    if len(set(sizes_list)) != 1:
        raise ValueError(
            f"unequal batch sizes across ranks {sizes_list} (rank {ctx.rank} has {local_batch}): "
            "every rank must feed the head the same number of samples per step; make the data "
            "loader drop or pad the last batch"
        )
