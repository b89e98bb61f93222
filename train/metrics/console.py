"""The console side of the metrics (rank 0): a tqdm progress bar on a TTY, and the headline line
with the ETA for logs when there is no TTY (Slurm)."""

from __future__ import annotations

import datetime
import sys
import time
from typing import Optional

__all__ = ["Console"]


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Console:
    """Latest headline figures, the ETA, and (when ``progress`` on a TTY) the bar."""

    def __init__(self, progress: bool, total_steps: Optional[int], initial_step: int) -> None:
        self.total_steps = total_steps
        self.step: Optional[int] = None
        self.loss: Optional[float] = None
        self.lr: Optional[float] = None
        self.ips: Optional[float] = None
        self._origin: Optional[tuple[int, float]] = None  # (step, time) of the first update
        self.bar = None
        if progress and _isatty(sys.stdout):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=int(initial_step), file=sys.stdout, dynamic_ncols=True,
                            unit="step", desc="train", leave=True)

    def write(self, step: Optional[int], loss: Optional[float], lr: Optional[float], ips: Optional[float]) -> None:
        if step is not None:
            self.step = step
            if self._origin is None:
                self._origin = (step, time.time())
        self.loss = loss if loss is not None else self.loss
        self.lr = lr if lr is not None else self.lr
        self.ips = ips if ips is not None else self.ips
        if self.bar is None:
            return
        if step is not None:
            self.bar.update(max(0, int(step) - self.bar.n))
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if lr is not None:
            post["lr"] = f"{lr:.3g}"
        if ips is not None:
            post["img/s"] = f"{ips:.0f}"
        if post:
            self.bar.set_postfix(post, refresh=True)

    def eta_seconds(self) -> Optional[float]:
        """Seconds left to ``total_steps`` at the average rate since the first update, or None."""
        if self.total_steps is None or self._origin is None or self.step is None:
            return None
        s0, t0 = self._origin
        done, elapsed = self.step - s0, time.time() - t0
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (self.total_steps - self.step) * elapsed / done)

    def headline(self) -> str:
        """``step 120/1000 loss 2.3100 lr 0.1 img/s 1234 eta 0:12:03``."""
        parts = []
        if self.step is not None:
            parts.append(f"step {self.step}" + (f"/{self.total_steps}" if self.total_steps else ""))
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.3g}")
        if self.ips is not None:
            parts.append(f"img/s {self.ips:.0f}")
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"eta {datetime.timedelta(seconds=int(eta))}")
        return " ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
