"""Turning what callers pass (floats, one-element tensors, numpy scalars, FAR keys) into metric values."""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

__all__ = ["to_float", "far_label", "parse_tar_key"]


def to_float(v: Any) -> Optional[float]:
    """float(v) for numbers and one-element tensors; ``None`` for anything else."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach())
    try:
        import numpy as np

        if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.size == 1):
            return float(v)
    except ImportError:  # pragma: no cover
        pass
    return None


def far_label(far: Any) -> str:
    f = to_float(far)
    if f is None:
        return str(far)
    mant, exp = f"{f:.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


_TAR_RE = re.compile(r"^tar(?:@|_at_)(?:far)?[=_]?(.+)$", re.IGNORECASE)


def parse_tar_key(key: str) -> Optional[str]:
    m = _TAR_RE.match(key)
    if not m:
        return None
    raw = m.group(1)
    try:
        return far_label(float(raw))
    except ValueError:
        return raw
