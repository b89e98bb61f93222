"""TensorBoard scalars (rank 0): the flat keys the series table marks for TensorBoard, as tags."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Mapping

from .series import tensorboard_key

__all__ = ["TensorBoardLogger", "open_tensorboard"]


def _tag(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/@=]", "_", s)


class TensorBoardLogger:
    """Writes ``run_dir/tensorboard/`` event files."""

    def __init__(self, writer) -> None:
        self.writer = writer

    def write(self, flat: Mapping[str, float], step: int, flush: bool = False) -> None:
        for key, value in flat.items():
            if tensorboard_key(key):
                self.writer.add_scalar(_tag(key), value, step)
        if flush:
            self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def open_tensorboard(run_dir: Path):
    """A :class:`TensorBoardLogger`, or ``None`` with a warning when ``tensorboard`` is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        warnings.warn(f"TensorBoard logging is off: the 'tensorboard' package is not installed "
                      f"({e}). pip install tensorboard to enable it.", RuntimeWarning, stacklevel=3)
        return None
    return TensorBoardLogger(SummaryWriter(log_dir=str(run_dir / "tensorboard")))
