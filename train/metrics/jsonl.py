"""``run_dir/metrics.jsonl``: one JSON object per logged step (rank 0), for plot scripts and notebooks.

Each line is the step's flat dict (keys of :data:`train.metrics.series.SERIES`, e.g. ``"step"``,
``"loss/total"``, ``"lr/backbone"``, ``"time/forward_s"``) plus ``"time"`` (Unix seconds). Evaluation
results are lines of their own (``"step"`` and ``"eval/<set>/..."`` keys). Lines are appended and
flushed as written, so a resumed run continues the file and a reader can follow it live. Non-finite
values are written as ``NaN``/``Infinity`` (Python's ``json`` and pandas read them)::

    import pandas as pd
    df = pd.read_json("runs/demo/metrics.jsonl", lines=True)
    df.plot(x="step", y="loss/total")
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

__all__ = ["JsonlLogger", "FILENAME"]

FILENAME = "metrics.jsonl"
_COUNTERS = ("step", "train/epoch")  # whole numbers: written as JSON integers, not 20.0


def _counter(key: str, value):
    if key in _COUNTERS and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class JsonlLogger:
    """Appends flat dicts to ``run_dir/metrics.jsonl``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / FILENAME
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, flat: Mapping[str, float]) -> None:
        if self._f is None:
            return
        row = {k: _counter(k, v) for k, v in flat.items()}
        self._f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
