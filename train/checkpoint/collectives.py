"""The few collectives of a checkpoint: JSON all-gather (no pickle) and raising on every rank together.

A save or load that fails on one rank must fail on every rank, with the same message, so that no
rank is left waiting in a collective: each step catches its error locally and
:func:`_raise_if_any_failed` all-gathers the outcome.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
import torch.distributed as dist

from partial_fc.distributed import ParallelContext

from .format import CheckpointError


def _comm_device(ctx: ParallelContext) -> torch.device:
    if dist.get_backend(ctx.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_json(obj: Any, ctx: ParallelContext) -> list:
    """All-gathers a JSON-serialisable object (no pickle); ``[obj]`` when not distributed."""
    if not ctx.is_distributed:
        return [obj]
    data = json.dumps(obj).encode()
    dev = _comm_device(ctx)
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size, group=ctx.group)
    longest = max(int(s) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    outs = [torch.empty_like(buf) for _ in range(ctx.world_size)]
    dist.all_gather(outs, buf, group=ctx.group)
    return [json.loads(bytes(o[: int(s)].cpu().tolist()).decode()) for o, s in zip(outs, sizes)]


def _raise_if_any_failed(local_error: Optional[str], ctx: ParallelContext, what: str) -> None:
    """Every rank raises the same error if any rank failed, so no rank is left in a collective."""
    errors = _all_gather_json(local_error, ctx)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise CheckpointError(f"{what} failed on {len(failed)} rank(s): {detail}")
