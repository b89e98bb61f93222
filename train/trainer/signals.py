"""Preemption: SIGTERM/SIGUSR1 ask the run to save a checkpoint at the next step boundary and stop."""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from partial_fc.distributed import ParallelContext, all_reduce_no_grad

__all__ = ["StopRequest"]


class StopRequest:
    """A stop flag set by a signal handler, agreed on by all ranks at step boundaries.

    The request rides on the gradient norm's all-reduce (the step's verdict sets :attr:`seen`); a
    step dropped before it (a non-finite micro-step under accumulation) asks with its own collective.
    """

    def __init__(self, ctx: ParallelContext, device: torch.device) -> None:
        self.ctx, self.device = ctx, device
        self.requested = False  # set on this rank by the handler
        self.signal_name: Optional[str] = None
        self.seen: Optional[bool] = None  # any rank's request, as the step's verdict read it

    def install(self) -> None:
        """Installs the handlers (only possible from the main thread; elsewhere nothing happens)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, _frame):
            # Only a flag: the checkpoint is written at the next step boundary, collectively.
            self.requested = True
            self.signal_name = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Whether any rank received a stop signal, as of this step's optimizer step (collective)."""
        if self.seen is not None:
            seen, self.seen = self.seen, None
            return seen
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.device)
        flag = all_reduce_no_grad(flag, self.ctx, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
