"""The hub's running counts: skipped steps, the non-finite streak, skipped data records."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["RunCounters"]


class RunCounters:
    """Cumulative counts, returned as flat-dict entries (counters hold totals; see series.py)."""

    def __init__(self) -> None:
        self.streak = 0
        self.steps = 0
        self.records = 0.0
        self._records_seen: Optional[float] = None  # the data layer's last reported total
        self._skipped_since_update = False

    def skipped_steps(self, n: int) -> dict[str, float]:
        self.steps += n
        self.streak += n
        self._skipped_since_update = True
        return {"train/skipped_steps": self.steps, "train/nonfinite_consecutive": self.streak}

    def skipped_records(self, n: int) -> dict[str, float]:
        self.records += n
        if self._records_seen is not None:
            self._records_seen += n
        return {"data/skipped_records": self.records}

    def on_update(self, records_total: Optional[float], streak: Optional[int],
                  loss: Optional[float]) -> dict[str, float]:
        """Entries of an update: the data layer's cumulative ``records_total`` grows the count by its
        increase (a smaller value means it restarted counting); the streak is ``streak`` when given,
        else reset by a finite ``loss`` that follows no skipped step."""
        if records_total is not None:
            prev, total = self._records_seen, float(records_total)
            self.records += total if (prev is None or total < prev) else total - prev
            self._records_seen = total
        if streak is not None:
            self.streak = int(streak)
        elif not self._skipped_since_update and loss is not None and math.isfinite(loss):
            self.streak = 0
        self._skipped_since_update = False
        return {"train/skipped_steps": self.steps, "train/nonfinite_consecutive": self.streak,
                "data/skipped_records": self.records}
