"""Per-phase wall times of a training step (host clock, synchronised clock, or CUDA events)."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Union

import torch

__all__ = ["StepTimer"]


class StepTimer:
    """Per-phase wall times of one training step, honest on CUDA.

    ``with timer.phase("forward"): ...`` times a phase (a phase entered twice in a step, e.g. with
    gradient accumulation, accumulates); ``timer.collect()`` returns ``{phase: seconds}`` for the
    phases seen since the previous ``collect()`` and starts the next step.

    Modes:
        ``"wall"``: host ``time.perf_counter`` (CPU, or when asynchronous GPU time is acceptable).
        ``"sync"``: ``torch.cuda.synchronize`` at both ends of each phase, then host time. Exact,
            but each phase boundary stalls the host until the GPU is idle.
        ``"events"``: CUDA events recorded on the current stream at both ends of each phase; the
            host is synchronised only once, in ``collect()``. The time is the GPU stream's time
            between the two events.
        ``"auto"`` (default): ``"events"`` on a CUDA device, else ``"wall"``.

    Args:
        device: The training device (``None``/CPU means ``"wall"`` in ``"auto"`` mode).
        mode: See above.
    """

    def __init__(self, device: Union[torch.device, str, None] = None, mode: str = "auto"):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if mode == "auto":
            mode = "events" if dev.type == "cuda" else "wall"
        if mode not in ("wall", "sync", "events"):
            raise ValueError(f"StepTimer mode must be auto, wall, sync or events, not {mode!r}")
        if mode in ("sync", "events") and (dev.type != "cuda" or not torch.cuda.is_available()):
            raise ValueError(f"StepTimer mode {mode!r} needs an available CUDA device, got {dev}")
        self.device = dev
        self.mode = mode
        self._wall: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []
        self.last: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the body of the ``with`` block as phase ``name``."""
        if self.mode == "events":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))
            try:
                yield
            finally:
                end.record(torch.cuda.current_stream(self.device))
                self._events.append((name, start, end))
            return
        if self.mode == "sync":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.mode == "sync":
                torch.cuda.synchronize(self.device)
            self._wall[name] = self._wall.get(name, 0.0) + time.perf_counter() - t0

    def reset(self) -> None:
        """Drops the phases recorded since the previous call without reading them (no device sync:
        the trainer calls it on steps that do not log)."""
        self._wall = {}
        self._events = []

    def collect(self) -> dict[str, float]:
        """``{phase: seconds}`` since the previous call (in first-seen order); resets the timer."""
        out = dict(self._wall)
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._wall = {}
        self._events = []
        self.last = out
        return out
